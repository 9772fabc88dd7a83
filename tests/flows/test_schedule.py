"""Iterative pruning (``schedule``) in the compress flow: rounds of prune -> distill, killed between rounds and resumed
(the CLI as a user runs it, real Prefect and MLflow, the HF generation engine)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from compactlm.formats.pruning import read_record
from tests.helpers import REPO

ARGS = ["--set", "generate.engine=hf", "--set", "schedule.rounds=2", "--set", "distill.steps=4",
        "--set", "eval.limit=8", "--set", "eval.perplexity=false"]


def _cli(workdir: Path, api_url: str, log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env.update(PREFECT_API_URL=api_url, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "flows.cli", "run", str(REPO / "configs/tiny-test.yaml"), "--set",
           f"workdir={workdir}", *ARGS]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_after(log_path: Path, proc: subprocess.Popen, text: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while text not in log_path.read_text(errors="replace"):
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.time() < deadline, f"no {text!r} within {timeout} s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _outputs(workdir: Path, stage: str) -> list[Path]:
    return sorted(d for d in (workdir / stage).iterdir() if not d.name.startswith("."))


@pytest.mark.integration
@pytest.mark.long(35)
def test_schedule_killed_between_rounds_resumes_from_the_next_round(tmp_path, prefect_server):
    workdir = tmp_path / "work"
    with open(tmp_path / "first.log", "w") as log:
        proc = _cli(workdir, prefect_server, log)
        try:
            _kill_after(tmp_path / "first.log", proc, "score-r2  started")  # round 1 is done, round 2 begins
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert len(_outputs(workdir, "distill")) == 1  # round 1's student, published before the kill

    with open(tmp_path / "second.log", "w") as log:
        proc = _cli(workdir, prefect_server, log)
        assert proc.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-4000:]
    console = (tmp_path / "second.log").read_text().splitlines()
    for label in ("generate", "score", "prune", "prune-r1", "distill-r1"):  # round 1 and before: reused
        assert any(line.startswith(f"{label} ") and " cached " in line for line in console), (label, console)
    for label in ("score-r2", "prune-r2", "distill"):  # round 2 and the final distillation: computed now
        assert any(line.startswith(f"{label} ") and " done " in line for line in console), (label, console)

    # Nothing lost or done twice: one student per round, two scores (teacher, round-1 student), three pruned models
    # (the one-cut reference, round 1, round 2); the steps add up to distill.steps.
    students, pruned = _outputs(workdir, "distill"), _outputs(workdir, "prune")
    assert len(students) == 2 and len(_outputs(workdir, "score")) == 2 and len(pruned) == 3
    steps = sorted(json.loads((d / "manifest.json").read_text())["metrics"]["steps"] for d in students)
    assert sum(steps) == 4, steps

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("compactlm-tiny")
    parent = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and "
                                "tags.`compactlm.recipe` = 'tiny-test'")[0]
    rounds = json.loads(Path(client.download_artifacts(parent.info.run_id, "schedule.json", str(tmp_path)))
                        .read_text())
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0]["params"] > rounds[1]["params"]
    final = read_record(rounds[1]["pruned"])  # pruned from round 1's student: its maps lead to the teacher
    assert final["root"]["kept_layers"] == [read_record(rounds[0]["pruned"])["kept_layers"][i]
                                            for i in final["kept_layers"]]
    assert final["student"]["num_hidden_layers"] == 3 and final["student"]["intermediate_size"] == 128
