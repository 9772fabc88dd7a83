"""What every stage task shares: output keys, and a stage that outlives a dying MLflow server and is reused after it
comes back."""

from __future__ import annotations

import time

import pytest

from compactlm.artifacts import is_complete, read_manifest
from compactlm.config import DistillConfig
from tests.helpers import DISTILL, SCORE, SUB_ENV, free_port, kill_group, mlflow_server, start_script, wait_for_line
from tests.helpers import kd_cfg as cfg


def _demo_stage(attempts: list[int], error: type[Exception] | None):
    """A stage task (as tasks/*.py write them) whose first attempt fails with `error`."""
    from prefect import task

    from compactlm.artifacts import publish_dir
    from tasks.common import retry_transient, run_stage

    @task(name="demo-stage", retries=1, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def stage(ctx) -> str:
        def produce(out, log_step) -> dict:
            attempts.append(1)
            if error is not None and len(attempts) == 1:
                raise error("first attempt fails")
            with publish_dir(out, {"stage": "demo"}):
                pass
            return {"stage": "demo"}

        return run_stage(ctx, "demo", {"x": 1}, [], produce)

    return stage


@pytest.mark.parametrize("error, attempts", [(RuntimeError, 2), (ValueError, 1), (None, 1)])
@pytest.mark.long(6)
def test_only_transient_failures_are_retried_and_a_retry_keeps_one_child_run(prefect_server, tmp_path, error,
                                                                             attempts):
    """An engine crash (RuntimeError) is retried and the retry continues the first attempt's child run; bad input
    (ValueError) fails at once: no retry, one child run, marked FAILED."""
    from mlflow.tracking import MlflowClient
    from prefect import flow

    from compactlm.tracking import Tracker
    from tasks.common import RunContext

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "retry-test")
    parent = tracker.start_run("pipeline")
    ctx = RunContext(workdir=str(tmp_path / "work"), tracking_uri=tracker.tracking_uri, experiment="retry-test",
                     parent_run_id=parent)
    tried: list[int] = []
    stage = _demo_stage(tried, error)

    @flow
    def pipeline() -> str:
        return stage(ctx)

    if error is ValueError:
        with pytest.raises(ValueError, match="first attempt fails"):
            pipeline()
    else:
        assert is_complete(pipeline())
    assert len(tried) == attempts
    client = MlflowClient(tracker.tracking_uri)
    kids = client.search_runs([tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(kids) == 1, [k.info.run_id for k in kids]
    assert kids[0].info.status == ("FAILED" if error is ValueError else "FINISHED")


def test_observation_settings_are_not_in_the_stage_key():
    from tasks.common import stage_key_material

    base = stage_key_material(cfg(), 0)
    assert stage_key_material(cfg(log_every=5, checkpoint_every=2, peak_tflops=989), 0) == base
    assert stage_key_material(cfg(lr=1e-3), 0) != base and stage_key_material(cfg(), 1) != base
    assert "log_every" not in base["config"] and "steps" in base["config"]


@pytest.mark.long(34)
@pytest.mark.integration  # an MLflow server twice, two pipeline subprocesses
def test_mlflow_server_down_mid_run_fails_clearly_then_rerun_reuses_stages(tiny_model_dir, student_dir, gen_dir,
                                                                          tmp_path):
    from mlflow.tracking import MlflowClient

    state, workdir = tmp_path / "mlflow", tmp_path / "work"
    state.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = DistillConfig(**{**DISTILL.model_dump(), "steps": 12, "checkpoint_every": 3})
    env = {k: v for k, v in SUB_ENV.items() if not k.startswith("MLFLOW_")}
    # fewer HTTP retries than compactlm's bounds (3 retries with backoff 1 wait 0 + 2 + 4 s per call to a dead server;
    # the bounds are tests/compactlm/test_tracking.py's): the behaviour under test is the same, each failing call
    # ends sooner
    env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="2")
    args = [uri, workdir, tiny_model_dir, student_dir, gen_dir, SCORE.model_dump_json(), cfg.model_dump_json()]
    server = mlflow_server(state, port)
    try:
        proc = start_script("stages_against_server.py", *args, env=env)
        try:
            wait_for_line(proc, "SCORED")
            # the distill stage is computing (its first checkpoint is on disk): the server dies
            deadline = time.monotonic() + 240
            while not list((workdir / "distill").glob("*.ckpt/step-*")):
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            kill_group(server)
            t_kill = time.monotonic()
            _, stderr = proc.communicate(timeout=300)
            seconds_to_fail = time.monotonic() - t_kill
        finally:
            proc.kill()
            proc.wait()
    finally:
        kill_group(server)

    assert proc.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "TrackingUnavailableError" in last and f"MLflow tracking store {uri} is unreachable" in last, last
    assert "MLFLOW_TRACKING_URI" in last and "rerun" in last
    # one warning, then compute went on: in the stage's log (`compactlm run` also shows it on the console)
    (distill_log,) = (workdir / "logs").glob("*/distill.log")
    assert "step metrics are no longer logged, the stage goes on" in distill_log.read_text()
    assert seconds_to_fail < 90, f"took {seconds_to_fail:.0f} s to fail"
    print(f"MLflow down -> clear error after {seconds_to_fail:.1f} s")
    # the stage outputs are complete and valid: distillation finished and published despite the dead server
    (score_out,) = [p for p in (workdir / "score").iterdir() if not p.name.startswith(".")]
    (distill_out,) = [p for p in (workdir / "distill").iterdir() if p.is_dir() and not p.name.startswith(".")
                      and not p.name.endswith(".ckpt")]
    assert is_complete(score_out) and is_complete(distill_out)
    assert read_manifest(distill_out)["metrics"]["steps"] == 12
    assert f"the output {distill_out} is complete and a rerun reuses it" in last

    server = mlflow_server(state, port)  # back up, same store
    try:
        proc = start_script("stages_against_server.py", *args, env=env)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert "DONE" in stdout
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("faults")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 2 and parents[1].info.status == "FINISHED"
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id]
        assert {k.info.run_name: k.data.tags["compactlm.cache_hit"] for k in kids} == {"score": "true",
                                                                                     "distill": "true"}
        assert all(k.info.status == "FINISHED" for k in kids)
        first = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
        assert first["score"].info.status == "FINISHED"
        assert len(client.get_metric_history(first["distill"].info.run_id, "loss")) >= 3  # logged while up
    finally:
        kill_group(server)
