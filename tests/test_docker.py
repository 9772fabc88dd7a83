"""No Docker engine here: lint the Dockerfiles with hadolint and validate the compose file with a spec-compliant
parser (compose-spec), plus the checks a parser cannot make."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))
COMPOSE = REPO / "docker" / "compose.yaml"


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    return str(exe) if exe.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    proc = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_paths_that_exist(dockerfile):
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"


def test_compose_is_valid_and_safe():
    from compose_spec import PyCompose

    text = COMPOSE.read_text()
    parsed = PyCompose.from_yaml(text)  # raises on anything the compose spec rejects
    assert {"postgres", "minio", "prefect-server", "mlflow", "worker-cpu", "worker-gpu"} <= set(parsed.service_names())
    services = yaml.safe_load(text)["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", [])
        for dep in (deps if isinstance(deps, list) else deps.keys()):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        build = svc.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
    # Secrets are required variables, never literals in the file.
    for m in re.finditer(r"(PASSWORD|SECRET)[A-Z_]*:\s*(\S+)", text):
        assert m.group(2).startswith("${") or m.group(2).startswith("$${"), m.group(0)
