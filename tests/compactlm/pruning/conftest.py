"""Fixtures of the pruning tests."""

import pytest

from compactlm.config import ScoreConfig
from tests.helpers import PRUNING_TEXT


@pytest.fixture(scope="session")
def scored(tiny_gqa_model_dir, tmp_path_factory):
    """Importance scores of the GQA tiny model on the pruning calibration text."""
    from compactlm.importance import score_model

    root = tmp_path_factory.mktemp("prune")
    (root / "calib.txt").write_text(PRUNING_TEXT)
    score_model(tiny_gqa_model_dir, root / "calib.txt", ScoreConfig(num_samples=2, seq_len=16, batch_size=2),
                root / "scores")
    return root / "scores"
