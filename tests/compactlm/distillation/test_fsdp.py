"""Fully sharded distillation (``distill.strategy: fsdp``): two CPU processes on gloo, started by compactlm itself,
against one process: the same loss curve, half the training state per process, exact resume after a rank is
killed, a rank's error raised as itself."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from compactlm.artifacts import is_complete
from compactlm.distillation import distill
from compactlm.models import load_model, load_tokenizer
from tests.helpers import SUB_ENV, assert_same_tensors, bf16_copy, model_weights, nan_model, start_script
from tests.helpers import kd_cfg as cfg

FSDP = {"strategy": "fsdp", "nproc": 2}


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


#: One config for both comparisons: micro-batches (gradient sync switched off between them), hidden-state KD (the
#: teacher sharded, the projection outside FSDP), sharded checkpoints every 4 steps.
CONFIG = dict(steps=16, batch_size=4, micro_batch_size=1, hidden_weight=0.5, log_every=1, checkpoint_every=4)


@pytest.fixture(scope="module")
def bf16_models(teacher_dir, student_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(teacher, student) stored in bfloat16, as most checkpoints are: under fsdp each process loads them in bf16
    (the files' pages) and FSDP converts one unit at a time to the training dtype while it shards them; one process
    loads them converted to fp32 at once. Both must train the same."""
    root = tmp_path_factory.mktemp("bf16")
    return bf16_copy(teacher_dir, root / "teacher"), bf16_copy(student_dir, root / "student")


@pytest.fixture(scope="module")
def uninterrupted(bf16_models, data_dir, tmp_path_factory):
    """(the FSDP run's output dir, its summary, the per-step metrics its caller's log_fn got): 2 processes,
    uninterrupted; the reference of both tests below."""
    out = tmp_path_factory.mktemp("fsdp") / "whole"
    logged = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        summary = distill(*bf16_models, data_dir, cfg(**CONFIG, **FSDP), out, seed=4,
                          log_fn=lambda metrics, step: logged.append((step, metrics["loss"])))
    return out, summary, logged


@pytest.mark.integration  # torchrun processes (gloo)
@pytest.mark.long(30)
def test_two_fsdp_processes_match_one_process_with_half_the_state_each(uninterrupted, bf16_models, data_dir, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single = distill(*bf16_models, data_dir, cfg(**CONFIG), tmp_path / "single", seed=4)
    fsdp, sharded, logged = uninterrupted
    assert sharded["world_size"] == 2 and sharded["strategy"] == "fsdp" and is_complete(fsdp)
    assert _losses(fsdp) == pytest.approx(_losses(tmp_path / "single"), rel=1e-4)  # every step
    assert [s for s, _ in logged] == list(range(1, 17))  # rank 0's metrics reached the caller's log_fn (MLflow)
    assert sharded["state_mib_per_rank"] <= 0.6 * single["state_mib_per_rank"]
    assert sharded["tokens"] == single["tokens"] and sharded["params"] == single["params"]
    a, b = model_weights(fsdp), model_weights(tmp_path / "single")
    assert a.keys() == b.keys()  # gathered into a normal HF directory, in the student's stored dtype
    for k in a:  # trained in fp32 within 1e-4 of each other, then rounded to bf16 (a unit in the last place more)
        assert a[k].dtype == torch.bfloat16
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=2**-7, atol=2e-4)
    model = load_model(fsdp)  # loads in transformers unchanged
    ids = load_tokenizer(fsdp)("The cat", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    assert not (fsdp.parent / "whole.ckpt").exists()  # the sharded checkpoints are dropped once published


@pytest.mark.integration
@pytest.mark.long(30)
def test_a_killed_rank_fails_the_run_and_the_rerun_resumes_from_the_sharded_checkpoint(uninterrupted, bf16_models,
                                                                                      data_dir, tmp_path):
    import psutil

    teacher_dir, student_dir = bf16_models
    c = cfg(**CONFIG, **FSDP)
    out = tmp_path / "run"
    proc = start_script("sharded_distillation.py", teacher_dir, student_dir, data_dir, out, c.model_dump_json())
    deadline = time.time() + 300
    while not (out.parent / "run.ckpt" / "step-00000008").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "compactlm.distillation.rank" in " ".join(p.cmdline())]
    victim = next(p for p in ranks if p.environ().get("RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    t0 = time.time()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60  # no hang on the surviving rank
    assert "died without an error of its own" in stderr and "resumes from the last checkpoint" in stderr, stderr[-2000:]
    assert not is_complete(out) and not any(p.is_running() and p.status() != "zombie" for p in ranks)

    env = {**SUB_ENV, "OMP_NUM_THREADS": "1"}
    resumed = start_script("sharded_distillation.py", teacher_dir, student_dir, data_dir, out, c.model_dump_json(),
                           env=env).communicate(timeout=600)[0]
    summary = json.loads(next(line[7:] for line in resumed.splitlines() if line.startswith("RESULT ")))
    assert summary["resumed_from"] >= 8 and summary["resumed_from"] % 4 == 0
    whole = uninterrupted[0]
    assert _losses(out) == _losses(whole)  # the same curve, step for step
    assert_same_tensors(out / "model.safetensors", whole / "model.safetensors")  # and the same weights, exactly


@pytest.mark.integration
@pytest.mark.long(12)
def test_a_rank_error_is_raised_as_that_error(teacher_dir, student_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    broken = nan_model(student_dir, tmp_path / "broken")
    with pytest.raises(FloatingPointError, match=r"non-finite.*\(rank [01] of 2\)"):
        distill(teacher_dir, broken, data_dir, cfg(steps=2, **FSDP), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_strategy_settings_fail_early_naming_the_fix():
    with pytest.raises(ValueError, match="nproc=2 needs strategy: ddp or fsdp"):
        cfg(nproc=2)
    with pytest.raises(ValueError, match="strategy: fsdp trains full weights off-policy"):
        cfg(lora={"rank": 4}, **FSDP)
