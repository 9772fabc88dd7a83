"""MLflow tracking through explicit run ids (real MLflow, SQLite store)."""

import threading

from mlflow.tracking import MlflowClient

from compactlm.tracking import Tracker, default_tracking_uri, flatten, metric_name


def test_metric_names_are_mlflow_safe():
    assert metric_name("acc,none") == "acc"
    assert metric_name("arc/acc_norm,none") == "arc/acc_norm"
    assert metric_name("a(b)") == "a_b_"
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_default_uri_is_absolute_sqlite_in_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    assert default_tracking_uri(tmp_path, "sqlite:////x.db") == "sqlite:////x.db"


def test_parent_child_runs_from_threads(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tr = Tracker(uri, "exp")
    parent = tr.start_run("pipeline", tags={"prefect.flow_run_id": "abc"})
    (tmp_path / "f.txt").write_text("x")
    children = []

    def stage(i):
        t = Tracker(uri, "exp")
        rid = t.start_run(f"stage{i}", parent_id=parent)
        t.log_params(rid, {"cfg": {"lr": 0.1, "tasks": ["a", "b"]}})
        t.log_metrics(rid, {"loss": 1.5, "nan": float("nan"), "text": "skip", "acc,none": 0.5}, step=3)
        t.log_artifact(rid, tmp_path / "f.txt")
        t.end_run(rid)
        children.append(rid)

    threads = [threading.Thread(target=stage, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    tr.end_run(parent)
    client = MlflowClient(uri)
    runs = client.search_runs([tr.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(runs) == 3
    for r in runs:
        assert r.data.metrics == {"loss": 1.5, "acc": 0.5}
        assert r.data.params["cfg.lr"] == "0.1" and r.data.params["cfg.tasks"] == '["a", "b"]'
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["f.txt"]
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts live beside the SQLite file
    assert client.get_run(parent).data.tags["prefect.flow_run_id"] == "abc"
