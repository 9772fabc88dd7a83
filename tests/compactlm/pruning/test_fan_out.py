"""The budget's fan-out units: measuring candidates one by one (as parallel tasks do) ranks exactly like the
sequential path."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from compactlm.config import PruneConfig


@pytest.fixture(scope="module")
def bf16_teacher(tiny_gqa_model_dir, tmp_path_factory):
    """The GQA tiny model stored in bfloat16, as most checkpoints are."""
    from tests.helpers import bf16_copy

    return bf16_copy(tiny_gqa_model_dir, tmp_path_factory.mktemp("bf16") / "teacher")


@pytest.mark.parametrize("stored,proxy,repair", [("float32", "loss", False), ("float32", "kl", False),
                                                 ("bfloat16", "loss", False), ("bfloat16", "kl", False),
                                                 ("bfloat16", "loss", True)])
def test_fan_out_ranks_exactly_like_the_sequential_path(tiny_gqa_model_dir, bf16_teacher, fanout_scores, fanout_calib,
                                                        stored, proxy, repair, monkeypatch):
    """A fan-out task loads a bf16 teacher as stored (its file pages, shared by the tasks) and makes only the
    candidate fp32; the KL proxy's and a repair's teacher forwards run it as its fp32 copy would, one module at a
    time. The sequential path prunes, repairs and measures with the fp32 teacher and rounds the candidate to bf16 as
    the stage publishes it: the same candidates, bit for bit."""
    import compactlm.models
    from compactlm.pruning import rank_candidates
    from compactlm.pruning.budget import measure_candidate, plan_candidates, rank_measured

    teacher = bf16_teacher if stored == "bfloat16" else tiny_gqa_model_dir
    cfg = PruneConfig(budget=dict(params=0.95, search=4, candidates=4, proxy=proxy, proxy_samples=2, proxy_seq_len=16),
                      repair=dict(num_samples=4, seq_len=16) if repair else None)
    sequential = rank_candidates(teacher, fanout_scores, cfg, fanout_calib, seed=3)
    pool = plan_candidates(teacher, fanout_scores, cfg)
    assert len(pool) == 4 and {c["kind"] for c in pool} == {"depth", "width", "mixed"}
    assert all("proxy_value" not in c for c in pool)
    loaded, load = [], compactlm.models.load_model
    monkeypatch.setattr(compactlm.models, "load_model", lambda d, **kw: loaded.append(kw["dtype"]) or load(d, **kw))
    with ThreadPoolExecutor(max_workers=4) as ex:  # concurrently, as the thread runner does
        measured = list(ex.map(lambda c: measure_candidate(teacher, fanout_scores, cfg, fanout_calib, c, seed=3),
                               pool))
    assert loaded == [stored] * 4  # each task's teacher as stored
    fanned = rank_measured(measured)  # gathered in pool order
    assert fanned == sequential  # same shapes, same order, bit-identical proxy values
    assert len({c["proxy_value"] for c in fanned}) == 4  # a real ranking, not ties
    assert all(c.get("repaired", False) == repair for c in fanned)
    # ties keep pool order, as the sequential stable sort does
    tied = rank_measured([{**c, "proxy_value": 1.0} for c in pool])
    assert [c["shape"] for c in tied] == [c["shape"] for c in pool] and [c["rank"] for c in tied] == [1, 2, 3, 4]


def test_fan_out_units_reject_bad_input(tiny_gqa_model_dir, fanout_scores, fanout_calib):
    from compactlm.pruning.budget import measure_candidate, plan_candidates, rank_measured

    with pytest.raises(ValueError, match="prune.budget is not set"):
        plan_candidates(tiny_gqa_model_dir, fanout_scores, PruneConfig())
    cfg = PruneConfig(budget=dict(params=0.95, search=2, proxy_samples=2, proxy_seq_len=16))
    with pytest.raises(ValueError, match="unknown fields.*num_layers"):
        measure_candidate(tiny_gqa_model_dir, fanout_scores, cfg, fanout_calib, {"shape": {"num_layers": 2}})
    with pytest.raises(ValueError, match="'shape' dict"):
        measure_candidate(tiny_gqa_model_dir, fanout_scores, cfg, fanout_calib, {"kind": "depth"})
    with pytest.raises(ValueError, match=r"candidates \[1\].*measure them first"):
        rank_measured([{"shape": {}, "proxy_value": 1.0}, {"shape": {}}])


def test_prune_to_dir_with_a_given_ranking_writes_the_same_student(tiny_gqa_model_dir, fanout_scores, fanout_calib,
                                                                   tmp_path):
    from compactlm.pruning import prune_to_dir
    from compactlm.pruning.budget import measure_candidate, plan_candidates, rank_measured

    cfg = PruneConfig(budget=dict(params=0.95, search=3, proxy_samples=2, proxy_seq_len=16))
    seq = prune_to_dir(tiny_gqa_model_dir, fanout_scores, cfg, tmp_path / "seq", calibration=fanout_calib)
    ranking = rank_measured([measure_candidate(tiny_gqa_model_dir, fanout_scores, cfg, fanout_calib, c)
                             for c in plan_candidates(tiny_gqa_model_dir, fanout_scores, cfg)])
    fan = prune_to_dir(tiny_gqa_model_dir, fanout_scores, cfg, tmp_path / "fan", ranking=ranking)  # no calibration
    for key in ("selection", "candidate", "ranking", "student", "kept_layers", "params_after"):
        assert fan[key] == seq[key], key
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "seq" / "model.safetensors"), load_file(tmp_path / "fan" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a ranking of another pool is refused before anything is written
    smaller = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"search": 2})})
    with pytest.raises(ValueError, match="does not measure this config's candidate pool"):
        prune_to_dir(tiny_gqa_model_dir, fanout_scores, smaller, tmp_path / "bad", ranking=ranking)
    assert not (tmp_path / "bad").exists()


def test_concurrent_pruning_leaves_weight_init_intact(tiny_gqa_model_dir, fanout_scores):
    """Pruning in threads (the thread runner's fan-out) must not switch weight initialisation off for the rest of
    the process: transformers' no_init_weights patches torch's init functions globally, and two threads
    entering and leaving it at once restored each other's no-op (later models came out uninitialised: NaN)."""
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compactlm.formats.scores import load_scores
    from compactlm.models import load_model
    from compactlm.pruning import prune_model

    init_before = (torch.nn.init.normal_, torch.nn.init.kaiming_uniform_, transformers.PreTrainedModel.init_weights)
    teacher, scores = load_model(tiny_gqa_model_dir), load_scores(fanout_scores)
    cfg = PruneConfig(num_hidden_layers=3, intermediate_size=256)
    with ThreadPoolExecutor(max_workers=8) as ex:
        list(ex.map(lambda _: prune_model(teacher, scores, cfg), range(24)))
    assert (torch.nn.init.normal_, torch.nn.init.kaiming_uniform_,
            transformers.PreTrainedModel.init_weights) == init_before
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=16, num_attention_heads=2,
                                                         num_key_value_heads=1, num_hidden_layers=1,
                                                         intermediate_size=32))
    assert all(torch.isfinite(p).all() and p.abs().max() < 10 for p in fresh.parameters())


def test_with_repair_candidates_are_ranked_as_repaired(tiny_gqa_model_dir, fanout_scores, fanout_calib, tmp_path):
    """prune.repair + a budget: every candidate is repaired (on rows drawn with seed + 1) before its proxy is
    measured, identically in the sequential path and the fan-out units, and prune_to_dir publishes the winner."""
    from compactlm.pruning import prune_to_dir, rank_candidates
    from compactlm.pruning.budget import measure_candidate, plan_candidates, rank_measured

    budget = dict(params=0.95, search=4, candidates=4, proxy_samples=2, proxy_seq_len=16)
    plain_cfg = PruneConfig(budget=budget)
    cfg = PruneConfig(budget=budget, repair=dict(num_samples=4, seq_len=16))
    plain = {json.dumps(c["shape"]): c for c in rank_candidates(tiny_gqa_model_dir, fanout_scores, plain_cfg,
                                                                fanout_calib)}
    repaired = rank_candidates(tiny_gqa_model_dir, fanout_scores, cfg, fanout_calib)
    assert all(c["repaired"] for c in repaired) and len(repaired) == 4
    assert any(c["shape"]["intermediate_size"] < 512 for c in repaired)
    for c in repaired:  # a candidate that keeps every head and neuron of its layers has nothing to refit
        before = plain[json.dumps(c["shape"])]["proxy_value"]
        cuts_units = c["shape"]["intermediate_size"] < 512 or c["shape"]["num_attention_heads"] < 4
        assert c["proxy_value"] != before if cuts_units else c["proxy_value"] == before, c
    measured = [measure_candidate(tiny_gqa_model_dir, fanout_scores, cfg, fanout_calib, c)
                for c in plan_candidates(tiny_gqa_model_dir, fanout_scores, cfg)]
    assert rank_measured(measured) == repaired
    rec = prune_to_dir(tiny_gqa_model_dir, fanout_scores, cfg, tmp_path / "s", calibration=fanout_calib)
    assert rec["candidate"] == repaired[0] and "repair" in rec
