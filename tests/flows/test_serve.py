"""Operations end to end: real Prefect server + process worker + MLflow server on loopback ports, the
deployments of prefect.yaml, a run triggered through the Prefect API (as the UI's Run button does), and a
clean teardown."""

import json
import socket
import subprocess
import sys

import pytest
import yaml

from flows import serve
from tests.helpers import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.long(65)
@pytest.mark.integration
def test_deployment_run_through_api_logs_to_mlflow_server(tmp_path):
    state_dir = tmp_path / "serve"
    state = serve.start(state_dir, _free_port(), _free_port())
    try:
        assert set(state["pids"]) == {"prefect-server", "mlflow-server", "worker"}
        for line in (state_dir / "prefect-server.log").read_text().splitlines():
            assert "0.0.0.0" not in line  # bound to loopback only
        serve.deploy(state_dir)

        recipe = yaml.safe_load((REPO / "configs/tiny-test.yaml").read_text())
        recipe["workdir"] = str(tmp_path / "work")
        recipe["generate"]["engine"] = "hf"  # the services are under test here, not vLLM (flows/test_compress.py)
        recipe["prune"]["repair"] = {"num_samples": 4, "seq_len": 64}  # a nested section through the API
        trigger = (
            "import json, sys\n"
            "from prefect.deployments import run_deployment\n"
            "fr = run_deployment('compress/tiny-test', parameters={'recipe': json.loads(sys.argv[1])}, timeout=1500)\n"
            "print(json.dumps({'state': fr.state.type.value, 'id': str(fr.id)}))\n"
        )
        env = serve.service_env(state_dir, state["prefect_port"], state["mlflow_port"])
        proc = subprocess.run([sys.executable, "-c", trigger, json.dumps(recipe)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=1600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        worker_log = (state_dir / "worker.log").read_text()
        assert result["state"] == "COMPLETED", worker_log[-5000:]

        from mlflow.tracking import MlflowClient

        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name("compactlm-tiny")
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1 and parents[0].data.tags["prefect.flow_run_id"] == result["id"]
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        assert {k.info.run_name for k in kids} == {"generate", "score", "prune", "distill", "evaluate"}
        for k in kids:  # artifacts went through the server into its artifact store
            assert client.list_artifacts(k.info.run_id), k.info.run_name
        prune_run = next(k for k in kids if k.info.run_name == "prune")  # refitted on the generated data
        assert prune_run.data.metrics["repair_error_after"] < prune_run.data.metrics["repair_error_before"]
        assert any((state_dir / "mlartifacts").rglob("comparison.md"))
    finally:
        serve.stop(state_dir)
    assert not any(serve.group_alive(pid) for pid in state["pids"].values()), "a service outlived stop()"
    assert not (state_dir / "services.json").exists()
