"""Checkpoints and resume: a SIGKILL, a non-finite loss or a full disk, then a rerun that ends bit-identical to an
uninterrupted run."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from compactlm.artifacts import is_complete
from compactlm.distillation import distill
from compactlm.models import load_model
from tests.helpers import (
    DISK_MODES,
    DISTILL,
    REPO,
    SCRIPTS,
    assert_same_tensors,
    grow_disk,
    loss_curve,
    model_weights,
    run_script,
    small_disk,
    tensors,
    torch_threads,
)
from tests.helpers import kd_cfg as cfg


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
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "slow_distillation.py"), str(teacher_dir),
                             str(student_dir), str(data_dir), str(out), c.model_dump_json()],
                            env={**os.environ, "PYTHONPATH": str(REPO)})
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
    a, b = model_weights(tmp_path / "ref"), model_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loss_curve(out) == loss_curve(tmp_path / "ref")
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
    a, b = model_weights(other), model_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a) and loss_curve(out) == loss_curve(other)


def _weights_from(path: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(str(path)).values())


TIMING = ("tokens_per_s", "model_tflops", "mfu")  # train_log fields that depend on wall time


@pytest.fixture(scope="module")
def distilled(tiny_model_dir, student_dir, gen_dir, tmp_path_factory) -> Path:
    """An uninterrupted distillation run (the reference)."""
    from compactlm.distillation import distill

    out = tmp_path_factory.mktemp("faults-distill") / "ref"
    with torch_threads(1):
        distill(tiny_model_dir, student_dir, gen_dir, DISTILL, out, seed=0)
    return out


def _ckpt_bytes(student_dir: Path) -> int:
    """On-disk size of one checkpoint: fp32 weights + two AdamW moments (the small files aside)."""
    return 12 * sum(t.numel() for t in tensors(student_dir / "model.safetensors").values())


@pytest.mark.integration  # three short distillations: ~40 s idle per mode
@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("mode", DISK_MODES)
@pytest.mark.long(8)
def test_disk_full_while_writing_a_checkpoint_then_resume(mode, tiny_model_dir, student_dir, gen_dir, distilled,
                                                         tmp_path):
    from compactlm.distillation import distill
    from compactlm.distillation.checkpoint import checkpoint_root

    disk = tmp_path / "disk"
    out = disk / "student"
    root = checkpoint_root(out)
    one = _ckpt_bytes(student_dir)
    with small_disk(disk, int(one * 1.5)) if mode == "tmpfs" else contextlib.nullcontext():
        proc = run_script("limit_distillation.py", tiny_model_dir, student_dir, gen_dir, out,
                          DISTILL.model_dump_json(), "3" if mode == "rlimit" else "-1")
        assert proc.returncode == 1, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert "WriteError" in last and f"could not write {root / 'step-00000004'}" in last, last
        assert ("no space left on device" if mode == "tmpfs" else "file too large") in last, last
        assert "the last good checkpoint is kept" in last
        assert not out.exists()  # nothing published
        assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # the good one, whole; no temp dir
        assert json.loads((root / "step-00000002" / "state.json").read_text())["step"] == 2

        if mode == "tmpfs":
            grow_disk(disk, 8 * one)
        resumed = distill(tiny_model_dir, student_dir, gen_dir, DISTILL, out, seed=0)
        assert resumed["resumed_from"] == 2 and not root.exists()
        assert_same_tensors(out / "model.safetensors", distilled / "model.safetensors")
        curve = [{k: v for k, v in json.loads(x).items() if k not in TIMING}
                 for x in (out / "train_log.jsonl").read_text().splitlines()]
    ref = [{k: v for k, v in json.loads(x).items() if k not in TIMING}
           for x in (distilled / "train_log.jsonl").read_text().splitlines()]
    assert curve == ref
