"""MLflow tracking through explicit run ids (real MLflow, SQLite store)."""

import os
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


def test_redact_hides_credentials_and_secret_keys():
    from compactlm.tracking import redact

    got = redact({"uri": "https://alice:s3cr3t@mlflow.example.com/x", "hf_token": "hf_abc", "nested":
                  {"AWS_SECRET_ACCESS_KEY": "zzz", "lr": 0.1, "empty_token": None}, "l": ["s3://k:v@bucket/p"]})
    assert got == {"uri": "https://***@mlflow.example.com/x", "hf_token": "***",
                   "nested": {"AWS_SECRET_ACCESS_KEY": "***", "lr": 0.1, "empty_token": None},
                   "l": ["s3://***@bucket/p"]}


def test_logged_params_and_dicts_are_redacted(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tr = Tracker(uri, "exp")
    rid = tr.start_run("r")
    tr.log_params(rid, {"tracking_uri": "http://bob:PLANTED1@host:5000", "api_key": "PLANTED2"})
    tr.log_dict(rid, {"password": "PLANTED3"}, "recipe.json")
    tr.end_run(rid)
    blob = (tmp_path / "mlflow.db").read_bytes() + b"".join(
        p.read_bytes() for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file())
    assert b"PLANTED" not in blob


def test_processes_opening_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    # Without the store-creation lock, 3 of 4 such processes died in MLflow's schema migration.
    import subprocess
    import sys

    code = f"from compactlm.tracking import Tracker; Tracker('sqlite:///{tmp_path}/mlflow.db', 'exp')"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors


def test_a_tracker_does_not_redirect_the_next_pipeline(tmp_path, monkeypatch):
    """One long-lived process (a worker, a test session) runs two pipelines with different workdirs: opening the
    first one's store must not make the second one log into it (mlflow.set_tracking_uri exports the env var)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = default_tracking_uri(tmp_path / "a")
    Tracker(first, "exp-a").start_run("r")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    second = default_tracking_uri(tmp_path / "b")
    assert second != first and second.endswith(str(tmp_path / "b" / "mlflow.db"))
