"""End to end: the `compress` flow on the tiny recipe with real vLLM, real Prefect and real MLflow.

Runs the README's CLI in a subprocess (as a user would), then reads the MLflow store it wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import REPO

# Secrets a user may have in the environment; none may reach logs, params, artifacts or stage outputs.
PLANTED = {"HF_TOKEN": "hf_PLANTEDsecret0001", "AWS_SECRET_ACCESS_KEY": "PLANTEDaws0002"}
STAGES = {"generate", "score", "prune", "distill", "evaluate"}


def _run_cli(workdir: Path, prefect_home: Path, *extra: str, api_url: str | None = None) -> subprocess.CompletedProcess:
    """`compactlm run` of the tiny recipe; with Prefect's temporary server (a user's first run) unless `api_url`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1",
               **PLANTED, **({"PREFECT_API_URL": api_url} if api_url else {}))
    cmd = [sys.executable, "-m", "flows.cli", "run", str(REPO / "configs/tiny-test.yaml"),
           "--set", f"workdir={workdir}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    for secret in PLANTED.values():
        assert secret not in proc.stdout + proc.stderr
    return proc


def _assert_no_secret_in(*roots: Path) -> int:
    scanned = 0
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                scanned += 1
                for secret in PLANTED.values():
                    assert secret.encode() not in data, f"{secret} leaked into {f}"
    return scanned


def _pipeline_runs(client: MlflowClient):
    exp = client.get_experiment_by_name("compactlm-tiny")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
                for p in parents}
    return parents, children


@pytest.mark.long(75)
@pytest.mark.integration
def test_compress_flow_end_to_end_and_rerun_hits_cache(tmp_path):
    workdir, prefect_home = tmp_path / "work", tmp_path / "prefect"
    first = _run_cli(workdir, prefect_home)

    # The CLI prints the comparison table and where the MLflow run is.
    assert "| teacher" in first.stdout and "| student" in first.stdout, first.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in first.stdout
    # A quiet console: one line per stage start and end (plus progress), no engine internals; those are in the
    # stage logs, which are the stage runs' artifacts.
    console = (first.stdout + first.stderr).splitlines()
    internals = ("EngineCore", "non-default args", "lm_eval", "Task run")  # vLLM's, lm-eval's and Prefect's lines
    assert len(console) <= 40 and not any(w in first.stdout + first.stderr for w in internals), console
    for stage in STAGES:
        assert any(line.startswith(f"{stage} ") and " done " in line for line in console), (stage, console)

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    parents, children = _pipeline_runs(client)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get("prefect.flow_run_id")
    kids = children[parent.info.run_id]
    assert {k.info.run_name for k in kids} == STAGES and len(kids) == 5
    for k in kids:
        assert k.info.status == "FINISHED"
        assert k.data.tags["compactlm.cache_hit"] == "false"
        assert k.data.tags["prefect.flow_run_id"] == parent.data.tags["prefect.flow_run_id"]
        assert client.list_artifacts(k.info.run_id), f"{k.info.run_name} logged no artifacts"
        assert [a.path for a in client.list_artifacts(k.info.run_id, "logs")] == [f"logs/{k.info.run_name}.log"]
    generate_log = workdir / "logs" / parent.info.run_id / "generate.log"
    assert "non-default args" in generate_log.read_text()  # vLLM's internals, kept for whoever needs them
    by_name = {k.info.run_name: k for k in kids}
    distill_history = client.get_metric_history(by_name["distill"].info.run_id, "loss")
    assert len(distill_history) == 3  # one point per step of the tiny recipe
    assert "teacher/compactlm_facts/acc" in by_name["evaluate"].data.metrics

    # The student is the configured shape, smaller than the teacher by exactly that much.
    student = Path(next(line.split(": ", 1)[1] for line in first.stdout.splitlines()
                        if line.startswith("Student model: ")))
    cfg = json.loads((student / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"]) == (3, 128)
    from transformers import AutoModelForCausalLM

    from compactlm.models import count_params, resolve_model
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random-llama"))
    model = AutoModelForCausalLM.from_pretrained(student)
    t_cfg = teacher.config
    per_layer_mlp = 3 * t_cfg.hidden_size
    per_layer_attn = sum(p.numel() for p in teacher.model.layers[0].self_attn.parameters())
    norms = 2 * t_cfg.hidden_size
    expected = (count_params(teacher) - 4 * (per_layer_attn + per_layer_mlp * 256 + norms)
                + 3 * (per_layer_attn + per_layer_mlp * 128 + norms))
    assert count_params(model) == expected < count_params(teacher)
    assert parent.data.metrics["student_param_fraction"] == pytest.approx(expected / count_params(teacher))
    # The parent run reads at a glance in the MLflow UI: the table as its description, key metrics for the chart
    # view, the training data as its input, the loss curve and the comparison as plots; the experiment opens
    # on its runs.
    assert "| student" in parent.data.tags["mlflow.note.content"]
    assert {"student/avg_acc", "student/word_ppl", "teacher/avg_acc"} <= set(parent.data.metrics)
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == [
        "plots/comparison.png", "plots/loss_curve.png"]
    assert client.get_run(parent.info.run_id).inputs.dataset_inputs
    assert client.get_experiment_by_name("compactlm-tiny").tags["mlflow.experimentKind"] == \
        "custom_model_development"

    # Planted secrets appear nowhere: MLflow store and artifacts, Prefect database and logs, stage outputs.
    assert _assert_no_secret_in(workdir, prefect_home) > 20

    # (That distilled and pruned students of every family load in vLLM unchanged is
    # tests/compactlm/pruning/test_vllm_students.py's check.)

    # Same parameters again: every stage is a cache hit, and the flow takes under half of the first one's time
    # (flow time = the parent MLflow run's duration; process start-up and imports are outside it; each run still
    # logs its parent summary and six child runs: ~10 s of a ~30 s first flow in CI since vLLM starts in process,
    # 14.6 s of 136 s before that under load 5-9).
    _run_cli(workdir, prefect_home)
    parents, children = _pipeline_runs(client)
    assert len(parents) == 2
    rerun = children[parents[1].info.run_id]
    assert {k.info.run_name for k in rerun} == STAGES
    assert all(k.data.tags["compactlm.cache_hit"] == "true" for k in rerun)
    first_flow, second_flow = (p.info.end_time - p.info.start_time for p in parents)
    assert second_flow < 0.5 * first_flow, (first_flow, second_flow)
    finals = [{k for k in r.data.metrics if k.startswith("final_")}
              for r in (by_name["distill"], next(r for r in rerun if r.info.run_name == "distill"))]
    assert finals[0] and finals[0] == finals[1]  # the same metric names whether computed or reused


@pytest.mark.integration
@pytest.mark.long(38)
def test_compress_into_a_student_of_another_family_and_tokenizer_on_mixed_data(tmp_path, other_student_dir,
                                                                               prefect_server):
    """`student:` set to a Qwen2 with its own BPE vocabulary, trained on the generated set mixed with a corpus:
    score and prune are skipped (the run tree and the table say so), the data stage mixes by tokens, distillation is
    ULD + CE across tokenizers, and the student loads in transformers. (Against a running Prefect server, as a
    team's runs would be; the test above covers the temporary one.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Story {i}: the quick brown fox jumps over the lazy dog near river {i}."
                                  for i in range(80)))
    sources = f"[{{kind: generated, weight: 0.7}}, {{kind: text, path: '{corpus}', weight: 0.3}}]"
    workdir = tmp_path / "work"
    proc = _run_cli(workdir, tmp_path / "prefect", "--set", f"student={other_student_dir}", "--set",
                    "generate.engine=hf", "--set", f"data.sources={sources}", "--set", "distill.kd_weight=0.5",
                    "--set", "eval.speed=false", api_url=prefect_server)
    table = proc.stdout[proc.stdout.index("| model"):]
    assert "| teacher" in table and "| student" in table and "| pruned" not in table, table
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    parents, children = _pipeline_runs(client)
    (parent,) = parents
    assert parent.data.tags["compactlm.student"] == str(other_student_dir)
    kids = {k.info.run_name: k for k in children[parent.info.run_id]}
    assert set(kids) == {"generate", "data", "distill", "evaluate"}  # no score, no prune
    data = kids["data"].data.metrics
    assert abs(data["source.0.generated.share"] - 0.7) <= 0.02 and abs(data["source.1.text.share"] - 0.3) <= 0.02
    inputs = client.get_run(kids["data"].info.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name.rsplit("-", 2)[-2:] == ["0", "generated"] or i.dataset.name.endswith("1-text")
                  for i in inputs) == [True, True]
    student = Path(next(line.split(": ", 1)[1] for line in proc.stdout.splitlines()
                        if line.startswith("Student model: ")))
    assert json.loads((student / "manifest.json").read_text())["cross_tokenizer_kd"] == "uld"
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    tok = AutoTokenizer.from_pretrained(student)
    assert model.config.model_type == "qwen2" and len(tok) == model.config.vocab_size == 1024
    # (that such a student loads in vLLM with HF's greedy tokens: tests/compactlm/pruning/test_vllm_students.py, in
    # its one vLLM subprocess)
