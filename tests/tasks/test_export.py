"""The export task: every export evaluated and timed beside the full-precision model, one table; the student and
each export registered in MLflow with recipe, pruning record and metrics; a rerun is a cache hit that recomputes
and registers nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compactlm.config import ExportConfig
from tests.helpers import EVAL

CFG = ExportConfig(gguf=["f16", "q4_k_m"], threads=1, prompt_tokens=32, decode_tokens=8)
RECIPE = {"name": "tiny", "teacher": "tiny-random-llama", "export": CFG.model_dump(mode="json")}


@pytest.mark.long(36)
@pytest.mark.integration
def test_export_task_measures_registers_and_reruns_as_a_cache_hit(prefect_server, tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect import flow

    from compactlm.tracking import Tracker
    from tasks.common import RunContext
    from tasks.export import export

    student = tmp_path / "student"
    shutil.copytree(tiny_model_dir, student)
    (student / "pruning.json").write_text(json.dumps({"kept_layers": [0, 1, 3]}))
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "export-test", artifact_root=str(tmp_path / "art"))

    @flow
    def run() -> str:
        ctx = RunContext(workdir=str(tmp_path / "work"), tracking_uri=tracker.tracking_uri,
                         experiment="export-test", parent_run_id=tracker.start_run("pipeline"))
        return export(ctx, {"student": str(student)}, CFG, EVAL, recipe=RECIPE, registered_model="tiny-student")

    out = Path(run())
    (model_dir,) = [p for p in (tmp_path / "work" / "export-model").iterdir() if not p.name.startswith(".")]
    q4 = model_dir / "gguf" / "model-q4_k_m.gguf"
    mtime = q4.stat().st_mtime_ns
    assert Path(run()) == out  # same key
    assert q4.stat().st_mtime_ns == mtime  # nothing recomputed

    rows = json.loads((out / "rows.json").read_text())
    assert [r["format"] for r in rows] == ["hf-fp32", "gguf-f16", "gguf-q4_k_m"]
    for r in rows:
        assert r["model"] == "student" and r["decode_tok_s_b1"] > 0 and r["prompt_tok_s"] > 0 and r["avg_acc"] >= 0
        assert r["word_ppl"] > 1 and r["peak_rss_mib"] > 0 and r["size_mb"] > 0
        assert r["batch_size"] == CFG.decode_batch and r["decode_tok_s_batch"] > 0
    hf, f16, q4row = rows
    assert f16["ppl_ratio"] == pytest.approx(1.0, rel=1e-3) and q4row["size_mb"] < f16["size_mb"] < hf["size_mb"]
    assert "| student | gguf-q4_k_m |" in (out / "comparison.md").read_text()

    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs([tracker.experiment_id], "tags.`compactlm.stage` = 'export'",
                              order_by=["attributes.start_time ASC"])
    assert [r.data.tags["compactlm.cache_hit"] for r in runs] == ["false", "true"]
    first = runs[0]
    assert first.data.metrics["student/gguf-q4_k_m/decode_tok_s_b1"] == pytest.approx(q4row["decode_tok_s_b1"])
    assert {a.path for a in client.list_artifacts(first.info.run_id)} >= {"results.json", "rows.json",
                                                                          "comparison.md"}
    assert first.data.tags["compactlm.registered"] == ("tiny-student:1, tiny-student-gguf-f16:1, "
                                                       "tiny-student-gguf-q4_k_m:1")
    assert "compactlm.registered" not in runs[1].data.tags  # the cache hit registered nothing new
    version = client.get_model_version("tiny-student-gguf-q4_k_m", "1")
    assert version.tags["compactlm.format"] == "gguf-q4_k_m" and version.run_id == first.info.run_id
    model_id = version.tags["compactlm.model_id"]
    logged = client.get_logged_model(model_id)
    assert logged.tags["compactlm.registered_version"] == "tiny-student-gguf-q4_k_m:1"
    assert version.source == logged.artifact_location
    assert {m.key for m in logged.metrics} >= {"word_ppl", "decode_tok_s_b1", "decode_tok_s_batch", "size_mb",
                                               "avg_acc"}
    files = {Path(a.path).name for a in client.list_logged_model_artifacts(model_id)}
    assert files >= {"model-q4_k_m.gguf", "recipe.json", "pruning.json", "metrics.json", "export.json"}
    student_files = {Path(a.path).name for a in client.list_logged_model_artifacts(
        client.get_model_version("tiny-student", "1").tags["compactlm.model_id"])}
    assert {"model.safetensors", "config.json", "tokenizer.json", "recipe.json"} <= student_files
