"""Local services for scheduled and UI-triggered runs: a Prefect server, a process worker and an MLflow server,
all bound to 127.0.0.1, plus registering the deployments of prefect.yaml.

    python -m flows.serve start [--dir runs/serve] [--prefect-port 4200] [--mlflow-port 5000]
    python -m flows.serve deploy        # register prefect.yaml's deployments on that server
    python -m flows.serve stop

`make serve` / `make deploy` / `make stop` call these. State (pids, ports, logs, the Prefect and MLflow
databases) lives in --dir; every service runs in its own process group so `stop` ends it with its children.
To use remote servers instead, set PREFECT_API_URL and MLFLOW_TRACKING_URI and start only a worker.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOL = "compactlm"
HOST = "127.0.0.1"


def _bin(name: str) -> str:
    """The console script beside this interpreter (the project's venv), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} did not come up: the process exited ({proc.returncode}); see {log}:\n"
                               + log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s; see {log}")


def service_env(state_dir: Path, prefect_port: int, mlflow_port: int) -> dict[str, str]:
    """Environment for clients of these services (the worker, `deploy`, tests)."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(state_dir / "prefect"),
        PREFECT_API_URL=f"http://{HOST}:{prefect_port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_TRACKING_URI=f"http://{HOST}:{mlflow_port}",
        COMPACTLM_REPO=str(REPO),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def mlflow_server_env(env: dict[str, str]) -> dict[str, str]:
    """The MLflow server's environment: without MLflow's job runner (huey consumers for GenAI jobs, which compactlm
    does not use: several processes and ~20 s of CPU per start on 2 cores) unless the user turned it on."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env}


def _spawn(name: str, cmd: list[str], env: dict[str, str], state_dir: Path) -> subprocess.Popen:
    log = state_dir / f"{name}.log"
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)  # own process group: stop() ends its children too


def start(state_dir: str | os.PathLike = "runs/serve", prefect_port: int = 4200, mlflow_port: int = 5000,
          timeout: float = 120) -> dict:
    """Start Prefect server, MLflow server and a worker on the `compactlm` pool. Returns the state dict."""
    state_dir = Path(state_dir).resolve()
    (state_dir / "prefect").mkdir(parents=True, exist_ok=True)
    state_file = state_dir / "services.json"
    if state_file.exists():
        raise RuntimeError(f"services already recorded in {state_file}; run `python -m flows.serve stop` first")
    env = service_env(state_dir, prefect_port, mlflow_port)
    procs: dict[str, subprocess.Popen] = {}
    try:
        server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        # the UI's browser code calls this API URL; unset, the server builds it from the default port 4200
        server_env["PREFECT_UI_API_URL"] = env["PREFECT_API_URL"]
        procs["prefect-server"] = _spawn("prefect-server", [_bin("prefect"), "server", "start", "--host", HOST,
                                                           "--port", str(prefect_port)], server_env, state_dir)
        procs["mlflow-server"] = _spawn("mlflow-server", [
            _bin("mlflow"), "server", "--host", HOST, "--port", str(mlflow_port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
            "--artifacts-destination", str(state_dir / "mlartifacts")], mlflow_server_env(env), state_dir)
        _wait_http(f"http://{HOST}:{prefect_port}/api/health", timeout, procs["prefect-server"],
                   state_dir / "prefect-server.log")
        _wait_http(f"http://{HOST}:{mlflow_port}/health", timeout, procs["mlflow-server"],
                   state_dir / "mlflow-server.log")
        subprocess.run([_bin("prefect"), "work-pool", "create", POOL, "--type", "process", "--overwrite"],
                       env=env, cwd=REPO, check=True, capture_output=True, timeout=120)
        procs["worker"] = _spawn("worker", [_bin("prefect"), "worker", "start", "--pool", POOL, "--type",
                                            "process", "--name", "compactlm-local"], env, state_dir)
    except BaseException:
        for p in procs.values():
            _kill_group(p.pid)
        raise
    state = {"dir": str(state_dir), "prefect_port": prefect_port, "mlflow_port": mlflow_port,
             "pids": {k: p.pid for k, p in procs.items()},
             "prefect_ui": f"http://{HOST}:{prefect_port}", "mlflow_ui": f"http://{HOST}:{mlflow_port}"}
    state_file.write_text(json.dumps(state, indent=2))
    return state


def deploy(state_dir: str | os.PathLike = "runs/serve") -> None:
    """Register prefect.yaml's deployments on the server recorded in state_dir."""
    state = json.loads((Path(state_dir).resolve() / "services.json").read_text())
    env = service_env(Path(state["dir"]), state["prefect_port"], state["mlflow_port"])
    subprocess.run([_bin("prefect"), "--no-prompt", "deploy", "--all"], env=env, cwd=REPO, check=True,
                   timeout=300)


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is still running (zombies, which only wait to be reaped, are not)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: fall back to the signal probe, which also counts zombies
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            return True
    return False


def _gone(pid: int) -> bool:
    """True once no process of the group is left running (reaping the leader if it is our own child)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # started by another process (e.g. `make serve`): init reaps it
        pass
    return not group_alive(pid)


def _kill_group(pid: int, grace: float = 10) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds, and wait until it is gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            if _gone(pid):
                return
            time.sleep(0.2)
    raise RuntimeError(f"process group {pid} survived SIGKILL")


def stop(state_dir: str | os.PathLike = "runs/serve") -> None:
    """Stop every service recorded in state_dir (the worker first), with their child processes."""
    state_file = Path(state_dir).resolve() / "services.json"
    if not state_file.exists():
        return
    pids = json.loads(state_file.read_text())["pids"]
    for name in ("worker", "prefect-server", "mlflow-server"):
        if name in pids:
            _kill_group(pids[name])
    state_file.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["start", "deploy", "stop"])
    ap.add_argument("--dir", default="runs/serve", help="state, logs and databases of the services")
    ap.add_argument("--prefect-port", type=int, default=4200)
    ap.add_argument("--mlflow-port", type=int, default=5000)
    args = ap.parse_args(argv)
    if args.command == "start":
        s = start(args.dir, args.prefect_port, args.mlflow_port)
        print(f"Prefect UI  {s['prefect_ui']}\nMLflow UI   {s['mlflow_ui']}\n"
              f"worker on pool {POOL!r}; logs in {s['dir']}. Next: make deploy")
    elif args.command == "deploy":
        deploy(args.dir)
    else:
        stop(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
