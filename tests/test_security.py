"""Source-level security rules: no remote code, no pickle loading, loopback-only servers."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("compactlm", "tasks", "flows", "benchmarks") for p in (REPO / d).rglob("*.py")]


def test_sources_found():
    assert len(SOURCES) > 20


def test_no_remote_code_and_no_pickle_loads():
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{path}: torch.load without weights_only=True"
        assert "pickle.load" not in text, path


def test_servers_bind_loopback():
    serve = (REPO / "flows" / "serve.py").read_text()
    assert 'HOST = "127.0.0.1"' in serve and "0.0.0.0" not in serve
