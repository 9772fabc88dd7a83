"""The `compactlm` command line: a bad recipe or a target that does not fit the teacher fails in seconds, before
anything is written."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.helpers import REPO


def test_cli_rejects_bad_recipe_fast_without_loading_models(tmp_path):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(REPO / "configs/tiny-test.yaml"),
                           "--set", "prune.num_hidden_layers=-2", "--set", f"workdir={tmp_path}/w"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    elapsed = time.time() - t0
    assert proc.returncode == 2
    assert "prune.num_hidden_layers" in proc.stderr and proc.stderr.count("\n") <= 3, proc.stderr
    assert elapsed < 5, elapsed
    assert not (tmp_path / "w").exists()  # nothing written


def test_prune_target_larger_than_teacher_fails_before_compute(tmp_path, tiny_model_dir):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(REPO / "configs/tiny-test.yaml"),
                           "--set", f"teacher={tiny_model_dir}", "--set", "prune.intermediate_size=99999",
                           "--set", f"workdir={tmp_path}/w"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "prune: prune.intermediate_size=99999 is larger than the teacher's 256" in proc.stderr, proc.stderr
    # Rejected before generation starts: nothing written. (It reads the teacher's config, so it imports
    # transformers; the sub-5 s bound for schema errors is asserted above, where nothing heavy is imported.)
    assert time.time() - t0 < 60 and not (tmp_path / "w").exists()


def test_truncated_teacher_fails_in_seconds_naming_the_file(tmp_path, tiny_model_dir):
    """A teacher whose model.safetensors was cut in half fails `validate` and `run` before anything starts."""
    import shutil

    bad = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, bad)
    weights = bad / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    for command in ("validate", "run"):
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "flows.cli", command, str(REPO / "configs/tiny-test.yaml"),
                               "--set", f"teacher={bad}", "--set", f"workdir={tmp_path}/w"],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"teacher: {weights} is truncated or corrupt" in proc.stderr, proc.stderr
        assert time.time() - t0 < 20 and not (tmp_path / "w").exists()
