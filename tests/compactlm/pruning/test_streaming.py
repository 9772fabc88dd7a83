"""prune.streaming: the student sliced tensor by tensor from the teacher's files is the in-memory path's student,
byte for byte, in every family (tied and untied heads, a bf16 teacher, a Qwen2 written as Llama)."""

from __future__ import annotations

import json

import pytest

from compactlm.arch import SUPPORTED_ARCHS
from compactlm.config import PruneConfig, ScoreConfig
from compactlm.importance import score_model
from compactlm.pruning import prune_to_dir
from tests.helpers import PRUNING_TEXT

MIXED = dict(num_hidden_layers=3, hidden_size=96, intermediate_size=192, num_attention_heads=1)


def _same_student(a, b) -> None:
    names = sorted(p.name for p in a.iterdir() if p.name not in ("pruning.json", "manifest.json"))
    assert names == sorted(p.name for p in b.iterdir() if p.name not in ("pruning.json", "manifest.json"))
    assert "model.safetensors" in names and "config.json" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_streamed_student_is_the_in_memory_student_byte_for_byte(arch, tiny_factory, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(PRUNING_TEXT)
    teacher = tiny_factory(arch=arch)
    scores = tmp_path / "scores"
    score_model(teacher, calib, ScoreConfig(num_samples=2, seq_len=16, layer_loss=False), scores)
    plain = prune_to_dir(teacher, scores, PruneConfig(**MIXED), tmp_path / "plain")
    streamed = prune_to_dir(teacher, scores, PruneConfig(**MIXED, streaming=True), tmp_path / "streamed")
    _same_student(tmp_path / "plain", tmp_path / "streamed")
    same = ("student", "kept_layers", "kept_heads", "kept_channels", "params_before", "params_after", "written_as")
    assert {k: plain[k] for k in same} == {k: streamed[k] for k in same}
    assert json.loads((tmp_path / "streamed" / "pruning.json").read_text())["config"]["streaming"] is True


def test_streaming_an_untied_bf16_teacher_keeps_its_dtype_and_head(tiny_gqa_model_dir, tmp_path):
    from compactlm.models import load_model, load_tokenizer

    teacher = tmp_path / "bf16"
    load_model(tiny_gqa_model_dir).to(dtype=__import__("torch").bfloat16).save_pretrained(teacher)
    load_tokenizer(tiny_gqa_model_dir).save_pretrained(teacher)
    calib = tmp_path / "calib.txt"
    calib.write_text(PRUNING_TEXT)
    score_model(teacher, calib, ScoreConfig(num_samples=2, seq_len=16, layer_loss=False), tmp_path / "scores")
    shape = dict(num_hidden_layers=3, hidden_size=192, intermediate_size=256, num_attention_heads=2)
    prune_to_dir(teacher, tmp_path / "scores", PruneConfig(**shape), tmp_path / "plain")
    prune_to_dir(teacher, tmp_path / "scores", PruneConfig(**shape, streaming=True), tmp_path / "streamed")
    _same_student(tmp_path / "plain", tmp_path / "streamed")
    header = (tmp_path / "streamed" / "model.safetensors").read_bytes()
    assert b'"lm_head.weight":{"dtype":"BF16"' in header


def test_streaming_refuses_what_needs_the_teacher_in_memory():
    for extra in ({"budget": {"params": 0.5}}, {"num_hidden_layers": 2, "repair": {}}):
        with pytest.raises(ValueError, match="streaming slices the teacher's files without running it"):
            PruneConfig(**extra, streaming=True)
