"""Per-stage flows: bad upstream paths fail before anything runs; a stage flow and compress share their outputs
(cache hits both ways) under Prefect's temporary server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compactlm.config import (
    DistillConfig,
    EvalConfig,
    GenerateConfig,
    PruneConfig,
    Recipe,
    RunSettings,
    ScoreConfig,
    TrackingConfig,
)


def test_stage_flows_check_upstream_paths_before_running(tmp_path, tiny_model_dir):
    """Plain-Python calls of the flow bodies: the checks come before any Prefect or MLflow call."""
    from flows import stages

    here = RunSettings(workdir=str(tmp_path))
    with pytest.raises(ValueError, match=r"scores_dir: .* is not a finished score output"):
        stages.prune.fn(str(tiny_model_dir), str(tmp_path / "nope"), settings=here)
    (tmp_path / "half").mkdir()  # a directory without manifest.json: crashed or foreign
    with pytest.raises(ValueError, match="data_dir: .* is not a finished generate output"):
        stages.score.fn(str(tiny_model_dir), str(tmp_path / "half"), settings=here)
    with pytest.raises(ValueError, match="data_dir: give the directory the generate stage returned"):
        stages.score.fn(str(tiny_model_dir), None, settings=here)
    with pytest.raises(ValueError, match="student_dir: .* not a finished prune output"):
        stages.distill.fn(str(tiny_model_dir), str(tmp_path / "half"), str(tmp_path / "half"), settings=here)
    with pytest.raises(ValueError, match="models: give at least one"):
        stages.evaluate.fn({}, settings=here)
    with pytest.raises(ValueError, match="unknown task"):
        stages.evaluate.fn({"teacher": str(tiny_model_dir)}, EvalConfig(tasks=["no_such_task_xyz"]),
                           settings=here)
    with pytest.raises(ValueError, match="runner must be one of"):  # a plain call can pass what a form cannot
        stages.prune.fn(str(tiny_model_dir), str(tmp_path / "nope"),
                        settings=RunSettings.model_construct(**{**dict(here), "runner": "dask"}))
    assert not list(tmp_path.glob("*.db"))  # nothing was tracked


def _recipe(teacher: Path, workdir: Path, **prune) -> Recipe:
    return Recipe(name="stage-test", teacher=str(teacher), workdir=str(workdir), seed=0, device="cpu",
                  generate=GenerateConfig(engine="hf", max_prompts=4, max_tokens=16, shard_size=4, batch_size=4,
                                          filters=dict(max_repetition=None, near_dup_threshold=None)),
                  score=ScoreConfig(num_samples=2, seq_len=32, batch_size=2, layer_loss=False),
                  prune=PruneConfig(**(prune or {"num_hidden_layers": 3, "intermediate_size": 128})),
                  distill=DistillConfig(steps=1, batch_size=2, seq_len=32, warmup_steps=0),
                  eval=EvalConfig(limit=4, batch_size=4, max_length=64, perplexity=False, speed=False),
                  tracking=TrackingConfig(experiment="stage-test", log_model=False))


def _stage_kwargs(r: Recipe) -> dict:
    return {"settings": r.settings()}


def _runs(workdir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("stage-test")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.long(32)
def test_stage_flows_and_compress_share_cache_hits(prefect_server, tiny_model_dir, tmp_path, monkeypatch):
    """compress once (parameter budget: the candidates fan out as prune-candidate tasks and the choice equals
    the sequential library path); the prune and evaluate stage flows on its outputs are cache hits on its
    keys; a changed distill config through the stage flow computes a new student, which compress then
    reuses in turn. On a machine too small for a stage, its flow refuses before computing, naming config's
    field that fixes it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from compactlm.pruning import prune_to_dir
    from flows import stages
    from flows.compress import compress

    budget = dict(params=0.96, search=3, proxy_samples=2, proxy_seq_len=32)
    r = _recipe(tiny_model_dir, tmp_path / "work", budget=budget)
    first = compress(r)
    kw = _stage_kwargs(r)

    # fan-out: one task run per candidate, the same ranking as measuring them in one loop
    record = json.loads((Path(first["pruned"]) / "pruning.json").read_text())
    assert record["selection"] == "params" and len(record["ranking"]) == 3
    sequential = prune_to_dir(first["teacher"], first["scores"], r.prune, tmp_path / "seq",
                              calibration=first["data"])
    assert record["ranking"] == sequential["ranking"] and record["candidate"] == sequential["candidate"]
    parent = [x for x in _runs(tmp_path / "work") if x.info.run_id == first["mlflow_run_id"]][0]
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[parent.data.tags["prefect.flow_run_id"]])))
    candidates = [t for t in task_runs if t.name.startswith("prune-candidate-")]
    assert len(candidates) == 3 and all(t.state.is_completed() for t in candidates), [t.name for t in task_runs]

    # stage flows on compress's outputs: the same keys, cache hits
    pruned = stages.prune(str(tiny_model_dir), first["scores"], first["data"], r.prune, **kw)
    assert pruned == first["pruned"]
    evaluated = stages.evaluate({"teacher": str(tiny_model_dir), "pruned": first["pruned"],
                                 "student": first["student"]}, r.eval, **kw)
    assert evaluated == first["eval"]
    runs = _runs(tmp_path / "work")
    by_flow = {t: [x for x in runs if x.data.tags.get("compactlm.flow") == t] for t in ("prune", "evaluate")}
    for stage, (parent,) in by_flow.items():
        assert parent.info.status == "FINISHED" and parent.data.tags.get("prefect.flow_run_id")
        (child,) = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert child.info.run_name == stage and child.data.tags["compactlm.cache_hit"] == "true"
        assert child.data.tags["compactlm.output"] == first["pruned" if stage == "prune" else "eval"]
    assert "teacher/compactlm_facts/acc" in by_flow["evaluate"][0].data.metrics

    # a new distill config through the stage flow: computed there once, a cache hit for compress after
    distill_cfg = r.distill.model_copy(update={"lr": 2e-4})
    student = stages.distill(str(tiny_model_dir), first["pruned"], first["data"], distill_cfg, **kw)
    assert student != first["student"] and (Path(student) / "manifest.json").is_file()
    second = compress(r.model_copy(update={"distill": distill_cfg}))
    assert second["student"] == student
    kids = [x for x in _runs(tmp_path / "work") if x.data.tags.get("mlflow.parentRunId") == second["mlflow_run_id"]]
    hits = {k.info.run_name: k.data.tags["compactlm.cache_hit"] for k in kids}
    assert hits == {"generate": "true", "score": "true", "prune": "true", "distill": "true",
                    "evaluate": "false"}  # evaluate's inputs changed (a new student); the rest were reused

    # fsdp through the stage flow: the task starts the two ranks; rank 0's step metrics land in the stage's run
    sharded_cfg = DistillConfig(steps=2, batch_size=2, seq_len=32, warmup_steps=0, lr=1e-4, strategy="fsdp", nproc=2)
    sharded = stages.distill(str(tiny_model_dir), first["pruned"], first["data"], sharded_cfg, **kw)
    (child,) = [x for x in _runs(tmp_path / "work") if x.data.tags.get("compactlm.output") == sharded]
    assert child.info.status == "FINISHED" and child.data.metrics["final_world_size"] == 2
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{tmp_path / 'work'}/mlflow.db").get_metric_history(child.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2]

    # a machine too small: the stage flows refuse once the models are resolved, before computing anything
    monkeypatch.setenv("COMPACTLM_HOST_MEM_GIB", "0.5")
    bigger = distill_cfg.model_copy(update={"lr": 3e-4})
    with pytest.raises(ValueError, match=r"(?s)config: the distill stage does not fit this machine:.*has 0\.5 GiB; "
                       r"fix: config\.gradient_checkpointing: true.*COMPACTLM_SKIP_MEMORY_CHECK=1"):
        stages.distill(str(tiny_model_dir), first["pruned"], first["data"], bigger, **kw)
    with pytest.raises(ValueError, match=r"(?s)config: the score stage does not fit.*fix: config\.streaming: true"):
        stages.score(str(tiny_model_dir), first["data"], r.score, **kw)
    refused = [x for x in _runs(tmp_path / "work") if x.data.tags.get("compactlm.flow") in ("distill", "score")]
    assert [x.info.status for x in refused[-2:]] == ["FAILED", "FAILED"]
    assert not [x for x in _runs(tmp_path / "work") if x.data.tags.get("mlflow.parentRunId") in
                {x.info.run_id for x in refused[-2:]}]  # no stage (child) run started
