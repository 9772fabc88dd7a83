"""The score stage: scores, summary and plots published atomically; a kill mid-publish leaves nothing and the rerun
matches."""

from __future__ import annotations

import json

import pytest

from compactlm.artifacts import is_complete
from compactlm.config import ScoreConfig
from compactlm.importance import load_scores, score_model
from tests.helpers import SCORE, assert_same_tensors, manifest_sans_time, sigkill, start_script, tmp_dirs, wait_for_line

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog while the model counts {i * 7} apples, "
    "and a small language model learns to compress what a large one knows." for i in range(12)
)


def test_score_model_publishes(tiny_model_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    cfg = ScoreConfig(num_samples=3, seq_len=16, batch_size=2, layer_loss=True)
    out = tmp_path / "scores"
    logged = []
    summary = score_model(tiny_model_dir, calib, cfg, out, seed=0, log_fn=lambda m, step: logged.append(step))
    assert (out / "manifest.json").is_file() and (out / "scores.safetensors").is_file()
    for p in summary["plots"]:
        assert p.startswith(str(out)) and open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert {"heads.png", "neurons.png", "layers.png"} == {p.rsplit("/", 1)[1] for p in summary["plots"]}
    assert logged == [0, 1, 2, 3]
    on_disk = json.loads((out / "scores.json").read_text())
    assert on_disk["base_loss"] == pytest.approx(summary["base_loss"]) and summary["base_loss"] > 0
    assert on_disk["settings"]["num_sequences"] == 3 and len(on_disk["per_layer"]) == 4
    assert on_disk["top"]["heads"][0]["score"] >= on_disk["bottom"]["heads"][0]["score"]
    s = load_scores(out)
    assert s.heads.shape == (4, 2) and s.layer_loss_increase.shape == (4,)
    assert s.num_key_value_heads == 1 and s.base_loss == pytest.approx(summary["base_loss"])
    assert [row["loss_increase"] for row in on_disk["per_layer"]] == pytest.approx(s.layer_loss_increase.tolist())
    with pytest.raises(ValueError, match="calibration"):
        score_model(tiny_model_dir, tmp_path / "missing.txt", cfg, tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.integration  # a subprocess and two in-process scorings: ~20 s idle
@pytest.mark.usefixtures("single_thread")
def test_sigkill_while_scoring_publishes_nothing_and_rerun_matches(tiny_model_dir, gen_dir, scores_dir, tmp_path):
    from compactlm.importance import score_model

    out = tmp_path / "score" / "k"
    proc = start_script("pause_scoring.py", tiny_model_dir, gen_dir, out, SCORE.model_dump_json())
    try:
        wait_for_line(proc, "IN-PUBLISH")
        tmps = tmp_dirs(out)
        assert len(tmps) == 1 and (tmps[0] / "scores.safetensors").is_file()  # killed mid-write
        sigkill(proc)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists(), "a killed scoring must publish nothing"
    assert not is_complete(tmps[0]) and tmps[0].is_dir()  # the leftover: no manifest, never read

    score_model(tiny_model_dir, gen_dir, SCORE, out, seed=0)
    assert not tmps[0].exists(), "the rerun removes the dead process's temp directory"
    assert tmp_dirs(out) == []
    assert_same_tensors(out / "scores.safetensors", scores_dir / "scores.safetensors")
    assert json.loads((out / "scores.json").read_text()) == json.loads((scores_dir / "scores.json").read_text())
    assert manifest_sans_time(out) == manifest_sans_time(scores_dir)
