"""Two pipeline runs with different configs, at once, against the same work directory and MLflow store (HF engine:
the orchestration is under test here; flows/test_compress.py runs the pipeline with real vLLM). The second one
distills partly on-policy (distill.on_policy from the command line), so that path runs under real Prefect and
MLflow too."""

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import REPO


@pytest.mark.long(45)
@pytest.mark.integration
def test_two_concurrent_runs_share_workdir_and_store(tmp_path):
    workdir = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    procs = []
    on_policy = "{fraction: 0.5, max_new_tokens: 16}"  # seed 0: steps 1 and 3 sample, step 2 is off-policy
    for i, steps in enumerate((2, 3)):
        env_i = dict(env, PREFECT_HOME=str(tmp_path / f"prefect{i}"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        extra = ["--set", f"distill.on_policy={on_policy}"] if steps == 3 else []
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", str(REPO / "configs/tiny-test.yaml"),
             "--set", f"workdir={workdir}", "--set", f"distill.steps={steps}", "--set", f"name=concurrent-{steps}",
             "--set", "generate.engine=hf", "--set", "eval.speed=false", *extra],  # orchestration under test,
            # not vLLM or decode speed (both are tests/flows/test_compress.py's)
            cwd=REPO, env=env_i, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("compactlm-tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {"concurrent-2", "concurrent-3"}
    failed = [r.info.run_name for r in runs if r.info.status != "FINISHED"]
    errors = [line for o in outs for line in o.splitlines() if "Error" in line or "Traceback" in line]
    assert not failed, f"stage runs {failed} did not finish (a retry happened):\n" + "\n".join(errors[-40:])
    for parent in parents.values():
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(k.info.run_name for k in kids) == ["distill", "evaluate", "generate", "prune", "score"]
        assert all(k.info.status == "FINISHED" for k in kids)
    # The shared upstream stages were computed once (the other run waited on the lock, then reused them);
    # the distill outputs differ.
    gen_hits = sorted(r.data.tags["compactlm.cache_hit"] for r in runs if r.info.run_name == "generate")
    assert gen_hits == ["false", "true"]
    assert len([d for d in (workdir / "generate").iterdir() if not d.name.startswith(".")]) == 1
    assert len([d for d in (workdir / "distill").iterdir() if not d.name.startswith(".")]) == 2
    # the on-policy run: its distill child run logged which steps sampled and how the teacher scored the samples
    (on_run,) = [r for r in runs if r.info.run_name == "distill"
                 and r.data.tags.get("mlflow.parentRunId") == parents["concurrent-3"].info.run_id]
    history = [m.value for m in client.get_metric_history(on_run.info.run_id, "on_policy")]
    assert len(history) == 3 and 0 < sum(history) < 3, history
    assert on_run.data.metrics["on_policy_fraction"] == pytest.approx(sum(history) / 3)
    assert client.get_metric_history(on_run.info.run_id, "teacher_nll")
    assert on_run.data.params["config.on_policy.fraction"] == "0.5"
