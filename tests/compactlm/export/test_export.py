"""The export stage's output is published atomically like every stage's: a failure or a kill mid-export leaves no
output (a kill leaves only a temp directory the next publish removes), and the rerun writes the same files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from compactlm.artifacts import is_complete
from compactlm.config import ExportConfig
from compactlm.export import ExportError, export_model, read_exports
from tests.helpers import sigkill, start_script, tmp_dirs, wait_for_line

CFG = ExportConfig(gguf=["f16", "q8_0"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.integration  # one conversion before the failure: ~15 s
@pytest.mark.long(13)
def test_a_failure_after_the_gguf_files_publishes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "export"
    # GGUF first (written into the temp directory), then w4a16's shape check fails for real
    with pytest.raises(ExportError, match=r"export\.group_size 96"):
        export_model(tiny_model_dir, ExportConfig(gguf=["f16"], vllm=["w4a16"], group_size=96), out)
    assert not out.exists() and not tmp_dirs(out)


@pytest.mark.long(37)
@pytest.mark.integration
def test_sigkill_while_exporting_publishes_nothing_and_rerun_matches(tiny_model_dir, tmp_path):
    out = tmp_path / "export"
    proc = start_script("pause_export.py", tiny_model_dir, out, CFG.model_dump_json())
    try:
        wait_for_line(proc, "IN-EXPORT", timeout=300)
        sigkill(proc)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    (left,) = tmp_dirs(out)
    assert (left / "gguf" / "model-f16.gguf").is_file() and not (left / "manifest.json").exists()

    manifest = export_model(tiny_model_dir, CFG, out)
    assert is_complete(out) and not tmp_dirs(out)  # the dead process's temp directory is gone
    reference = tmp_path / "reference"
    export_model(tiny_model_dir, CFG, reference)
    assert [r["name"] for r in manifest["exports"]] == ["gguf-f16", "gguf-q8_0"]
    for rec in read_exports(out):
        assert _sha(Path(rec["path"])) == _sha(reference / Path(rec["path"]).relative_to(out)), rec["name"]
