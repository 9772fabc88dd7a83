"""Two pipeline runs with different configs, at once, against the same work directory and MLflow store (HF engine:
the orchestration is under test here; flows/test_compress.py runs the pipeline with real vLLM). The second one
corrects the teacher first and chains two distill stages, off-policy then partly on-policy (correct and
distill_then from the command line), so those paths run under real Prefect and MLflow too. Both report to one
running Prefect server, as a team's runs would (each run's own temporary server: flows/test_compress.py)."""

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import REPO


@pytest.mark.long(30)
@pytest.mark.integration
def test_two_concurrent_runs_share_workdir_and_store(prefect_server, tmp_path):
    workdir = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    procs = []
    # seed 0: steps 1 and 3 sample, step 2 is off-policy
    then = "[{steps: 3, batch_size: 2, seq_len: 64, warmup_steps: 1, on_policy: {fraction: 0.5, max_new_tokens: 16}}]"
    for i, steps in enumerate((2, 3)):
        env_i = dict(env, PREFECT_HOME=str(tmp_path / f"prefect{i}"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                     PREFECT_API_URL=prefect_server)
        extra = ["--set", f"distill_then={then}", "--set", "correct={steps: 2, batch_size: 2, seq_len: 64}"] \
            if steps == 3 else []
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
    kids = {name: {k.info.run_name: k for k in runs if k.data.tags.get("mlflow.parentRunId") == p.info.run_id}
            for name, p in parents.items()}
    assert sorted(kids["concurrent-2"]) == ["distill", "evaluate", "generate", "prune", "score"]
    assert sorted(kids["concurrent-3"]) == ["correct", "distill", "distill-2", "evaluate", "generate", "prune",
                                            "score"]
    # The shared upstream stages were computed once (the other run waited on the lock, then reused them);
    # the distill outputs differ.
    gen_hits = sorted(r.data.tags["compactlm.cache_hit"] for r in runs if r.info.run_name == "generate")
    assert gen_hits == ["false", "true"]
    assert len([d for d in (workdir / "generate").iterdir() if not d.name.startswith(".")]) == 1
    assert len([d for d in (workdir / "distill").iterdir() if not d.name.startswith(".")]) == 3
    # the corrected teacher is what score and both distill stages learn from; the evaluation shows it beside the
    # original teacher, the table's reference
    chain = kids["concurrent-3"]
    corrected = chain["correct"].data.tags["compactlm.output"]
    assert corrected.startswith(str(workdir / "correct"))
    assert chain["correct"].data.params["config.lr"] == "1e-05" and chain["correct"].data.metrics["final_loss"] > 0
    assert chain["score"].data.params["input_0"] == corrected
    assert chain["distill"].data.params["input_0"] == chain["distill-2"].data.params["input_0"] == corrected
    assert json.loads(chain["evaluate"].data.params["labels"]) == ["teacher", "corrected", "pruned", "student"]
    # the chain: distill-2 starts from distill's student, and the run's student (evaluated, uploaded) is distill-2's
    first, last = (chain[n].data.tags["compactlm.output"] for n in ("distill", "distill-2"))
    assert last != first and last.startswith(str(workdir / "distill"))
    assert chain["distill-2"].data.params["input_1"] == first
    assert chain["evaluate"].data.params["input_3"] == last  # teacher, corrected, pruned, student
    uploaded = {m.source_run_id for m in client.search_logged_models([exp.experiment_id])}
    assert chain["distill-2"].info.run_id in uploaded and chain["distill"].info.run_id not in uploaded
    # the on-policy stage logged which steps sampled and how the teacher scored the samples
    on_run = chain["distill-2"]
    history = [m.value for m in client.get_metric_history(on_run.info.run_id, "on_policy")]
    assert len(history) == 3 and 0 < sum(history) < 3, history
    assert on_run.data.metrics["on_policy_fraction"] == pytest.approx(sum(history) / 3)
    assert client.get_metric_history(on_run.info.run_id, "teacher_nll")
    assert on_run.data.params["config.on_policy.fraction"] == "0.5"
