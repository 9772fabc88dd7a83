"""The `compactlm` command line: a bad recipe or a target that does not fit the teacher fails in seconds, before
anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_plan_prints_every_stage_and_exits_3_when_one_does_not_fit(tiny_model_dir, capsys):
    from flows.cli import main

    recipe = str(REPO / "configs/tiny-test.yaml")
    assert main(["plan", recipe, "--teacher-config", str(tiny_model_dir), "--cpu-mem", "64"]) == 0
    out = capsys.readouterr().out
    for stage in ("generate", "score", "prune", "distill", "evaluate"):
        assert f"| {stage} | cpu |" in out
    assert main(["plan", recipe, "--teacher-config", str(tiny_model_dir), "--cpu-mem", "0.5", "--json"]) == 3
    out, err = capsys.readouterr()
    plan = json.loads(out)
    assert plan["machine"]["cpu_mem_gib"] == 0.5 and not any(s["fits"] for s in plan["stages"])
    assert "the run does not fit this machine" in err and "has 0.5 GiB; fix: " in err
    assert main(["plan", recipe, "--set", "teacher=some-org/some-model"]) == 2
    assert "pass --teacher-config PATH" in capsys.readouterr().err


def test_run_refuses_before_compute_when_a_stage_does_not_fit(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The memory plan is part of the preflight: `run` stops with the plan's numbers before anything is written;
    COMPACTLM_SKIP_MEMORY_CHECK=1 overrides it."""
    from flows.cli import main

    args = [str(REPO / "configs/tiny-test.yaml"), "--set", f"teacher={tiny_model_dir}",
            "--set", f"workdir={tmp_path}/w"]
    monkeypatch.setenv("COMPACTLM_HOST_MEM_GIB", "0.5")
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert "distill (one process, online teacher): needs" in err
    assert "has 0.5 GiB; fix: " in err and "COMPACTLM_SKIP_MEMORY_CHECK=1" in err
    assert not (tmp_path / "w").exists()
    monkeypatch.setenv("COMPACTLM_SKIP_MEMORY_CHECK", "1")
    assert main(["validate", *args]) == 0


def test_the_plan_reads_the_memory_cgroup_limit(tmp_path, tiny_model_dir):
    """Inside a memory cgroup (v1, made here; needs root) the plan's host memory is the group's limit."""
    group = Path("/sys/fs/cgroup/memory") / f"compactlm-plan-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(1 << 30))
    except OSError as e:
        pytest.skip(f"no memory cgroup to make: {e}")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "validate", str(REPO / "configs/tiny-test.yaml"),
             "--set", f"teacher={tiny_model_dir}"], capture_output=True, text=True, cwd=REPO, timeout=120,
            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    finally:
        group.rmdir()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "has 1.0 GiB; fix: " in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def shared_workdir(tmp_path_factory):
    """One workdir for the interruption tests: the second run reuses the first one's finished stages."""
    return tmp_path_factory.mktemp("interrupted") / "work"


def _start_run(workdir, prefect_home, log):
    """`compactlm run` of the tiny recipe (HF engine, a long distillation) in its own session, as from a
    terminal; returns (process, the line that tells us a stage is computing)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env.update(PREFECT_HOME=str(prefect_home), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "flows.cli", "run", str(REPO / "configs/tiny-test.yaml"), "--set",
           f"workdir={workdir}", "--set", "generate.engine=hf", "--set", "distill.steps=400"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(log_path, text: str, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while text not in log_path.read_text(errors="replace"):
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.time() < deadline, f"no {text!r} within {timeout} s"
        time.sleep(0.2)


def _session_left(proc) -> list[str]:
    return subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()


@pytest.mark.integration
@pytest.mark.long(26)
@pytest.mark.parametrize("fault", ["ctrl-c", "server-dies"])
def test_interrupted_run_ends_in_seconds_with_one_line_to_resume(fault, shared_workdir, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the process group, which kills Prefect's temporary server too) used to keep the
    CLI retrying the dead server for ~150 s; a server that died alone hung it at exit. Now: out within 10 s, one last
    line saying what happened and the command that resumes, nothing left running, finished stages kept."""
    import signal

    import psutil

    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = _start_run(shared_workdir, tmp_path / "prefect", log)
        try:
            _wait_for(log_path, "distill   started", proc)  # the console's line as distillation starts
            t0 = time.monotonic()
            if fault == "ctrl-c":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                (server,) = [p for p in psutil.Process(proc.pid).children(recursive=True)
                             if "prefect.server.api.server:create_app" in " ".join(p.cmdline())]
                server.kill()
            rc = proc.wait(timeout=60)
            seconds = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    last = log_path.read_text().strip().splitlines()[-1]
    assert seconds < 10, f"took {seconds:.1f} s to exit"
    want_rc, want = ((130, "compactlm: interrupted.") if fault == "ctrl-c" else
                     (1, "compactlm: the temporary Prefect server stopped unexpectedly"))
    assert rc == want_rc and last.startswith(want), (rc, last)
    assert f"Finished stage outputs are kept in {shared_workdir}" in last and "rerun the same command" in last
    assert "compactlm run" in last and f"workdir={shared_workdir}" in last
    assert _session_left(proc) == []
    assert any((d / "manifest.json").is_file() for d in (shared_workdir / "generate").iterdir())
