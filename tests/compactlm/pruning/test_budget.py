"""Parameter budgets: candidate shapes that fit, their ranking by a proxy, and the pruned student of the best."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compactlm.config import PruneConfig
from compactlm.importance import load_scores
from compactlm.models import count_params, load_model
from compactlm.pruning import candidate_shapes, param_count, prune_model, prune_to_dir
from tests.helpers import PRUNING_TEXT as TEXT
from tests.helpers import logits_of, quick_scores, random_ids


def test_candidate_shapes_fit_budget_and_rank_by_loss(tiny_gqa_model_dir):
    model = load_model(tiny_gqa_model_dir)
    total = count_params(model)
    assert param_count(model.config) == total
    ids = random_ids()
    # the 49k-token embeddings dominate this tiny model: dropping 3 of 4 layers only saves 6.4%
    cands = candidate_shapes(model.config, 0.95, scores=quick_scores(model, ids), model=model, calibration=ids,
                             max_per_kind=1, slack=0.05)
    assert sorted(c["kind"] for c in cands) == ["depth", "mixed", "width"]
    assert all(0.9 * total <= c["params"] <= 0.95 * total for c in cands)
    assert [c["proxy_loss"] for c in cands] == sorted(c["proxy_loss"] for c in cands)
    depth = next(c for c in cands if c["kind"] == "depth")["shape"]
    assert depth["hidden_size"] == 256 and depth["num_hidden_layers"] < 4
    with pytest.raises(ValueError, match="prune.budget.params"):
        candidate_shapes(model.config, 1.5)


SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


@pytest.mark.parametrize("budget", [0.9, 0.7, 0.5, 0.3])
def test_candidate_shapes_for_smollm2_budgets(budget):
    """Real SmolLM2-135M dimensions (config only): every kind, within budget, valid Llama configs, fast."""
    import time

    from transformers import LlamaConfig

    from compactlm.pruning import shape_kind, target_shape

    config = LlamaConfig(**SMOLLM2)
    total = param_count(config)
    assert total == 134_515_008  # SmolLM2-135M-Instruct
    t0 = time.perf_counter()
    cands = candidate_shapes(config, budget, max_per_kind=4)
    assert time.perf_counter() - t0 < 0.5  # preflight calls this: well under a second
    assert [c["kind"] for c in cands[:3]] == ["depth", "width", "mixed"]  # every prefix covers every kind
    teacher = {k: getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                "num_attention_heads")}
    seen = set()
    for c in cands:
        s = c["shape"]
        assert (budget - 0.05) * total <= c["params"] <= budget * total
        assert c["params"] == param_count(config, s) and c["param_ratio"] == pytest.approx(c["params"] / total)
        assert s["hidden_size"] % s["num_attention_heads"] == 0 and s["num_attention_heads"] % 3 == 0
        assert shape_kind({**s}, teacher) == c["kind"]
        assert target_shape(config, PruneConfig(**s))["hidden_size"] == s["hidden_size"]  # valid config
        seen.add(tuple(s.values()))
    assert len(seen) == len(cands)
    depth = cands[0]["shape"]  # depth-only: the deepest stack that fits
    assert {k: v for k, v in depth.items() if k != "num_hidden_layers"} == {
        k: v for k, v in teacher.items() if k != "num_hidden_layers"}
    assert param_count(config, {**depth, "num_hidden_layers": depth["num_hidden_layers"] + 1}) > budget * total


def test_unreachable_budget_is_a_clear_error():
    from transformers import LlamaConfig

    from compactlm.pruning import target_shape

    config = LlamaConfig(**SMOLLM2)  # 1 layer, a quarter of the width: still 5.5% (the embeddings)
    with pytest.raises(ValueError, match=r"prune.budget.params=0.05: no student shape fits.*set "
                                         r"prune.budget.params to at least 0.055"):
        candidate_shapes(config, 0.05)
    with pytest.raises(ValueError, match="no student shape fits"):  # what preflight calls
        target_shape(config, PruneConfig(budget=dict(params=0.05)))
    assert target_shape(config, PruneConfig(budget=dict(params=0.5)))["num_hidden_layers"] == 11
    assert candidate_shapes(config, 0.055)


def _kl_manual(teacher, student, ids):
    from compactlm.distillation.losses import _forward_kl_tokens

    t, s = logits_of(teacher, ids)[:, :-1], logits_of(student, ids)[:, :-1]
    V = t.shape[-1]
    return float(_forward_kl_tokens(torch.log_softmax(s.reshape(-1, V), -1),
                                    torch.log_softmax(t.reshape(-1, V), -1)).mean())


@pytest.mark.parametrize("proxy", ["loss", "kl"])
def test_rank_candidates(tiny_gqa_model_dir, scored, proxy, monkeypatch):
    from compactlm.calibration import calibration_loss
    from compactlm.pruning import budget, rank_candidates

    ids = random_ids(n=3, t=12)
    cfg = PruneConfig(budget=dict(params=0.95, proxy=proxy, candidates=3, search=5))
    ranked = rank_candidates(tiny_gqa_model_dir, scored, cfg, ids)
    assert len(ranked) == 3 and [c["rank"] for c in ranked] == [1, 2, 3]
    assert [c["proxy_value"] for c in ranked] == sorted(c["proxy_value"] for c in ranked)
    assert all(c["proxy"] == proxy and c["param_ratio"] <= 0.95 and c["proxy_value"] > 0 for c in ranked)
    assert set(ranked[0]) == {"rank", "kind", "shape", "params", "param_ratio", "proxy", "proxy_value"}
    # the proxy is what its name says, measured on the pruned (not distilled) model
    teacher, scores = load_model(tiny_gqa_model_dir), load_scores(scored)
    student, rec = prune_model(teacher, scores, PruneConfig(**ranked[0]["shape"]))
    assert rec["params_after"] == ranked[0]["params"]
    want = calibration_loss(student, ids) if proxy == "loss" else _kl_manual(teacher, student, ids)
    assert ranked[0]["proxy_value"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    if proxy == "kl":  # teacher log-probs recomputed per batch when they do not fit the cache: same ranking
        monkeypatch.setattr(budget, "TEACHER_CACHE_BYTES", 0)
        again = rank_candidates(tiny_gqa_model_dir, scored, cfg, ids)
        assert torch.is_grad_enabled()  # the teacher's per-batch generator ran to its end inside the proxy's no_grad
        assert [c["shape"] for c in again] == [c["shape"] for c in ranked]
        assert [c["proxy_value"] for c in again] == pytest.approx([c["proxy_value"] for c in ranked], rel=1e-3)
    with pytest.raises(ValueError, match="prune.budget is not set"):
        rank_candidates(tiny_gqa_model_dir, scored, PruneConfig(), ids)
    with pytest.raises(ValueError, match="is a budget, not a shape"):
        prune_model(teacher, scores, cfg)


def test_prune_to_dir_with_budget_picks_the_best_candidate(tiny_gqa_model_dir, scored, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    cfg = PruneConfig(budget=dict(params=0.95, search=4, proxy_samples=2, proxy_seq_len=16))
    out = tmp_path / "student"
    rec = prune_to_dir(tiny_gqa_model_dir, scored, cfg, out, calibration=calib)
    on_disk = json.loads((out / "pruning.json").read_text())
    assert on_disk["selection"] == "params" and on_disk["budget"] == 0.95
    assert len(on_disk["ranking"]) == 4 and on_disk["candidate"] == on_disk["ranking"][0] == rec["candidate"]
    assert {c["kind"] for c in on_disk["ranking"]} == {"depth", "width", "mixed"}
    best = on_disk["candidate"]["shape"]
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in best} == best and on_disk["params_after"] == on_disk["candidate"]["params"]
    assert on_disk["params_after"] <= 0.95 * on_disk["params_before"]
    # the same student as pruning to that shape explicitly
    in_memory, _ = prune_model(load_model(tiny_gqa_model_dir), load_scores(scored), PruneConfig(**best))
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(logits_of(loaded, random_ids()), logits_of(in_memory, random_ids()))


def test_budget_keeps_the_teacher_dtype(tiny_gqa_model_dir, scored, tmp_path):
    """Candidates are ranked in fp32 (bf16 is slow on CPU); the student is saved in the teacher's dtype,
    bit-identical to pruning the bf16 teacher directly."""
    from tests.helpers import bf16_copy

    bf16_dir = bf16_copy(tiny_gqa_model_dir, tmp_path / "teacher-bf16")
    rec = prune_to_dir(bf16_dir, scored, PruneConfig(budget=dict(params=0.95, search=3)), tmp_path / "out",
                       calibration=random_ids(n=2, t=12))
    assert rec["dtype"] == "bfloat16" and json.loads((tmp_path / "out/config.json").read_text())["dtype"] == "bfloat16"
    saved = load_model(tmp_path / "out", dtype="bfloat16")
    direct, _ = prune_model(load_model(bf16_dir, dtype="bfloat16"), load_scores(scored),
                            PruneConfig(**rec["candidate"]["shape"]))
    sd = direct.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in saved.state_dict().items())


def test_preflight_checks_the_budget(tiny_gqa_model_dir):
    from compactlm.config import Recipe
    from compactlm.preflight import preflight
    from compactlm.recipe import RecipeError

    teacher = str(tiny_gqa_model_dir)
    preflight(Recipe(teacher=teacher, prune=PruneConfig(budget=dict(params=0.95))), tiny_gqa_model_dir)
    with pytest.raises(RecipeError, match="prune: prune.budget.params=0.05: no student shape fits"):
        preflight(Recipe(teacher=teacher, prune=PruneConfig(budget=dict(params=0.05))), tiny_gqa_model_dir)
