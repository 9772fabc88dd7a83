"""MLflow tracking: names, parent/child runs from threads, redaction, store locking, and an unreachable or hung
server failing fast and clearly."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from compactlm.tracking import Tracker, default_tracking_uri, flatten, metric_name
from tests.helpers import free_port


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


def test_redaction_is_by_secret_key_names_and_secret_values_not_substrings():
    from compactlm.tracking import redact

    kept = {"max_tokens": 128, "min_tokens": 1, "max_completion_tokens": 64, "generated_tokens": 9,
            "tokens_per_s": 1.5, "secret_sauce_ratio": 0.5, "prompt": "count the tokens", "keys": ["a", "b"]}
    assert redact(kept) == kept
    got = redact({"note": "use hf_abcdefghijklmnopqrstu and sk-ABCDEFGHIJKLMNOPQRST please",
                  "AWS_ACCESS": "AKIAABCDEFGHIJKLMNOP", "header": "Authorization: Bearer abc.def.ghi-123",
                  "gh": "ghp_" + "x" * 36, "MLflow-Tracking-Password": "pw", "Secret": "s"})
    assert got == {"note": "use *** and *** please", "AWS_ACCESS": "***", "header": "Authorization: ***",
                   "gh": "***", "MLflow-Tracking-Password": "***", "Secret": "***"}


def test_every_recipe_field_round_trips_through_mlflow_unredacted(tmp_path):
    """What compress logs (recipe.json on the parent, each stage config as params of its child run, as run_stage
    does) comes back value for value: nothing in a recipe is mistaken for a secret (max_tokens once was)."""
    import json

    from compactlm.recipe import load_recipe
    from compactlm.tracking import flatten, metric_name
    from tests.helpers import REPO

    recipe = load_recipe(REPO / "configs/tiny-test.yaml", ["generate.filters.max_completion_tokens=100",
                                                           "generate.self_instruct.num_instructions=5"])
    tr = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp")
    parent = tr.start_run("pipeline")
    tr.log_dict(parent, recipe.model_dump(mode="json"), "recipe.json")
    client = MlflowClient(tr.tracking_uri)
    logged_recipe = Path(client.download_artifacts(parent, "recipe.json", str(tmp_path)))
    assert json.loads(logged_recipe.read_text()) == recipe.model_dump(mode="json")
    for section in ("generate", "score", "prune", "distill", "eval", "tracking"):
        config = getattr(recipe, section).model_dump(mode="json")
        child = tr.start_run(section, parent_id=parent)
        tr.log_params(child, {"config": config, "seed": recipe.seed})
        logged = client.get_run(child).data.params
        for key, value in flatten({"config": config}).items():
            want = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            assert logged[metric_name(key)] == want, (section, key)
        if section == "generate":
            assert logged["config.max_tokens"] == "32" and logged["config.filters.min_tokens"] == "1"


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


def test_unreachable_tracking_server_fails_fast_with_the_uri(monkeypatch):
    from compactlm.tracking import HTTP_BOUNDS, Tracker, TrackingUnavailableError

    for k in HTTP_BOUNDS:  # unset for this test, restored after
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=f"MLflow tracking store {uri} is unreachable") as info:
        Tracker(uri, "x")
    seconds = time.monotonic() - t0
    assert seconds < 30, f"took {seconds:.0f} s"  # MLflow's defaults take about 4 minutes
    assert "Connection refused" in str(info.value) and "MLFLOW_HTTP_REQUEST_MAX_RETRIES=3" in str(info.value)
    assert {k: os.environ[k] for k in HTTP_BOUNDS} == HTTP_BOUNDS


def test_hung_tracking_server_fails_within_the_timeout_bounds(monkeypatch):
    """A server that accepts connections and never answers (a hung process, a stuck proxy): the call times
    out per attempt and fails after the bounded retries with the same clear error, instead of hanging."""
    import socket
    import threading

    from compactlm.tracking import Tracker, TrackingUnavailableError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")  # the user's settings win over HTTP_BOUNDS
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_hold():  # read nothing, answer nothing, close nothing
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{srv.getsockname()[1]}"
    try:
        t0 = time.monotonic()
        with pytest.raises(TrackingUnavailableError, match=f"MLflow tracking store {uri} is unreachable") as info:
            Tracker(uri, "x")
        seconds = time.monotonic() - t0
    finally:
        stop.set()
        thread.join()
        for c in accepted:
            c.close()
        srv.close()
    assert len(accepted) == 2  # the first attempt and one retry, each held until its read timeout
    assert 4 <= seconds < 20, f"took {seconds:.1f} s"  # two 2-s read timeouts + backoff, not forever
    assert "timed out" in str(info.value).lower() and "MLFLOW_HTTP_REQUEST_TIMEOUT=2" in str(info.value)


def test_user_http_retry_settings_are_kept(monkeypatch, tmp_path):
    from compactlm.tracking import Tracker, bound_http_retries

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    assert bound_http_retries()["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "15"
    # a local store is not an HTTP server: errors from it are not re-labelled, end_run(FAILED) still works
    t = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "x")
    run = t.start_run("r")
    t.end_run(run, "FAILED")
    assert t.client.get_run(run).info.status == "FAILED"


def test_printed_ui_command_survives_a_workdir_with_a_space(tmp_path):
    import shlex

    work = tmp_path / "my runs"
    work.mkdir()
    tr = Tracker(default_tracking_uri(work), "exp")
    cmd = tr.run_url(tr.start_run("r")).split("  (experiment")[0]
    assert shlex.split(cmd) == ["mlflow", "ui", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}"]


def test_experiments_open_on_their_runs_in_the_mlflow_ui(tmp_path):
    """MLflow 3's UI shows an experiment without a kind as a GenAI one (traces); compactlm's are model training."""
    from compactlm.tracking import EXPERIMENT_KIND, Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    made = Tracker(uri, "fresh")
    assert made.client.get_experiment_by_name("fresh").tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    made.client.create_experiment("older")
    made.client.create_experiment("chosen", tags={EXPERIMENT_KIND[0]: "genai_development"})
    Tracker(uri, "older"), Tracker(uri, "chosen")
    assert made.client.get_experiment_by_name("older").tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    assert made.client.get_experiment_by_name("chosen").tags[EXPERIMENT_KIND[0]] == "genai_development"  # kept
