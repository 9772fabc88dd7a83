"""Per-stage flows and the pruning-candidate fan-out.

* library: a fan-out over ``measure_candidate`` ranks exactly like the sequential ``rank_candidates``, and
  ``prune_to_dir(ranking=...)`` writes the same student as measuring inside it;
* stage flows: bad upstream paths / runners fail before anything runs; a stage flow given a compress run's
  inputs lands on the compress output's key (a cache hit, same directory, same MLflow run tree shape), and a
  stage flow's output is reused by compress in turn (Prefect's temporary local server, real tasks);
* runners: process pool and local Ray fan out the candidates as Prefect task runs and pick what threads pick
  (integration).
"""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from compactlm.config import (DistillConfig, EvalConfig, GenerateConfig, PruneConfig, Recipe, ScoreConfig,
                              TrackingConfig)

TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
        "Knowledge is power, and power corrupts. The sun rises in the east and sets in the west. ") * 6


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="module")
def scored(tiny_gqa_model_dir, calib, tmp_path_factory) -> Path:
    from compactlm.importance import score_model

    out = tmp_path_factory.mktemp("stage-scores") / "scores"
    score_model(tiny_gqa_model_dir, calib, ScoreConfig(num_samples=2, seq_len=16, batch_size=2), out)
    return out


# ------------------------------------------------------------------------------------- library: fan-out units


@pytest.mark.parametrize("proxy", ["loss", "kl"])
def test_fan_out_ranks_exactly_like_the_sequential_path(tiny_gqa_model_dir, scored, calib, proxy):
    from compactlm.pruning import rank_candidates
    from compactlm.pruning.budget import measure_candidate, plan_candidates, rank_measured

    cfg = PruneConfig(params=0.95, search=4, candidates=4, proxy=proxy, proxy_samples=2, proxy_seq_len=16)
    sequential = rank_candidates(tiny_gqa_model_dir, scored, cfg, calib, seed=3)
    pool = plan_candidates(tiny_gqa_model_dir, scored, cfg)
    assert len(pool) == 4 and {c["kind"] for c in pool} == {"depth", "width", "mixed"}
    assert all("proxy_value" not in c for c in pool)
    with ThreadPoolExecutor(max_workers=4) as ex:  # concurrently, as the thread runner does
        measured = list(ex.map(lambda c: measure_candidate(tiny_gqa_model_dir, scored, cfg, calib, c, seed=3),
                               pool))
    fanned = rank_measured(measured)  # gathered in pool order
    assert fanned == sequential  # same shapes, same order, bit-identical proxy values
    assert len({c["proxy_value"] for c in fanned}) == 4  # a real ranking, not ties
    # ties keep pool order, as the sequential stable sort does
    tied = rank_measured([{**c, "proxy_value": 1.0} for c in pool])
    assert [c["shape"] for c in tied] == [c["shape"] for c in pool] and [c["rank"] for c in tied] == [1, 2, 3, 4]


def test_fan_out_units_reject_bad_input(tiny_gqa_model_dir, scored, calib):
    from compactlm.pruning.budget import measure_candidate, plan_candidates, rank_measured

    with pytest.raises(ValueError, match="prune.params is not set"):
        plan_candidates(tiny_gqa_model_dir, scored, PruneConfig())
    cfg = PruneConfig(params=0.95, search=2, proxy_samples=2, proxy_seq_len=16)
    with pytest.raises(ValueError, match="unknown fields.*num_layers"):
        measure_candidate(tiny_gqa_model_dir, scored, cfg, calib, {"shape": {"num_layers": 2}})
    with pytest.raises(ValueError, match="'shape' dict"):
        measure_candidate(tiny_gqa_model_dir, scored, cfg, calib, {"kind": "depth"})
    with pytest.raises(ValueError, match=r"candidates \[1\].*measure them first"):
        rank_measured([{"shape": {}, "proxy_value": 1.0}, {"shape": {}}])


def test_prune_to_dir_with_a_given_ranking_writes_the_same_student(tiny_gqa_model_dir, scored, calib, tmp_path):
    from compactlm.pruning import prune_to_dir
    from compactlm.pruning.budget import measure_candidate, plan_candidates, rank_measured

    cfg = PruneConfig(params=0.95, search=3, proxy_samples=2, proxy_seq_len=16)
    seq = prune_to_dir(tiny_gqa_model_dir, scored, cfg, tmp_path / "seq", calibration=calib)
    ranking = rank_measured([measure_candidate(tiny_gqa_model_dir, scored, cfg, calib, c)
                             for c in plan_candidates(tiny_gqa_model_dir, scored, cfg)])
    fan = prune_to_dir(tiny_gqa_model_dir, scored, cfg, tmp_path / "fan", ranking=ranking)  # no calibration
    for key in ("selection", "candidate", "ranking", "student", "kept_layers", "params_after"):
        assert fan[key] == seq[key], key
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "seq" / "model.safetensors"), load_file(tmp_path / "fan" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a ranking of another pool is refused before anything is written
    with pytest.raises(ValueError, match="does not measure this config's candidate pool"):
        prune_to_dir(tiny_gqa_model_dir, scored, cfg.model_copy(update={"search": 2}), tmp_path / "bad",
                     ranking=ranking)
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------- stage flows: early failures


def test_runner_check_names_the_extra(monkeypatch):
    import importlib.util

    from tasks.prune import check_runner

    check_runner("thread")
    check_runner("process")
    with pytest.raises(ValueError, match="runner must be one of thread, process, ray"):
        check_runner("dask")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "prefect_ray" else real(n, *a))
    with pytest.raises(ValueError, match=r"runner: ray needs prefect-ray.*\.\[ray\]"):
        check_runner("ray")


def test_stage_flows_check_upstream_paths_before_running(tmp_path, tiny_model_dir):
    """Plain-Python calls of the flow bodies: the checks come before any Prefect or MLflow call."""
    from flows import stages

    with pytest.raises(ValueError, match=r"scores_dir: .* is not a finished score output"):
        stages.prune.fn(str(tiny_model_dir), str(tmp_path / "nope"), workdir=str(tmp_path))
    (tmp_path / "half").mkdir()  # a directory without manifest.json: crashed or foreign
    with pytest.raises(ValueError, match="data_dir: .* is not a finished generate output"):
        stages.score.fn(str(tiny_model_dir), str(tmp_path / "half"), workdir=str(tmp_path))
    with pytest.raises(ValueError, match="data_dir: give the directory the generate stage returned"):
        stages.score.fn(str(tiny_model_dir), None, workdir=str(tmp_path))
    with pytest.raises(ValueError, match="student_dir: .* not a finished prune output"):
        stages.distill.fn(str(tiny_model_dir), str(tmp_path / "half"), str(tmp_path / "half"), workdir=str(tmp_path))
    with pytest.raises(ValueError, match="models: give at least one"):
        stages.evaluate.fn({}, workdir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown task"):
        stages.evaluate.fn({"teacher": str(tiny_model_dir)}, EvalConfig(tasks=["no_such_task_xyz"]),
                           workdir=str(tmp_path))
    with pytest.raises(ValueError, match="runner must be one of"):
        stages.prune.fn(str(tiny_model_dir), str(tmp_path / "nope"), runner="dask", workdir=str(tmp_path))
    assert not list(tmp_path.glob("*.db"))  # nothing was tracked


# ----------------------------------------------------------------- stage flows and compress share their outputs


@pytest.fixture(scope="module")
def prefect_server():
    """Prefect's temporary local server (what `compactlm run` uses without PREFECT_API_URL), one per module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # a loaded 2-core box starts it slowly
        yield


def _recipe(teacher: Path, workdir: Path, **prune) -> Recipe:
    return Recipe(name="stage-test", teacher=str(teacher), workdir=str(workdir), seed=0, device="cpu",
                  generate=GenerateConfig(engine="hf", max_prompts=4, max_tokens=16, shard_size=4, batch_size=4,
                                          max_repetition=None, near_dup_threshold=None),
                  score=ScoreConfig(num_samples=2, seq_len=32, batch_size=2, layer_loss=False),
                  prune=PruneConfig(**(prune or {"num_hidden_layers": 3, "intermediate_size": 128})),
                  distill=DistillConfig(steps=1, batch_size=2, seq_len=32, warmup_steps=0),
                  eval=EvalConfig(limit=4, batch_size=4, max_length=64, perplexity=False, speed=False),
                  tracking=TrackingConfig(experiment="stage-test", log_model=False))


def _stage_kwargs(r: Recipe) -> dict:
    return {"workdir": r.workdir, "seed": r.seed, "device": r.device, "tracking": r.tracking}


def _runs(workdir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("stage-test")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_stage_flows_and_compress_share_cache_hits(prefect_server, tiny_model_dir, tmp_path):
    """compress once (parameter budget: the candidates fan out as prune-candidate tasks and the choice equals
    the sequential library path); the prune and evaluate stage flows on its outputs are cache hits on its
    keys; a changed distill config through the stage flow computes a new student, which compress then
    reuses in turn."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from compactlm.pruning import prune_to_dir
    from flows import stages
    from flows.compress import compress

    r = _recipe(tiny_model_dir, tmp_path / "work", params=0.96, search=3, proxy_samples=2, proxy_seq_len=32)
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


# --------------------------------------------------------------------------------- process pool and local Ray


def _fan_out_flow(runner: str, teacher: str, scores: str, data: str, cfg: PruneConfig, workdir: str):
    from prefect import flow

    from tasks.common import RunContext
    from tasks.prune import fan_out_candidates

    @flow(name=f"fan-out-{runner}")
    def run() -> list:
        ctx = RunContext(workdir=workdir, tracking_uri="unused", experiment="unused", parent_run_id="unused")
        return fan_out_candidates(ctx, teacher, scores, data, cfg, runner)

    return run()


@pytest.mark.integration
@pytest.mark.parametrize("runner", ["process", "ray"])
def test_other_runners_pick_what_threads_pick(prefect_server, runner, tiny_gqa_model_dir, scored, tmp_path,
                                             caplog):
    if runner == "ray":
        pytest.importorskip("prefect_ray", reason="the `ray` extra is not installed")
    from compactlm.pruning import rank_candidates

    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    cfg = PruneConfig(params=0.95, search=4, proxy_samples=2, proxy_seq_len=16)
    args = (str(tiny_gqa_model_dir), str(scored), str(data), cfg, str(tmp_path))
    threads = _fan_out_flow("thread", *args)
    other = _fan_out_flow(runner, *args)
    assert [c["shape"] for c in other] == [c["shape"] for c in threads]
    assert [c["proxy_value"] for c in other] == pytest.approx([c["proxy_value"] for c in threads], rel=1e-5)
    assert threads == rank_candidates(tiny_gqa_model_dir, scored, cfg.model_copy(update={"candidates": 4}), data)
    if runner == "ray":
        import ray

        assert "Creating a local Ray instance" in caplog.text  # not a cluster from the environment
        assert not ray.is_initialized()  # the runner started its own local instance and shut it down
