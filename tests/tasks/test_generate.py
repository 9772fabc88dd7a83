"""The generate task's MLflow logging: the dataset as the run's input, a sample table, stats."""

from __future__ import annotations

import json
from pathlib import Path


def test_mlflow_dataset_input_sample_table_and_stats(sampled, tmp_path):
    from compactlm.tracking import Tracker
    from tasks.generate import SAMPLE_ROWS, log_generated

    _, out, manifest = sampled
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "gen-test")
    run_id = tracker.start_run("generate")
    log_generated(tracker, run_id, out, manifest)
    tracker.end_run(run_id)
    run = tracker.client.get_run(run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == f"generated-{out.name}" and inp.tags[0].value == "training"
    assert json.loads(inp.dataset.profile)["num_rows"] == manifest["stats"]["completions"]
    metrics = run.data.metrics
    assert metrics["completions"] == manifest["stats"]["completions"] and "dropped.near_duplicate" in metrics
    assert metrics["completion_tokens_per_s"] > 0 and "dropped_total" in metrics
    # logged as an MLflow table (what the UI's artifact view renders); read back with the run's own client
    # (MlflowClient.load_table goes through the process-global tracking URI, which compactlm never sets)
    assert {"path": "samples.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    table = json.loads(Path(tracker.client.download_artifacts(run_id, "samples.json", str(tmp_path))).read_text())
    assert len(table["data"]) == min(SAMPLE_ROWS, manifest["stats"]["completions"])
    assert {"prompt", "completion", "finish_reason", "completion_tokens"} <= set(table["columns"])
