"""Budget candidates ranked by a short distillation (compactlm.candidates): the proxy's best few are distilled
briefly and ranked again."""

from __future__ import annotations

import json

import pytest

from compactlm.config import PruneConfig

SHORT = dict(steps=3, batch_size=2, seq_len=32, lr=1e-4, warmup_steps=0)


def _cfg(**budget) -> PruneConfig:
    return PruneConfig(budget={"params": 0.95, "search": 4, "proxy": "kl", "proxy_samples": 2, "proxy_seq_len": 16,
                               "distill_top": 2, "short_distill": SHORT, **budget})


def _prune(teacher, scores, cfg: PruneConfig, out, data, seed: int) -> dict:
    """The budget's student as the prune stage makes it: ranked with the short runs, then the first pruned."""
    from compactlm.candidates import rank_with_short_distill
    from compactlm.pruning import prune_to_dir

    ranking = rank_with_short_distill(teacher, scores, cfg, data, seed=seed)
    return prune_to_dir(teacher, scores, cfg, out, ranking=ranking, seed=seed)


@pytest.mark.long(15)
def test_short_distill_ranking_is_deterministic_for_a_seed(tiny_gqa_model_dir, fanout_scores, data_dir, tmp_path):
    cfg = _cfg()
    a = _prune(tiny_gqa_model_dir, fanout_scores, cfg, tmp_path / "a", data_dir, seed=3)
    b = _prune(tiny_gqa_model_dir, fanout_scores, cfg, tmp_path / "b", data_dir, seed=3)
    def values(record: dict) -> list:  # everything but the wall-clock seconds
        return [{**c, "short_distill": {k: v for k, v in c.get("short_distill", {}).items() if k != "seconds"}}
                for c in record["ranking"]]

    assert values(a) == values(b)  # same order, bit-identical values
    ranking = a["ranking"]
    distilled = [c for c in ranking if "distilled_value" in c]
    assert ranking[:2] == distilled and {c["proxy_rank"] for c in distilled} == {1, 2}  # the proxy's best two
    assert [c["proxy_rank"] for c in ranking[2:]] == [3, 4] and [c["rank"] for c in ranking] == [1, 2, 3, 4]
    assert distilled[0]["distilled_value"] <= distilled[1]["distilled_value"]
    assert all(c["distilled_value"] != c["proxy_value"] for c in distilled)  # measured again, after training
    assert all(c["short_distill"]["steps"] == 3 and c["short_distill"]["tokens"] == 3 * 2 * 32 for c in distilled)
    assert a["candidate"] == ranking[0] and a["student"]["num_hidden_layers"] == \
        ranking[0]["shape"].get("num_hidden_layers", a["teacher"]["num_hidden_layers"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # the short runs' files are gone

    c = _prune(tiny_gqa_model_dir, fanout_scores, cfg, tmp_path / "c", data_dir, seed=4)
    assert [x["distilled_value"] for x in c["ranking"][:2]] != [x["distilled_value"] for x in distilled]


def test_a_finished_short_distillation_is_not_run_again(tiny_gqa_model_dir, fanout_scores, data_dir, tmp_path):
    """A prune stage killed during the short runs keeps the finished ones (one file per shape) and reruns the
    rest only."""
    from compactlm.candidates import distill_candidate
    from compactlm.pruning.budget import plan_candidates

    cfg = _cfg()
    cand = {**plan_candidates(tiny_gqa_model_dir, fanout_scores, cfg)[0], "proxy_value": 1.0, "rank": 1}
    first = distill_candidate(tiny_gqa_model_dir, fanout_scores, cfg, data_dir, cand, seed=3, cache_dir=tmp_path)
    (kept,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]  # the temporary models are gone
    assert [p.name for p in tmp_path.iterdir()] == [kept.name]
    kept.write_text(json.dumps({**first, "distilled_value": -1.0}))  # were it recomputed, this would be lost
    again = distill_candidate(tiny_gqa_model_dir, fanout_scores, cfg, data_dir, cand, seed=3, cache_dir=tmp_path)
    assert again["distilled_value"] == -1.0


def test_short_distill_needs_the_generated_dataset_and_a_valid_config(tiny_gqa_model_dir, fanout_scores,
                                                                     fanout_calib):
    from compactlm.candidates import distill_candidate
    from compactlm.pruning.budget import plan_candidates

    cfg = _cfg()
    cand = plan_candidates(tiny_gqa_model_dir, fanout_scores, cfg)[0]
    with pytest.raises(ValueError, match="short_distill trains on the generated dataset"):
        distill_candidate(tiny_gqa_model_dir, fanout_scores, cfg, fanout_calib, cand)
    with pytest.raises(ValueError, match=r"(?s)budget.short_distill.*warmup_steps \(5\) must not exceed"):
        _cfg(short_distill={**SHORT, "warmup_steps": 5})
    with pytest.raises(ValueError, match="budget.distill_top"):
        _cfg(distill_top=0)
    from compactlm.pruning import prune_to_dir

    with pytest.raises(ValueError, match="rank_with_short_distill"):  # the pruning library runs no distillation
        prune_to_dir(tiny_gqa_model_dir, fanout_scores, cfg, fanout_calib.parent / "nope", calibration=fanout_calib)
    assert not (fanout_calib.parent / "nope").exists()
