"""Hidden-state KD: layer maps, the width projection, training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from compactlm.distillation import distill
from compactlm.models import load_model, load_tokenizer
from tests.helpers import kd_cfg as cfg


def _pruned_student(teacher_dir: Path, out: Path, **shape) -> Path:
    """Prune the tiny teacher with random (seeded) scores; writes pruning.json like the prune stage."""
    from compactlm.config import PruneConfig
    from compactlm.importance import ImportanceScores
    from compactlm.pruning.prune import prune_model

    model = load_model(teacher_dir)
    c = model.config
    g = torch.Generator().manual_seed(0)
    L, H, I, D = c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.hidden_size
    scores = ImportanceScores(heads=torch.rand(L, H, generator=g), neurons=torch.rand(L, I, generator=g),
                              channels=torch.rand(D, generator=g), layer_block_influence=torch.rand(L, generator=g),
                              num_key_value_heads=c.num_key_value_heads)
    student, record = prune_model(model, scores, PruneConfig(**shape))
    student.save_pretrained(out)
    load_tokenizer(teacher_dir).save_pretrained(out)
    (out / "pruning.json").write_text(json.dumps(record))
    return out


def test_layer_map_pairs_and_projection_init(tmp_path):
    from compactlm.distillation.hidden import layer_map, make_projection, state_pairs

    assert layer_map(tmp_path, 2, 4) == [1, 3] and layer_map(tmp_path, 3, 3) == [0, 1, 2]
    (tmp_path / "pruning.json").write_text(json.dumps({"kept_layers": [0, 2]}))
    assert layer_map(tmp_path, 2, 4) == [0, 2]
    assert state_pairs([0, 2], 4) == [(1, 1), (2, 4)]  # the last student state is post-norm: teacher's last
    with pytest.raises(ValueError, match="kept_layers"):
        layer_map(tmp_path, 3, 4)
    assert make_projection(8, 8) is None
    proj = make_projection(3, 6, [1, 4, 5])
    x = torch.randn(2, 3)
    assert torch.equal(proj(x)[:, [1, 4, 5]], x) and (proj(x)[:, [0, 2, 3]] == 0).all()


@pytest.mark.parametrize("shape", [dict(num_hidden_layers=2), dict(num_hidden_layers=2, hidden_size=128)],
                         ids=["depth", "depth+width"])
def test_hidden_state_kd_trains_student_and_projection(shape, teacher_dir, data_dir, tmp_path):
    from safetensors.torch import load_file

    from compactlm.distillation.checkpoint import checkpoint_root

    student = _pruned_student(teacher_dir, tmp_path / "student", **shape)
    out = tmp_path / "out"
    seen_ckpt: list[set[str]] = []

    def log(m: dict, step: int) -> None:
        if step == 3:  # the step-2 checkpoint exists now
            seen_ckpt.append({p.name for p in (checkpoint_root(out) / "step-00000002").iterdir()})

    logged: list[dict] = []
    summary = distill(teacher_dir, student, data_dir,
                      cfg(kd_weight=0.0, hidden_weight=1.0, steps=6, checkpoint_every=2, lr=3e-3),
                      out, seed=0, log_fn=lambda m, s: (logged.append(m), log(m, s)))
    h = [x["hidden_loss"] for x in logged]
    assert all(math.isfinite(x) for x in h) and h[-1] < h[0], h
    assert summary["hidden_loss"] == pytest.approx(h[-1]) and summary["kd_loss"] is None
    has_proj = "hidden_size" in shape
    assert ("projection.safetensors" in seen_ckpt[0]) == has_proj
    # the published student has exactly the student's tensors: the projection is not saved into it
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(student / "model.safetensors")))
    assert (out / "pruning.json").is_file()


def test_hidden_state_kd_into_a_student_of_another_family(tiny_factory, teacher_dir, data_dir, tmp_path):
    """A student the user brings (Qwen2, 3 layers, width 128; the teacher is a 4-layer Llama of width 256) has no
    pruning.json: student layer i imitates teacher layer round((i+1)*4/3)-1 and a fresh projection maps widths."""
    from compactlm.distillation.hidden import layer_map

    student = tiny_factory(arch="qwen2", num_hidden_layers=3)
    assert not (student / "pruning.json").exists() and layer_map(student, 3, 4) == [0, 2, 3]
    logged: list[dict] = []
    summary = distill(teacher_dir, student, data_dir, cfg(kd_weight=0.5, hidden_weight=1.0, steps=6, lr=3e-3),
                      tmp_path / "out", seed=0, log_fn=lambda m, s: logged.append(m))
    h = [x["hidden_loss"] for x in logged]
    assert all(math.isfinite(x) for x in h) and h[-1] < h[0], h
    assert math.isfinite(summary["kd_loss"])
    assert load_model(tmp_path / "out").config.model_type == "qwen2"
