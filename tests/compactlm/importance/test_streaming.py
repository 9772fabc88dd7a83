"""Streaming scoring (``score.streaming``): one decoder layer in memory at a time gives the in-memory scores."""

from __future__ import annotations

import pytest
import torch

from compactlm.arch import SUPPORTED_ARCHS
from compactlm.config import ScoreConfig
from compactlm.formats.scores import load_scores
from compactlm.importance import score_model
from tests.helpers import PRUNING_TEXT

FIELDS = ("heads", "neurons", "channels", "layer_block_influence")


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_streamed_scores_are_the_in_memory_scores(arch, tiny_factory, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(PRUNING_TEXT)
    teacher = tiny_factory(arch=arch)
    cfg = dict(num_samples=3, seq_len=16, batch_size=2, layer_loss=False)  # a short last batch too
    score_model(teacher, calib, ScoreConfig(**cfg), tmp_path / "memory")
    score_model(teacher, calib, ScoreConfig(**cfg, streaming=True), tmp_path / "streamed")
    a, b = load_scores(tmp_path / "memory"), load_scores(tmp_path / "streamed")
    for field in FIELDS:
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-5, msg=field)
    assert b.base_loss == pytest.approx(a.base_loss, rel=1e-5)


def test_streaming_refuses_layer_loss_and_teachers_without_safetensors(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="layer_loss needs a pass per skipped layer: set layer_loss: false"):
        ScoreConfig(streaming=True)
    bin_teacher = tmp_path / "bin"
    bin_teacher.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (bin_teacher / f.name).write_bytes(f.read_bytes())
    (tmp_path / "calib.txt").write_text(PRUNING_TEXT)
    with pytest.raises(ValueError, match="no .safetensors files: score.streaming reads"):
        score_model(bin_teacher, tmp_path / "calib.txt", ScoreConfig(num_samples=2, seq_len=16, layer_loss=False,
                                                                     streaming=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()
