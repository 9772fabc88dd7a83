"""The evaluate task: the quality gate logs everything then fails without a retry; a kill mid-evaluation publishes
nothing and the rerun matches."""

from __future__ import annotations

from pathlib import Path

import pytest

from compactlm.artifacts import is_complete
from compactlm.config import EvalConfig
from compactlm.evaluation import RecoveryError, compare_table
from tests.helpers import EVAL, fake_result, sigkill, start_script, wait_for_line, with_speed


@pytest.mark.integration
@pytest.mark.long(10)
def test_evaluate_task_gate_logs_then_fails_without_retry(prefect_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect import flow

    import tasks.evaluate as te
    from compactlm.tracking import Tracker
    from tasks.common import RunContext

    dirs = {}
    for label in ("teacher", "pruned", "student"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "config.json").write_text("{}")
        dirs[label] = str(tmp_path / label)
    fake = {dirs["teacher"]: with_speed(fake_result(0.60, 0.80, 10.0), 100.0),
            dirs["pruned"]: with_speed(fake_result(0.30, 0.40, 40.0), 150.0),
            dirs["student"]: with_speed(fake_result(0.45, 0.60, 20.0), 150.0)}  # keeps 62.5%
    monkeypatch.setattr(te, "_evaluate_cached", lambda ctx, d, cfg: {k: v for k, v in fake[d].items() if k != "speed"})
    monkeypatch.setattr(te, "_speeds", lambda ctx, models, cfg: {k: fake[d]["speed"] for k, d in models.items()})
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "gate-test", artifact_root=str(tmp_path / "art"))
    parent = tracker.start_run("pipeline")
    ctx = RunContext(workdir=str(tmp_path / "work"), tracking_uri=tracker.tracking_uri, experiment="gate-test",
                     parent_run_id=parent)

    @flow
    def run_eval(cfg: EvalConfig) -> str:
        return te.evaluate(ctx, dirs, cfg)

    with pytest.raises(RecoveryError) as err:
        run_eval(EvalConfig(min_recovery=0.7))
    out = run_eval(EvalConfig(min_recovery=0.6))  # passes; same per-model results

    expected = compare_table({label: fake[d] for label, d in dirs.items()})
    assert expected in str(err.value)
    assert (Path(out) / "comparison.md").read_text().strip() == expected.strip()
    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("gate-test").experiment_id],
                              filter_string="tags.`compactlm.stage` = 'evaluate'",
                              order_by=["attributes.start_time ASC"])
    assert len(runs) == 2  # one per flow run: the failed gate was not retried
    failed, passed = runs
    assert failed.info.status == "FINISHED" and failed.data.tags["compactlm.quality_gate"] == "failed"
    assert passed.data.tags["compactlm.quality_gate"] == "passed"
    assert failed.data.metrics["student_recovery"] == pytest.approx(0.625)
    assert failed.data.metrics["teacher/tok_s"] == 100.0
    assert {a.path for a in client.list_artifacts(failed.info.run_id)} >= {"results.json", "comparison.md"}


@pytest.mark.integration  # lm-eval three times on the tiny model: ~40 s idle
def test_sigkill_during_evaluation_publishes_nothing_and_rerun_matches(tiny_model_dir, tmp_path):
    from compactlm.evaluation import evaluate_model
    from tasks.common import RunContext
    from tasks.evaluate import _evaluate_cached

    workdir = tmp_path / "work"
    proc = start_script("pause_evaluation.py", tiny_model_dir, workdir, EVAL.model_dump_json())
    try:
        wait_for_line(proc, "IN-EVAL", timeout=300)
        sigkill(proc)
    finally:
        proc.kill()
        proc.wait()
    cache = workdir / "eval-model"
    assert not any(is_complete(p) for p in cache.glob("*"))  # nothing published (no directory at all)

    ctx = RunContext(workdir=str(workdir), tracking_uri="unused", experiment="unused", parent_run_id="unused")
    rerun = _evaluate_cached(ctx, str(tiny_model_dir), EVAL)
    published = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(published) == 1 and is_complete(published[0])
    ref = evaluate_model(tiny_model_dir, EVAL, seed=0)
    assert rerun["tasks"] == ref["tasks"] and rerun["perplexity"] == ref["perplexity"]
    assert rerun["params"] == ref["params"] and rerun["size_bytes"] == ref["size_bytes"]
