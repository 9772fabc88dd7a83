"""Short real training runs on tiny models: KD beats CE at matching the teacher, vocabularies, non-finite losses,
accumulation, FLOPs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from compactlm.artifacts import is_complete, read_manifest
from compactlm.config import DistillConfig
from compactlm.distillation import DistillError, distill
from compactlm.distillation.losses import (
    forward_kl,
)
from compactlm.distillation.step import lr_at as _lr_at
from compactlm.models import load_model, load_tokenizer
from tests.helpers import kd_cfg as cfg
from tests.helpers import nan_model, texts, write_generated


def test_config_validation_and_lr_schedule():
    with pytest.raises(ValueError, match="micro_batch_size"):
        DistillConfig(batch_size=4, micro_batch_size=3)
    with pytest.raises(ValueError, match="jsd_beta"):
        DistillConfig(jsd_beta=0.0)
    c = DistillConfig(steps=10, warmup_steps=2, lr=1.0, min_lr_ratio=0.1)
    lrs = [_lr_at(s, c) for s in range(10)]
    assert lrs[0] == pytest.approx(1 / 3) and lrs[1] == pytest.approx(2 / 3)
    assert lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] >= 0.1


@pytest.fixture(scope="module")
def kd_and_ce_runs(teacher_dir, student_dir, data_dir, tmp_path_factory) -> dict:
    """The same student trained 8 steps with KD only and with CE only (same data, seed, schedule)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, kd_weight in (("kd", 1.0), ("ce", 0.0)):
        logged: list[tuple[dict, int]] = []
        summary = distill(teacher_dir, student_dir, data_dir, cfg(kd_weight=kd_weight, steps=8, log_every=2),
                          root / name, seed=1, log_fn=lambda m, s, out=logged: out.append((m, s)))
        runs[name] = {"summary": summary, "logged": logged, "out": root / name}
    return runs


def test_distill_lowers_kd_loss_and_publishes_a_loadable_model(kd_and_ce_runs, student_dir):
    from transformers import AutoModelForCausalLM

    run = kd_and_ce_runs["kd"]
    logged, summary, out = run["logged"], run["summary"], run["out"]
    assert [s for _, s in logged] == [2, 4, 6, 8]
    for m, _ in logged:
        assert {"loss", "kd_loss", "ce_loss", "lr", "grad_norm", "tokens_per_s"} <= set(m)
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert logged[-1][0]["kd_loss"] < 0.9 * logged[0][0]["kd_loss"]
    assert summary["loss"] == pytest.approx(summary["kd_loss"])  # kd_weight = 1
    assert summary["tokens"] == 8 * 2 * 32 and 0 < summary["loss_tokens"] < summary["tokens"]

    assert is_complete(out)
    man = read_manifest(out)
    assert man["stage"] == "distill" and man["metrics"]["steps"] == 8 and man["config"]["steps"] == 8
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6, 8]
    assert lines[-1]["kd_loss"] == pytest.approx(logged[-1][0]["kd_loss"])
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert model.config.num_hidden_layers == 2
    before = load_model(student_dir)
    assert not torch.equal(model.model.embed_tokens.weight, before.model.embed_tokens.weight)


def test_kd_weight_zero_is_plain_fine_tuning(kd_and_ce_runs):
    run = kd_and_ce_runs["ce"]
    logged, summary = [m for m, _ in run["logged"]], run["summary"]
    assert all("kd_loss" not in m for m in logged) and summary["kd_loss"] is None
    assert summary["loss"] == pytest.approx(summary["ce_loss"])
    assert logged[-1]["ce_loss"] < logged[0]["ce_loss"]
    assert read_manifest(run["out"])["sequence_level"] is True


def test_kd_student_is_closer_to_teacher_than_ce_student(kd_and_ce_runs, teacher_dir, student_dir):
    """Same student, data, seed and steps: KD must beat CE at matching the teacher on held-out text."""
    tok = load_tokenizer(student_dir)
    held = " ".join(p + " " + c for p, c in texts(6, offset=100))
    ids = torch.tensor([tok(held)["input_ids"][:128]])
    with torch.no_grad():
        t = load_model(teacher_dir)(ids).logits
        kl = {name: forward_kl(load_model(run["out"])(ids).logits, t).item() for name, run in kd_and_ce_runs.items()}
        kl["init"] = forward_kl(load_model(student_dir)(ids).logits, t).item()
    assert kl["kd"] < 0.95 * kl["ce"] and kl["kd"] < 0.95 * kl["init"], kl


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory) -> Path:
    """A tiny Llama with its own 1,000-token vocabulary and no tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("other-vocab")
    c = LlamaConfig(vocab_size=1000, hidden_size=64, num_attention_heads=1, num_key_value_heads=1, head_dim=64,
                    num_hidden_layers=1, intermediate_size=128)
    AutoModelForCausalLM.from_config(c).save_pretrained(out)
    return out


def test_vocab_mismatch_fails_early_and_points_to_sequence_level_kd(other_vocab_dir, student_dir, data_dir,
                                                                     tmp_path):
    with pytest.raises(DistillError, match=r"share a vocabulary.*kd_weight=0"):
        distill(other_vocab_dir, student_dir, data_dir, cfg(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # sequence-level KD does not need the teacher's vocabulary: the text is re-tokenized for the student
    summary = distill(other_vocab_dir, student_dir, data_dir, cfg(kd_weight=0.0, steps=1, warmup_steps=0),
                      tmp_path / "seq")
    assert read_manifest(tmp_path / "seq")["retokenized"] is True and math.isfinite(summary["loss"])


def test_non_finite_loss_stops_and_publishes_nothing(teacher_dir, student_dir, data_dir, tmp_path):
    broken = nan_model(student_dir, tmp_path / "broken")
    with pytest.raises(FloatingPointError, match="non-finite"):
        distill(teacher_dir, broken, data_dir, cfg(steps=2), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_small_data_cycles_deterministically_with_micro_batches(teacher_dir, student_dir, tmp_path):
    small = write_generated(tmp_path / "small", load_tokenizer(student_dir), texts(1))  # ~3 rows of 16 tokens
    c = dict(steps=1, batch_size=4, seq_len=16, warmup_steps=0)
    a = distill(teacher_dir, student_dir, small, cfg(**c), tmp_path / "a", seed=3)
    b = distill(teacher_dir, student_dir, small, cfg(**c, micro_batch_size=2), tmp_path / "b", seed=3)
    assert a["epochs"] > 1  # 4 rows drawn from ~3
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # accumulation == one big batch
    wa, wb = load_model(tmp_path / "a").model.norm.weight, load_model(tmp_path / "b").model.norm.weight
    torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-6)  # same seed, same rows, same update


def test_flops_per_token_by_hand_and_mfu_logged_when_peak_known(teacher_dir, student_dir, data_dir, tmp_path):
    from compactlm.distillation.flops import forward_flops_per_token, peak_flops, train_flops_per_token

    conf = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 16, "vocab_size": 10}
    # per layer: q,o 8x8 each + k,v 8x4 each = 192 MACs, MLP 3x8x16 = 384 MACs, scores 2 x 2 heads x 4 x 5 ctx
    per_layer = 2 * (192 + 384) + 2 * 2 * 2 * 4 * 5
    assert forward_flops_per_token(conf, 5) == 2 * per_layer + 2 * 8 * 10
    assert train_flops_per_token(conf, 5, conf) == 4 * forward_flops_per_token(conf, 5)
    assert peak_flops("cpu") is None and peak_flops("cpu", 2.0) == 2e12

    logged: list[dict] = []
    distill(teacher_dir, student_dir, data_dir, cfg(steps=2, peak_tflops=0.5), tmp_path / "o", seed=0,
            log_fn=lambda m, s: logged.append(m))
    assert all(m["model_tflops"] > 0 and m["mfu"] == pytest.approx(m["model_tflops"] / 0.5) for m in logged)
    logged.clear()
    distill(teacher_dir, student_dir, data_dir, cfg(steps=1), tmp_path / "p", seed=0,
            log_fn=lambda m, s: logged.append(m))
    assert "mfu" not in logged[0] and logged[0]["model_tflops"] > 0  # CPU peak unknown: no MFU


def test_skip_rows_continues_the_data_order_where_an_earlier_stage_stopped(teacher_dir, student_dir, data_dir,
                                                                           tmp_path):
    """A schedule's later round passes over the rows earlier rounds trained on: with a negligible learning rate
    (the weights stay put), its per-step losses are the uninterrupted run's later steps, on the same rows."""
    def losses(out: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]

    c = dict(lr=1e-12, warmup_steps=0, log_every=1)
    distill(teacher_dir, student_dir, data_dir, cfg(steps=4, **c), tmp_path / "whole", seed=5)
    distill(teacher_dir, student_dir, data_dir, cfg(steps=2, skip_rows=2 * 2, **c), tmp_path / "later", seed=5)
    whole, later = losses(tmp_path / "whole"), losses(tmp_path / "later")
    assert later == pytest.approx(whole[2:], rel=1e-5)
    assert whole[:2] != pytest.approx(later, rel=1e-3)  # not merely the same rows again
