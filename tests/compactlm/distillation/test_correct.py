"""Teacher correction and LoRA training: the corrected teacher is the teacher fine-tuned on the data (same shape and
files); with LoRA only low-rank adapters train and are merged into the published weights; a LoRA run resumes from
its checkpoint; a target that names no layer fails before training, naming the field."""

from __future__ import annotations

import json

import pytest
import torch

from compactlm.artifacts import is_complete
from compactlm.config import CorrectConfig
from compactlm.distillation import DistillError, correct_teacher, distill
from compactlm.models import count_params, load_model
from tests.helpers import kd_cfg, model_weights

SMALL = dict(steps=4, batch_size=2, seq_len=32, warmup_steps=1)


def test_lora_changes_the_default_learning_rate_unless_one_is_given():
    assert CorrectConfig().training().lr == 1e-5 and CorrectConfig().training().lora is None
    assert CorrectConfig(lora={}).training().lr == 2e-4
    assert CorrectConfig(lora={"rank": 4}, lr=1e-3).training().lora.rank == 4
    assert CorrectConfig(lora={"rank": 4}, lr=1e-3).training().lr == 1e-3


def test_full_correction_fine_tunes_every_weight_of_the_teacher(teacher_dir, data_dir, tmp_path):
    out = tmp_path / "corrected"
    summary = correct_teacher(teacher_dir, data_dir, CorrectConfig(**SMALL, lr=1e-3), out, seed=0)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == \
        json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"]
    assert (out / "tokenizer.json").is_file() and is_complete(out)
    before, after = model_weights(teacher_dir), model_weights(out)
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("q_proj.weight"))
    assert summary["loss"] < summary["initial_loss"] and summary["trainable_params"] == summary["params"]


def test_lora_correction_moves_only_the_adapted_weights_by_a_low_rank_update(teacher_dir, data_dir, tmp_path):
    out = tmp_path / "lora"
    cfg = CorrectConfig(**SMALL, lr=1e-2, lora={"rank": 2, "targets": ["q_proj", "down_proj"]})
    summary = correct_teacher(teacher_dir, data_dir, cfg, out, seed=0)
    before, after = model_weights(teacher_dir), model_weights(out)
    assert before.keys() == after.keys()  # merged: the teacher's architecture, no adapter keys or files
    assert not (out / "adapter_config.json").exists() and not any("lora" in k for k in after)
    adapted = [k for k in before if k.endswith(("q_proj.weight", "down_proj.weight"))]
    assert adapted
    for k in adapted:  # each adapted matrix moved, by an update of rank <= 2
        delta = (after[k] - before[k]).double()
        assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta, rtol=1e-6) <= 2, k
    assert all(torch.equal(before[k], after[k]) for k in before if k not in adapted)  # the rest is frozen
    teacher = load_model(teacher_dir)
    want = sum(2 * (m.in_features + m.out_features) for name, m in teacher.named_modules()
               if name.endswith(("q_proj", "down_proj")))
    assert summary["trainable_params"] == want and summary["params"] == count_params(teacher)


def test_a_lora_run_stopped_after_a_checkpoint_resumes_to_the_same_weights(teacher_dir, student_dir, data_dir,
                                                                          tmp_path):
    cfg = kd_cfg(steps=4, checkpoint_every=2, log_every=1, lora={"rank": 4})
    distill(teacher_dir, student_dir, data_dir, cfg, tmp_path / "ref", seed=1)
    calls = []

    def stop_at_step_three(metrics, step):
        calls.append(step)
        if len(calls) == 3:  # after the step-2 checkpoint
            raise KeyboardInterrupt

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        distill(teacher_dir, student_dir, data_dir, cfg, out, seed=1, log_fn=stop_at_step_three)
    assert not out.exists()
    summary = distill(teacher_dir, student_dir, data_dir, cfg, out, seed=1)
    assert summary["resumed_from"] == 2
    ref, resumed = model_weights(tmp_path / "ref"), model_weights(out)
    assert ref.keys() == resumed.keys() and all(torch.equal(ref[k], resumed[k]) for k in ref)


def test_lora_targets_that_name_no_layer_fail_before_training_naming_the_field(teacher_dir, data_dir, tmp_path):
    cfg = CorrectConfig(**SMALL, lora={"targets": ["qkv"]})
    with pytest.raises(DistillError, match=r"correct\.lora\.targets \['qkv'\].*q_proj"):
        correct_teacher(teacher_dir, data_dir, cfg, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()
