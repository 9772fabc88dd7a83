"""Training data mixed by tokens: shares as requested, deterministic for a seed, resumable, clear errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from compactlm.config import DataConfig
from compactlm.formats.generated import read_rows
from compactlm.mixture import build_mixture
from tests.helpers import texts


@pytest.fixture(scope="module")
def sources(tmp_path_factory, data_dir):
    """A generated set (data_dir), a plain-text corpus and an instruction file."""
    root = tmp_path_factory.mktemp("sources")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"Chapter {i}. " + " ".join(f"{p} {c}" for p, c in texts(3, offset=i))
                                  for i in range(30)))
    instructions = root / "instructions.jsonl"
    instructions.write_text("".join(json.dumps({"instruction": p, "input": "", "output": c}) + "\n"
                                    for p, c in texts(25, offset=50)))
    return {"generated": data_dir, "text": corpus, "instructions": instructions}


def _cfg(sources, weights=(0.5, 0.3, 0.2), **kw) -> DataConfig:
    return DataConfig(sources=[
        {"kind": "generated", "weight": weights[0]},
        {"kind": "text", "path": str(sources["text"]), "weight": weights[1]},
        {"kind": "instructions", "path": str(sources["instructions"]), "prompt_field": "instruction",
         "input_field": "input", "response_field": "output", "weight": weights[2]},
    ], **kw)


def _token_shares(out) -> dict[str, float]:
    counts: Counter = Counter()
    for r in read_rows(out, ["source", "prompt_token_ids", "completion_token_ids"]):
        counts[r["source"]] += len(r["prompt_token_ids"]) + len(r["completion_token_ids"])
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}


def test_three_sources_get_their_share_of_the_tokens(sources, teacher_dir, tmp_path):
    cfg = _cfg(sources, doc_tokens=48)
    manifest = build_mixture(cfg, teacher_dir, tmp_path / "mix", tokens=12_000, generated_dir=sources["generated"],
                             seed=3)
    shares = _token_shares(tmp_path / "mix")
    requested = {"0:generated": 0.5, "1:text": 0.3, "2:instructions": 0.2}
    assert set(shares) == set(requested)
    for label, want in requested.items():
        assert abs(shares[label] - want) <= 0.02, (label, shares)
    stats = {s["label"]: s for s in manifest["sources"]}
    assert all(abs(stats[k]["share"] - shares[k]) < 1e-9 for k in shares)
    assert stats["0:generated"]["epochs"] >= 2  # 40 rows of ~40 tokens < 6,000: read again in a new order
    assert manifest["tokens"] >= 12_000 and manifest["topk_logprobs"] == 0
    rows = read_rows(tmp_path / "mix")
    text_rows = [r for r in rows if r["source"] == "1:text"]
    assert all(r["prompt_token_ids"] == [] and 0 < len(r["completion_token_ids"]) <= 48 for r in text_rows)
    instr = next(r for r in rows if r["source"] == "2:instructions")
    assert f"<|im_start|>user\n{instr['prompt']}<|im_end|>" in instr["prompt_text"]  # the teacher's chat format
    assert instr["prompt_text"].endswith("<|im_start|>assistant\n") and instr["finish_reason"] == "stop"


def test_a_mixture_is_the_same_for_the_same_seed(sources, teacher_dir, tmp_path):
    cfg = _cfg(sources)
    build_mixture(cfg, teacher_dir, tmp_path / "a", tokens=3000, generated_dir=sources["generated"], seed=1)
    build_mixture(cfg, teacher_dir, tmp_path / "b", tokens=3000, generated_dir=sources["generated"], seed=1)
    build_mixture(cfg, teacher_dir, tmp_path / "c", tokens=3000, generated_dir=sources["generated"], seed=2)
    assert read_rows(tmp_path / "a") == read_rows(tmp_path / "b") != read_rows(tmp_path / "c")


def test_same_seed_same_batches_on_a_mixture(sources, teacher_dir, student_dir, tmp_path):
    from compactlm.distillation import distill
    from tests.helpers import kd_cfg, loss_curve, model_weights

    build_mixture(_cfg(sources), teacher_dir, tmp_path / "mix", tokens=3000, generated_dir=sources["generated"])
    runs = [distill(teacher_dir, student_dir, tmp_path / "mix", kd_cfg(steps=3), tmp_path / n, seed=5)
            for n in ("a", "b")]
    assert runs[0]["loss"] == runs[1]["loss"] and loss_curve(tmp_path / "a") == loss_curve(tmp_path / "b")
    a, b = model_weights(tmp_path / "a"), model_weights(tmp_path / "b")
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.integration
def test_a_killed_run_on_a_mixture_resumes_to_the_same_batches(sources, teacher_dir, student_dir, tmp_path):
    """SIGKILL of distillation on a mixture after a checkpoint; the rerun ends bit-identical to one that was not
    killed (same rows, same batches after the resume)."""
    import signal
    import time

    from compactlm.distillation import distill
    from compactlm.distillation.checkpoint import checkpoint_root
    from tests.helpers import kd_cfg, loss_curve, model_weights, start_script

    mix = tmp_path / "mix"
    build_mixture(_cfg(sources), teacher_dir, mix, tokens=4000, generated_dir=sources["generated"])
    c = kd_cfg(steps=6, checkpoint_every=2, log_every=1)
    ref = distill(teacher_dir, student_dir, mix, c, tmp_path / "ref", seed=1)
    out = tmp_path / "killed"
    proc = start_script("slow_distillation.py", teacher_dir, student_dir, mix, out, c.model_dump_json())
    try:
        deadline = time.monotonic() + 240
        while not list(checkpoint_root(out).glob("step-0000000[24]")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    resumed = distill(teacher_dir, student_dir, mix, c, out, seed=1)
    assert resumed["resumed_from"] >= 2 and loss_curve(out) == loss_curve(tmp_path / "ref")
    a, b = model_weights(tmp_path / "ref"), model_weights(out)
    assert all((a[k] == b[k]).all() for k in a) and resumed["loss"] == ref["loss"]


def test_bad_sources_fail_before_anything_is_written(sources, teacher_dir, tmp_path):
    from pydantic import ValidationError

    bad = DataConfig(sources=[{"kind": "instructions", "path": str(sources["instructions"]),
                               "prompt_field": "instruction", "response_field": "answer"}])
    with pytest.raises(ValueError, match=r"data.sources\[0\].response_field: row 0 .* no field 'answer'.*"
                                         r"\['input', 'instruction', 'output'\]"):
        build_mixture(bad, teacher_dir, tmp_path / "x", tokens=100)
    with pytest.raises(ValueError, match=r"data.sources\[0\].path: cannot load dataset 'hf:no/such'.*offline"):
        build_mixture(DataConfig(sources=[{"kind": "text", "path": "hf:no/such"}]), teacher_dir, tmp_path / "x",
                      tokens=100)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValidationError, match="every source has weight 0"):
        _cfg(sources, weights=(0, 0, 0))
    with pytest.raises(ValidationError, match="file not found"):
        DataConfig(sources=[{"kind": "text", "path": str(tmp_path / "none.txt")}])
    with pytest.raises(ValidationError, match="needs a path"):
        DataConfig(sources=[{"kind": "text"}])


def test_offline_kd_on_a_mixture_without_stored_log_probs_says_what_to_do(sources, teacher_dir, student_dir,
                                                                          tmp_path):
    from compactlm.distillation import DistillError, distill
    from tests.helpers import kd_cfg

    build_mixture(_cfg(sources), teacher_dir, tmp_path / "mix", tokens=2000, generated_dir=sources["generated"])
    with pytest.raises(DistillError, match="holds no top-k log-probs.*distill.mode: online"):
        distill(teacher_dir, student_dir, tmp_path / "mix", kd_cfg(mode="offline"), tmp_path / "x")
