"""The pruning-candidate fan-out on Prefect task runners: threads, a process pool, local Ray."""

from __future__ import annotations

import pytest

from compactlm.config import PruneConfig
from tests.helpers import FANOUT_TEXT as TEXT


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


def _fan_out_flow(runner: str, teacher: str, scores: str, data: str, cfg: PruneConfig, workdir: str):
    from prefect import flow

    from tasks.common import RunContext
    from tasks.prune import fan_out_candidates

    @flow(name=f"fan-out-{runner}")
    def run() -> list:
        ctx = RunContext(workdir=workdir, tracking_uri="unused", experiment="unused", parent_run_id="unused")
        return fan_out_candidates(ctx, teacher, scores, data, cfg, runner)

    return run()


@pytest.mark.long(26)
@pytest.mark.integration
@pytest.mark.parametrize("runner", ["process", "ray"])
def test_other_runners_pick_what_threads_pick(prefect_server, runner, tiny_gqa_model_dir, fanout_scores, tmp_path,
                                             caplog):
    if runner == "ray":
        pytest.importorskip("prefect_ray", reason="the `ray` extra is not installed")
    from compactlm.pruning import rank_candidates

    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    cfg = PruneConfig(budget=dict(params=0.95, search=4, proxy_samples=2, proxy_seq_len=16))
    args = (str(tiny_gqa_model_dir), str(fanout_scores), str(data), cfg, str(tmp_path))
    threads = _fan_out_flow("thread", *args)
    other = _fan_out_flow(runner, *args)
    assert [c["shape"] for c in other] == [c["shape"] for c in threads]
    assert [c["proxy_value"] for c in other] == pytest.approx([c["proxy_value"] for c in threads], rel=1e-5)
    four = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"candidates": 4})})
    assert threads == rank_candidates(tiny_gqa_model_dir, fanout_scores, four, data)
    if runner == "ray":
        import ray

        assert "Creating a local Ray instance" in caplog.text  # not a cluster from the environment
        assert not ray.is_initialized()  # the runner started its own local instance and shut it down


@pytest.mark.integration
@pytest.mark.long(20)
def test_short_distill_fan_out_ranks_like_the_sequential_path(prefect_server, tiny_gqa_model_dir, fanout_scores,
                                                              data_dir, tmp_path):
    """The proxy's best candidates distilled as parallel ``distill-candidate`` tasks (threads) rank like the
    sequential path, and the stage then prunes that ranking's first shape."""
    from prefect import flow

    from compactlm.candidates import rank_with_short_distill
    from compactlm.pruning import prune_to_dir
    from tasks.common import RunContext
    from tasks.prune import fan_out_candidates, short_distill_ranking

    cfg = PruneConfig(budget={"params": 0.95, "search": 4, "proxy": "kl", "proxy_samples": 2, "proxy_seq_len": 16,
                              "distill_top": 2, "short_distill": {"steps": 3, "batch_size": 2, "seq_len": 32,
                                                                  "lr": 1e-4, "warmup_steps": 0}})
    teacher, scores, data = str(tiny_gqa_model_dir), str(fanout_scores), str(data_dir)

    @flow(name="short-distill-fan-out")
    def run() -> list:
        ctx = RunContext(workdir=str(tmp_path), tracking_uri="unused", experiment="unused", parent_run_id="unused",
                         seed=3)
        ranking = fan_out_candidates(ctx, teacher, scores, data, cfg, "thread")
        return short_distill_ranking(ctx, teacher, scores, data, cfg, ranking, tmp_path / "out", "thread")

    fanned = run()
    seq = rank_with_short_distill(teacher, scores, cfg, data, seed=3)
    assert [c["shape"] for c in fanned] == [c["shape"] for c in seq]
    assert [c.get("distilled_value", 0.0) for c in fanned] == pytest.approx(
        [c.get("distilled_value", 0.0) for c in seq], rel=1e-4)
    assert [c["proxy_rank"] for c in fanned] == [c["proxy_rank"] for c in seq]
    fan = prune_to_dir(teacher, scores, cfg, tmp_path / "fan", ranking=fanned)
    assert fan["candidate"]["shape"] == seq[0]["shape"]
