"""Distillation: the KD losses against hand-worked values, and short real training runs on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from compactlm.artifacts import is_complete, read_manifest
from compactlm.config import DistillConfig
from compactlm.distillation import distill
from compactlm.distillation.losses import (
    chunked_cross_entropy, forward_kl, generalized_jsd, kd_loss, reverse_kl, total_variation,
)
from compactlm.distillation.trainer import DistillError, _lr_at
from compactlm.models import load_model, load_tokenizer

KINDS = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd, "tv": total_variation}

# ------------------------------------------------------------------------------------------ test data

SUBJECTS = ["The river", "A small robot", "My neighbour", "The old library", "Our team", "The red fox",
            "A quiet village", "The teacher", "This recipe", "The spacecraft", "A young cat", "The museum"]
VERBS = ["opens early on", "was built during", "talks about", "likes to walk on", "is famous for",
         "often forgets about", "was repaired on", "celebrates", "looks beautiful on"]
OBJECTS = ["sunny mornings", "the winter festival", "rainy weekends", "the long summer", "quiet evenings",
           "market days", "the first of May", "holidays by the sea"]


def texts(n: int, offset: int = 0) -> list[tuple[str, str]]:
    """n deterministic (prompt, completion) pairs."""
    out = []
    for i in range(offset, offset + n):
        s, v, o = SUBJECTS[i % len(SUBJECTS)], VERBS[(i * 7) % len(VERBS)], OBJECTS[(i * 5) % len(OBJECTS)]
        prompt = f"Write one sentence about {s.lower()}."
        completion = (f"{s} {v} {o}. Many people say that {s.lower()} {v} {OBJECTS[(i + 3) % len(OBJECTS)]}, "
                      f"and everyone agrees it is true.")
        out.append((prompt, completion))
    return out


def write_generated(out: Path, tokenizer, pairs: list[tuple[str, str]], shard_rows: int = 16) -> Path:
    """A generated dataset directory in the stage contract format (parquet shards + manifest)."""
    (out / "data").mkdir(parents=True)
    rows = []
    for pid, (prompt, completion) in enumerate(pairs):
        prompt_text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"id": f"{pid}-0", "prompt_id": pid, "sample": 0, "prompt": prompt, "prompt_text": prompt_text,
                     "completion": completion, "prompt_token_ids": p_ids, "completion_token_ids": c_ids,
                     "finish_reason": "stop"})
    schema = pa.schema([("id", pa.string()), ("prompt_id", pa.int64()), ("sample", pa.int64()),
                        ("prompt", pa.string()), ("prompt_text", pa.string()), ("completion", pa.string()),
                        ("prompt_token_ids", pa.list_(pa.int32())), ("completion_token_ids", pa.list_(pa.int32())),
                        ("finish_reason", pa.string())])
    for k in range(0, len(rows), shard_rows):
        table = pa.Table.from_pylist(rows[k:k + shard_rows], schema=schema)
        pq.write_table(table, out / "data" / f"shard-{k // shard_rows:05d}.parquet")
    (out / "manifest.json").write_text(json.dumps({"stage": "generate", "rows": len(rows)}))
    return out


@pytest.fixture(scope="module")
def student_dir(tiny_factory) -> Path:
    return tiny_factory(num_hidden_layers=2)


@pytest.fixture(scope="module")
def teacher_dir(tiny_gqa_model_dir, tmp_path_factory) -> Path:
    """The GQA tiny model with a 5x sharper output head, so the teacher has opinions worth distilling."""
    out = tmp_path_factory.mktemp("sharp-teacher")
    model = load_model(tiny_gqa_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    model.save_pretrained(out)
    load_tokenizer(tiny_gqa_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, student_dir) -> Path:
    return write_generated(tmp_path_factory.mktemp("gen") / "ds", load_tokenizer(student_dir), texts(40))


def cfg(**kw) -> DistillConfig:
    base = dict(steps=6, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, chunk_size=20)
    return DistillConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ losses

@pytest.mark.parametrize("kind", list(KINDS))
def test_identical_distributions_give_zero(kind):
    logits = torch.randn(2, 5, 11) * 3
    assert KINDS[kind](logits, logits.clone(), temperature=1.7).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, logits.clone(), None, kind, 1.7, chunk_size=3).item() == pytest.approx(0.0, abs=1e-6)


def test_hand_worked_two_token_example():
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))   # p
    student = torch.log(torch.tensor([[0.25, 0.75]]))  # q
    # KL(p||q) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3)
    assert forward_kl(student, teacher).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    # KL(q||p) = .25 ln(.25/.5) + .75 ln(.75/.5)
    assert reverse_kl(student, teacher).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5),
                                                                 rel=1e-5)
    assert total_variation(student, teacher).item() == pytest.approx(0.25, rel=1e-6)
    # JSD(0.5): m = [.375, .625]
    m = [0.375, 0.625]
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) \
        + 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert generalized_jsd(student, teacher, beta=0.5).item() == pytest.approx(jsd, rel=1e-5)


def test_forward_kl_matches_torch_kl_div():
    s, t = torch.randn(3, 4, 17), torch.randn(3, 4, 17)
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    assert forward_kl(s, t).item() == pytest.approx(ref.item(), rel=1e-5)
    assert reverse_kl(s, t).item() == pytest.approx(forward_kl(t, s).item(), rel=1e-5)


def test_jsd_symmetric_at_half_and_bounded_by_log2():
    s, t = torch.randn(4, 6, 13) * 4, torch.randn(4, 6, 13) * 4
    assert generalized_jsd(s, t, beta=0.5).item() == pytest.approx(generalized_jsd(t, s, beta=0.5).item(), rel=1e-5)
    assert generalized_jsd(s, t, beta=0.2).item() != pytest.approx(generalized_jsd(t, s, beta=0.2).item(), rel=1e-3)
    # disjoint one-hot distributions reach the bound log 2; nothing exceeds it
    far_s = torch.full((1, 13), -1e4).index_fill(1, torch.tensor([0]), 1e4)
    far_t = torch.full((1, 13), -1e4).index_fill(1, torch.tensor([5]), 1e4)
    assert generalized_jsd(far_s, far_t).item() == pytest.approx(math.log(2), rel=1e-4)
    for beta in (0.1, 0.5, 0.9):
        assert generalized_jsd(s * 10, t * 10, beta=beta).item() <= math.log(2) + 1e-6
    assert total_variation(far_s, far_t).item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_temperature_softens_both_and_scales_by_t_squared(kind):
    s, t = torch.randn(2, 3, 9) * 2, torch.randn(2, 3, 9) * 2
    T = 2.5
    expected = T**2 * KINDS[kind](s / T, t / T, temperature=1.0)
    assert KINDS[kind](s, t, temperature=T).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(s, t, None, kind, T, chunk_size=2).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_masked_tokens_are_ignored(kind):
    s, t = torch.randn(2, 6, 10), torch.randn(2, 6, 10)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    expected = KINDS[kind](s[mask], t[mask])  # only the 5 selected tokens, flattened
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = 1e3 * torch.randn_like(s2[~mask]), float("nan")  # garbage where the mask is off
    assert KINDS[kind](s, t, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(s2, t2, mask, kind, chunk_size=2).item() == pytest.approx(expected.item(), rel=1e-5)
    assert KINDS[kind](s, t, mask.long()).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_chunked_equals_unchunked_value_and_gradient(kind):
    torch.manual_seed(0)
    s = (torch.randn(3, 7, 23) * 2).requires_grad_(True)
    t = torch.randn(3, 7, 23) * 2
    mask = torch.rand(3, 7) > 0.3
    ref = KINDS[kind](s, t, mask, temperature=1.5)
    (g_ref,) = torch.autograd.grad(ref, s)
    for chunk in (1, 4, 1000):
        out = kd_loss(s, t, mask, kind, temperature=1.5, chunk_size=chunk)
        (g,) = torch.autograd.grad(out, s)
        assert out.item() == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)


def test_bf16_logits_are_upcast_and_empty_mask_is_zero():
    s, t = torch.randn(2, 4, 50), torch.randn(2, 4, 50)
    ref = forward_kl(s, t)
    got = kd_loss(s.bfloat16(), t.bfloat16(), None, "forward_kl", chunk_size=3)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=2e-2)
    s.requires_grad_(True)
    zero = kd_loss(s, t, torch.zeros(2, 4, dtype=torch.bool))
    zero.backward()
    assert zero.item() == 0.0 and torch.all(s.grad == 0)


def test_chunked_cross_entropy_matches_torch():
    logits, labels = torch.randn(2, 5, 31), torch.randint(0, 31, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 1]], dtype=torch.bool)
    ref = F.cross_entropy(logits[mask], labels[mask])
    assert chunked_cross_entropy(logits, labels, mask, chunk_size=2).item() == pytest.approx(ref.item(), rel=1e-5)


def test_loss_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="shared vocabulary"):
        kd_loss(torch.randn(2, 10), torch.randn(2, 12), None)
    with pytest.raises(ValueError, match="unknown KD loss kind"):
        kd_loss(torch.randn(2, 10), torch.randn(2, 10), None, kind="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="jsd_beta"):
        kd_loss(torch.randn(2, 10), torch.randn(2, 10), None, kind="jsd", jsd_beta=1.0)


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


# ------------------------------------------------------------------------------------------------ trainer
# Every training step costs a 49k-vocabulary softmax on a slow shared CPU: runs are few, short and shared.

@pytest.fixture(scope="module")
def kd_and_ce_runs(teacher_dir, student_dir, data_dir, tmp_path_factory) -> dict:
    """The same student trained 8 steps with KD only and with CE only (same data, seed, schedule)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, kd_weight in (("kd", 1.0), ("ce", 0.0)):
        logged: list[tuple[dict, int]] = []
        summary = distill(teacher_dir, student_dir, data_dir, cfg(kd_weight=kd_weight, steps=8, log_every=2),
                          root / name, seed=1, log_fn=lambda m, s: logged.append((m, s)))
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
    broken = tmp_path / "broken"
    model = load_model(student_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    load_tokenizer(student_dir).save_pretrained(broken)
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
