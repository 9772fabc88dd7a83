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
    chunked_cross_entropy, forward_kl, generalized_jsd, hidden_state_loss, kd_loss, reverse_kl, topk_kd_loss,
    total_variation,
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


# ============================================================================== round 2: checkpoints / resume

def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _curve(out: Path) -> list[dict]:
    """train_log.jsonl without the timing fields (which differ run to run)."""
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in ("tokens_per_s", "model_tflops", "mfu")} for x in lines]


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from compactlm.config import DistillConfig
from compactlm.distillation import distill
teacher, student, data, out = sys.argv[1:5]
cfg = DistillConfig.model_validate_json(sys.argv[5])
distill(teacher, student, data, cfg, out, seed=1, log_fn=lambda m, s: time.sleep(0.4))
"""


@pytest.mark.integration  # a subprocess and three short runs: ~25 s idle, much more on a loaded machine
def test_sigkill_then_rerun_resumes_bit_identically(teacher_dir, student_dir, data_dir, tmp_path):
    """A real SIGKILL after a checkpoint; the re-run resumes and matches an uninterrupted run bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from compactlm.distillation.checkpoint import checkpoint_root

    c = cfg(steps=8, checkpoint_every=2, log_every=1)
    ref = distill(teacher_dir, student_dir, data_dir, c, tmp_path / "ref", seed=1)
    assert ref["resumed_from"] == 0 and not checkpoint_root(tmp_path / "ref").exists()  # removed on success

    out = tmp_path / "killed"
    root = checkpoint_root(out)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(teacher_dir), str(student_dir), str(data_dir),
                             str(out), c.model_dump_json()], env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        deadline = time.monotonic() + 240
        # A checkpoint is published by a rename and the older ones are pruned just after it (a kill in between
        # legitimately leaves both; resume takes the newest). Wait until exactly one checkpoint of step >= 4 is
        # left, so this also checks the pruning.
        def steps() -> list[str]:
            return sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []
        while not (len(steps()) == 1 and steps()[0] >= "step-00000004"):
            assert proc.poll() is None, "distill subprocess ended before its step-4 checkpoint"
            assert time.monotonic() < deadline, f"no single pruned checkpoint >= step 4 within 240 s: {steps()}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing published
    (root / ".tmp-step-00000006-deadbeef").mkdir()  # as if killed mid-write: must be ignored and cleaned

    logged: list[int] = []
    resumed = distill(teacher_dir, student_dir, data_dir, c, out, seed=1, log_fn=lambda m, s: logged.append(s))
    assert resumed["resumed_from"] in (4, 6)
    assert logged == list(range(resumed["resumed_from"] + 1, 9))  # only the new steps are reported
    assert not root.exists()
    a, b = _weights(tmp_path / "ref"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _curve(out) == _curve(tmp_path / "ref")
    assert resumed["loss"] == ref["loss"] and resumed["initial_loss"] == ref["initial_loss"]
    assert resumed["tokens"] == ref["tokens"] and resumed["loss_tokens"] == ref["loss_tokens"]


def test_non_finite_loss_keeps_last_good_checkpoint_and_rerun_resumes(teacher_dir, student_dir, data_dir,
                                                                       tmp_path, monkeypatch):
    from compactlm.distillation import checkpoint as ckpt
    from compactlm.distillation import losses

    real, calls = losses.kd_loss, {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        value = real(*a, **kw)
        return value * float("nan") if calls["n"] == 4 else value

    monkeypatch.setattr(losses, "kd_loss", flaky)
    c = cfg(steps=5, checkpoint_every=2)
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        distill(teacher_dir, student_dir, data_dir, c, out, seed=2)
    root = ckpt.checkpoint_root(out)
    assert not out.exists() and [p.name for p in root.iterdir()] == ["step-00000002"]
    assert all(torch.isfinite(t).all() for t in _weights_from(root / "step-00000002" / "student.safetensors"))

    monkeypatch.setattr(losses, "kd_loss", real)
    again = distill(teacher_dir, student_dir, data_dir, c, out, seed=2)
    assert again["resumed_from"] == 2 and is_complete(out)
    # a checkpoint of another run is not resumed; this fresh run is also the uninterrupted reference
    other = tmp_path / "other"
    ckpt.save(ckpt.checkpoint_root(other), 3, {"student": load_model(student_dir)},
              torch.optim.AdamW(load_model(student_dir).parameters()), {"fingerprint": "not-this-run"})
    fresh = distill(teacher_dir, student_dir, data_dir, c, other, seed=2)
    assert fresh["resumed_from"] == 0
    a, b = _weights(other), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a) and _curve(out) == _curve(other)


def _weights_from(path: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(str(path)).values())


# ============================================================================================= offline KD

@pytest.fixture(scope="module")
def topk_data_dir(teacher_dir, tmp_path_factory) -> Path:
    """The sharp tiny teacher answers 24 built-in prompts with HF generate, storing its top-20 log-probs."""
    from compactlm.config import GenerateConfig
    from compactlm.generation import generate_dataset

    out = tmp_path_factory.mktemp("gen-topk") / "ds"
    gc = GenerateConfig(engine="hf", topk_logprobs=20, max_prompts=24, max_tokens=24, n=1, shard_size=8,
                        min_tokens=1)
    generate_dataset(teacher_dir, gc, out, seed=0, progress=False)
    return out


def test_stored_topk_match_a_teacher_forward(topk_data_dir, teacher_dir):
    """Generation contract: topk row t is the teacher's distribution of completion token t (raw log-probs)."""
    from compactlm.datasets import read_generated

    teacher = load_model(teacher_dir)
    rows = read_generated(topk_data_dir)[:4]
    for r in rows:
        p, c = r["prompt_token_ids"], r["completion_token_ids"]
        with torch.no_grad():
            logp = F.log_softmax(teacher(torch.tensor([p + c])).logits[0].float(), -1)
        pred = logp[len(p) - 1:len(p) - 1 + len(c)]  # logits at t predict token t + 1
        ids, lps = torch.tensor(r["topk_ids"]), torch.tensor(r["topk_logprobs"], dtype=torch.float32)
        assert ids.shape == (len(c), 20)
        torch.testing.assert_close(pred.gather(-1, ids), lps, atol=3e-2, rtol=1e-2)


def test_packing_carries_topk_for_completion_positions(tmp_path, student_dir):
    """Synthetic top-k whose first id is the token itself: after packing, every completion position's target
    row must describe the token at that position; prompt positions carry filler and mask 0."""
    from compactlm.datasets import iter_examples, pack
    from compactlm.distillation.data import pack_with_topk

    tok = load_tokenizer(student_dir)
    ds = write_generated(tmp_path / "ds", tok, texts(12), shard_rows=5)
    for shard in sorted((ds / "data").glob("*.parquet")):
        t = pq.read_table(shard)
        ids = [[[x, x + 1, x + 2] for x in row] for row in t.column("completion_token_ids").to_pylist()]
        lps = [[[-0.1, -2.5, -3.0] for _ in row] for row in ids]
        t = t.append_column("topk_ids", pa.array(ids, pa.list_(pa.list_(pa.int32()))))
        t = t.append_column("topk_logprobs", pa.array(lps, pa.list_(pa.list_(pa.float16()))))
        pq.write_table(t, shard)
    packed = pack_with_topk(ds, 16, seed=5)
    ref_ids, ref_mask = pack(list(iter_examples(ds)), 16, seed=5)
    assert torch.equal(packed.ids, ref_ids) and torch.equal(packed.mask, ref_mask)  # same rows as online
    on = packed.mask.bool()
    assert packed.topk_ids.shape == (*packed.ids.shape, 3) and packed.topk_logprobs.dtype == torch.float16
    assert torch.equal(packed.topk_ids[..., 0][on], packed.ids[on].int())
    assert torch.equal(packed.topk_ids[..., 2][on], packed.ids[on].int() + 2)
    assert (packed.topk_ids[~on] == 0).all()


@pytest.mark.parametrize("kind", list(KINDS))
def test_topk_loss_with_all_but_one_id_equals_full_kd(kind):
    """k = V - 1: the rest bucket is the single remaining id, so the coarse loss is the full-vocabulary one."""
    torch.manual_seed(0)
    V = 13
    s, t = (torch.randn(2, 5, V) * 2).requires_grad_(True), torch.randn(2, 5, V) * 2
    mask = torch.rand(2, 5) > 0.3
    t_logp = F.log_softmax(t, -1)
    lp, ids = t_logp.topk(V - 1, dim=-1)
    for T in (1.0, 2.0):
        ref = kd_loss(s, t, mask, kind, T)
        got = topk_kd_loss(s, ids, lp, mask, kind, T, chunk_size=3)
        assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
        (g_ref,), (g,) = torch.autograd.grad(ref, s), torch.autograd.grad(got, s)
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-6)


def test_topk_loss_hand_worked_rest_bucket_and_lower_bound():
    # teacher p = [.5, .3, .2] stored as top-1 {id 0: log .5}: coarse p = [.5, .5 (rest)]
    # student q = [.25, .25, .5] -> coarse q = [.25, .75]; KL = .5 ln(.5/.25) + .5 ln(.5/.75)
    s = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    got = topk_kd_loss(s, torch.tensor([[0]]), torch.log(torch.tensor([[0.5]])).half(), None)
    assert got.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), rel=1e-3)
    # the coarse KL never exceeds the full KL (data processing), for any k
    torch.manual_seed(1)
    s, t = torch.randn(64, 50) * 3, torch.randn(64, 50) * 3
    full = forward_kl(s, t).item()
    for k in (1, 5, 20, 49):
        lp, ids = F.log_softmax(t, -1).topk(k, dim=-1)
        assert topk_kd_loss(s, ids, lp, None).item() <= full + 1e-5
    # fp16-rounded top-k whose mass reaches 1 (a one-hot teacher) stays finite
    lp = torch.zeros(3, 1, dtype=torch.float16)
    assert math.isfinite(topk_kd_loss(torch.randn(3, 50), torch.zeros(3, 1, dtype=torch.long), lp, None).item())
    with pytest.raises(ValueError, match="leading shape"):
        topk_kd_loss(torch.randn(2, 4, 50), torch.zeros(2, 3, 5, dtype=torch.long), torch.zeros(2, 3, 5), None)


def test_offline_loss_close_to_online_topk_loss_and_training_lowers_it(topk_data_dir, teacher_dir, student_dir,
                                                                        tmp_path):
    from compactlm.datasets import read_generated

    student, teacher = load_model(student_dir), load_model(teacher_dir)
    offline, online_topk, online_full = [], [], []
    for r in read_generated(topk_data_dir)[:6]:  # one example at a time: the context the teacher had
        p, c = r["prompt_token_ids"], r["completion_token_ids"]
        ids = torch.tensor([p + c])
        m = torch.tensor([[0] * (len(p) - 1) + [1] * len(c)], dtype=torch.bool)  # positions predicting c
        with torch.no_grad():
            s = student(ids).logits[:, :-1]
            t_logp = F.log_softmax(teacher(ids).logits[:, :-1].float(), -1)
        stored_ids = torch.zeros(1, len(p) + len(c) - 1, 20, dtype=torch.long)
        stored_lp = torch.zeros(1, len(p) + len(c) - 1, 20, dtype=torch.float16)
        stored_ids[0, len(p) - 1:] = torch.tensor(r["topk_ids"])
        stored_lp[0, len(p) - 1:] = torch.tensor(r["topk_logprobs"], dtype=torch.float16)
        lp, tk = t_logp.topk(20, dim=-1)
        offline.append(topk_kd_loss(s, stored_ids, stored_lp, m).item())
        online_topk.append(topk_kd_loss(s, tk, lp, m).item())
        online_full.append(kd_loss(s, t_logp, m).item())
    # differences: fp16 storage and batched (left-padded, cached) generation numerics only
    assert sum(offline) == pytest.approx(sum(online_topk), rel=0.02), (offline, online_topk)
    assert all(a <= b + 1e-5 for a, b in zip(online_topk, online_full))

    # a short offline run: the teacher is never loaded (its directory has no weights at all)
    stub = tmp_path / "teacher-stub"
    stub.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (stub / name).write_bytes((teacher_dir / name).read_bytes())
    logged: list[dict] = []
    summary = distill(stub, student_dir, topk_data_dir, cfg(mode="offline", steps=8, seq_len=64, temperature=1.0),
                      tmp_path / "off", seed=0, log_fn=lambda mm, st: logged.append(mm))
    assert logged[-1]["kd_loss"] < 0.9 * logged[0]["kd_loss"], [x["kd_loss"] for x in logged]
    assert summary["loss"] == pytest.approx(summary["kd_loss"]) and is_complete(tmp_path / "off")


def test_offline_mode_needs_topk_data_and_no_hidden(teacher_dir, student_dir, data_dir, tmp_path):
    with pytest.raises(DistillError, match="topk_logprobs"):
        distill(teacher_dir, student_dir, data_dir, cfg(mode="offline"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="hidden_weight"):
        DistillConfig(mode="offline", hidden_weight=1.0)


# ======================================================================================== hidden-state KD

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


def test_hidden_state_loss_values():
    a = torch.randn(2, 3, 8)
    assert hidden_state_loss(a, a * 3.0, None, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state_loss(a, -a, None, "cosine").item() == pytest.approx(2.0, abs=1e-6)
    mask = torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    assert hidden_state_loss(a, a + 2.0, mask, "mse").item() == pytest.approx(4.0, rel=1e-6)
    with pytest.raises(ValueError, match="project"):
        hidden_state_loss(a, torch.randn(2, 3, 9), None)


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


# ========================================================================================= data parallel

DDP_SCRIPT = """
import json, os, sys
from compactlm.config import DistillConfig
from compactlm.distillation import distill
teacher, student, data, out = sys.argv[1:5]
cfg = DistillConfig.model_validate_json(sys.argv[5])
summary = distill(teacher, student, data, cfg, out, seed=4)
print("RESULT " + json.dumps({"rank": int(os.environ["RANK"]), **summary}), flush=True)
"""


@pytest.mark.integration  # two torchrun processes (gloo) + a reference run
def test_torchrun_two_cpu_processes_match_single_process(teacher_dir, student_dir, data_dir, tmp_path):
    import os
    import subprocess
    import sys

    c = cfg(steps=3, batch_size=4, micro_batch_size=1, hidden_weight=0.5)
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(teacher_dir),
                           str(student_dir), str(data_dir), str(tmp_path / "ddp"), c.model_dump_json()],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path.cwd()), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["ranks_in_sync"] for r in results)  # identical weights on both ranks
    assert results[0]["loss"] == pytest.approx(results[1]["loss"])  # all-reduced metrics
    assert is_complete(tmp_path / "ddp")

    single = distill(teacher_dir, student_dir, data_dir, c, tmp_path / "single", seed=4)
    assert results[0]["loss"] == pytest.approx(single["loss"], rel=1e-4)
    assert results[0]["tokens"] == single["tokens"] and results[0]["loss_tokens"] == single["loss_tokens"]
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_corpus_dataset_makes_plain_text_trainable(teacher_dir, student_dir, tmp_path):
    """A plain-text corpus becomes a dataset in the generated format (empty prompts, every token in the loss)
    that distill fine-tunes on with CE; bad input fails early and writes nothing."""
    from compactlm.datasets import corpus_dataset, iter_examples

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog number {i}."
                                for i in range(200)))
    out = tmp_path / "corpus"
    m = corpus_dataset(text, student_dir, out, max_tokens=700, seed=3, doc_tokens=8)
    ex = list(iter_examples(out))
    assert m["stats"]["tokens"] == 700 == sum(len(ids) for ids, _ in ex)
    assert all(len(ids) <= 8 and mask == [1] * len(ids) for ids, mask in ex)
    again = tmp_path / "again"
    corpus_dataset(text, student_dir, again, max_tokens=700, seed=3, doc_tokens=8)
    assert list(iter_examples(again)) == ex  # seeded
    res = distill(teacher_dir, student_dir, out, cfg(steps=4, kd_weight=0.0), tmp_path / "ft", seed=0)
    # every position but each row's first predicts a next token that counts in the loss
    assert res["loss_tokens"] == res["tokens"] - res["tokens"] // 32 and res["loss"] < res["initial_loss"]
    with pytest.raises(ValueError, match="max_tokens"):
        corpus_dataset(text, student_dir, tmp_path / "bad", max_tokens=0)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        corpus_dataset(tmp_path / "empty.txt", student_dir, tmp_path / "bad", max_tokens=10)
    assert not (tmp_path / "bad").exists()


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


def test_observation_settings_are_not_in_the_stage_key():
    from tasks.common import stage_key_material

    base = stage_key_material(cfg(), 0)
    assert stage_key_material(cfg(log_every=5, checkpoint_every=2, peak_tflops=989), 0) == base
    assert stage_key_material(cfg(lr=1e-3), 0) != base and stage_key_material(cfg(), 1) != base
    assert "log_every" not in base["config"] and "steps" in base["config"]
