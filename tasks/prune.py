"""Structured pruning stage: depth and width to the recipe's target shape.

With a parameter budget (``prune.budget``) the candidate shapes are fanned out as Prefect tasks, one
``prune-candidate`` task per shape (load the teacher, prune, measure the proxy on the calibration data), on the
task runner the recipe names (``runner``: thread | process | ray). The results are gathered in pool order and
ranked by :func:`compactlm.pruning.budget.rank_measured`, the same ordering the sequential library path uses,
so the chosen shape and the output (keyed exactly as before: the runner is not part of the key) are the same.
With ``prune.budget.short_distill`` the proxy's best ``distill_top`` then run as ``distill-candidate`` tasks on the
same runner (prune, distill briefly, measure again; :mod:`compactlm.candidates`) and lead the ranking.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from prefect import task
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from compactlm.choices import RUNNER_CHOICES as RUNNERS
from compactlm.choices import Runner
from compactlm.config import PruneConfig
from compactlm.tracking import Tracker
from tasks.common import RunContext, retry_transient, run_stage, stage_logger

#: CPUs of the local Ray instance started when $RAY_ADDRESS is unset (one candidate task per CPU at a time).
RAY_LOCAL_CPUS = 2
#: Object store of that local instance: candidates exchange only small dicts.
RAY_OBJECT_STORE_BYTES = 100 * 1024 * 1024


def check_runner(runner: str) -> None:
    """Fail early (before any compute) when `runner` is unknown or its packages are missing."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if runner == "ray" and importlib.util.find_spec("prefect_ray") is None:
        raise ValueError("runner: ray needs prefect-ray and ray: install the extra with "
                         "`pip install -c constraints/cpu.txt -e '.[ray]'` (make install does), or set "
                         "runner: thread / process")


def task_runner(runner: str, max_workers: int) -> TaskRunner:
    """A fresh, unstarted Prefect task runner of kind `runner` (use it as a context manager).

    thread / process: at most `max_workers` candidates at once. ray: the cluster at $RAY_ADDRESS when set,
    else a local Ray instance limited to RAY_LOCAL_CPUS CPUs (no dashboard, node bound to 127.0.0.1) that is
    shut down when the runner exits.
    """
    check_runner(runner)
    max_workers = max(1, max_workers)
    if runner == "thread":
        return ThreadPoolTaskRunner(max_workers=max_workers)
    if runner == "process":
        return ProcessPoolTaskRunner(max_workers=max_workers)
    from prefect_ray import RayTaskRunner

    address = os.environ.get("RAY_ADDRESS")
    if address:
        return RayTaskRunner(address=address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report (often no network)
    return RayTaskRunner(init_kwargs={"num_cpus": RAY_LOCAL_CPUS, "include_dashboard": False,
                                      "object_store_memory": RAY_OBJECT_STORE_BYTES,
                                      "_node_ip_address": "127.0.0.1"})


@task(name="prune-candidate", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def prune_candidate(ctx: RunContext, teacher_dir: str, scores_dir: str, data_dir: str, cfg: PruneConfig,
                    candidate: dict[str, Any]) -> dict[str, Any]:
    """Prune the teacher to one candidate shape and measure ``cfg.budget.proxy`` on the generated data."""
    from compactlm.pruning.budget import measure_candidate

    return measure_candidate(teacher_dir, scores_dir, cfg, data_dir, candidate, device=ctx.device, seed=ctx.seed)


def fan_out_candidates(ctx: RunContext, teacher_dir: str, scores_dir: str, data_dir: str, cfg: PruneConfig,
                       runner: str = "thread") -> list[dict[str, Any]]:
    """Measure every candidate of ``cfg.budget`` as its own ``prune-candidate`` task on a `runner` task runner;
    return the ranking (best first), identical to the sequential ``rank_candidates`` over the whole pool.
    Runs inside a flow or task run (the candidate task runs are its children in the Prefect UI)."""
    from compactlm.pruning.budget import plan_candidates, rank_measured

    pool = plan_candidates(teacher_dir, scores_dir, cfg)  # fails fast: no weights loaded yet
    stage_logger().info("prune: fanning out %d candidates on the %s runner", len(pool), runner)
    with task_runner(runner, max_workers=min(len(pool), os.cpu_count() or 1)) as pool_runner:
        futures = [pool_runner.submit(prune_candidate.with_options(
                       task_run_name=f"prune-candidate-{i}-{c['kind']}"),
                       {"ctx": ctx, "teacher_dir": teacher_dir, "scores_dir": scores_dir, "data_dir": data_dir,
                        "cfg": cfg, "candidate": c})
                   for i, c in enumerate(pool)]
        measured = [f.result() for f in futures]  # pool order, whatever order they finished in
    return rank_measured(measured)


@task(name="distill-candidate", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def distill_candidate(ctx: RunContext, teacher_dir: str, scores_dir: str, data_dir: str, cfg: PruneConfig,
                      candidate: dict[str, Any], cache_dir: str) -> dict[str, Any]:
    """Prune the teacher to one of the proxy's best shapes, distill it briefly and measure the proxy again."""
    from compactlm.candidates import distill_candidate as run

    return run(teacher_dir, scores_dir, cfg, data_dir, candidate, device=ctx.device, seed=ctx.seed,
               cache_dir=cache_dir)


def short_distill_ranking(ctx: RunContext, teacher_dir: str, scores_dir: str, data_dir: str, cfg: PruneConfig,
                          ranking: list[dict[str, Any]], out: Path, runner: str = "thread") -> list[dict[str, Any]]:
    """With ``cfg.budget.short_distill``: the proxy's best ``distill_top`` as ``distill-candidate`` tasks on a
    `runner` task runner, then the ranking with them first by their distilled proxy (else `ranking` as is). Each
    finished candidate is kept beside `out` until the stage publishes, so a killed stage redoes only the rest."""
    from compactlm.candidates import rerank, to_distill
    from compactlm.pruning.prune import short_distill_dir

    top = to_distill(ranking, cfg)
    if not top:
        return ranking
    stage_logger().info("prune: distilling the proxy's best %d candidates (%d steps each) on the %s runner",
                        len(top), cfg.budget.short_distill.steps, runner)
    with task_runner(runner, max_workers=min(len(top), os.cpu_count() or 1)) as pool_runner:
        futures = [pool_runner.submit(distill_candidate.with_options(
                       task_run_name=f"distill-candidate-{c['rank']}-{c['kind']}"),
                       {"ctx": ctx, "teacher_dir": teacher_dir, "scores_dir": scores_dir, "data_dir": data_dir,
                        "cfg": cfg, "candidate": c, "cache_dir": str(short_distill_dir(out))})
                   for c in top]
        distilled = [f.result() for f in futures]
    return rerank(ranking, distilled)


def _log(tracker: Tracker, run_id: str, out: Path, summary: dict) -> None:
    record = json.loads((out / "pruning.json").read_text())
    tracker.log_metrics(run_id, {k: v for k, v in record.items() if k.startswith("params")})
    if record.get("repair"):  # how much of the removed units' output the refit rebuilt (calibration tokens)
        tracker.log_metrics(run_id, {f"repair_{k}": record["repair"][f"mean_{k}"]
                                     for k in ("error_before", "error_after")})
    tracker.log_artifact(run_id, out / "pruning.json")
    tracker.log_artifact(run_id, out / "config.json")


@task(name="prune", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def prune(ctx: RunContext, teacher_dir: str, scores_dir: str, data_dir: str, cfg: PruneConfig,
          runner: Runner = "thread", label: str = "prune") -> str:
    """Prune to cfg's explicit shape, or, with a parameter budget (`cfg.budget`), to the best of the candidate
    shapes ranked on the generated data; the candidates are measured as parallel tasks on `runner` (see the module
    docstring). With `cfg.repair` the student's output projections are refitted on the generated data. Either way
    the data becomes an input of the output's key. A cache hit measures nothing. `label` names a round of a
    schedule (``prune-r1``: its child run, log and console lines)."""
    from compactlm.pruning import prune_to_dir

    check_runner(runner)
    budget = cfg.budget is not None
    calibrated = budget or cfg.repair is not None  # the generated data ranks candidates and/or refits the student

    def produce(out: Path, log_step) -> dict:
        ranking = None
        if budget:
            ranking = fan_out_candidates(ctx, teacher_dir, scores_dir, data_dir, cfg, runner)
            ranking = short_distill_ranking(ctx, teacher_dir, scores_dir, data_dir, cfg, ranking, out, runner)
        return prune_to_dir(teacher_dir, scores_dir, cfg, out, calibration=data_dir if calibrated else None,
                            device=ctx.device, seed=ctx.seed, ranking=ranking)

    upstream = [teacher_dir, scores_dir] + ([data_dir] if calibrated else [])
    return run_stage(ctx, "prune", cfg, upstream, produce, _log, label=label)
