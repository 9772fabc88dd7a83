"""Structured pruning: exactness on zeroed units, GQA-aware heads, depth, save/load, validation, vLLM."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compactlm.config import PruneConfig, ScoreConfig
from compactlm.importance import ImportanceScores, compute_importance, load_scores, score_model
from compactlm.models import count_params, load_model
from compactlm.pruning import candidate_shapes, param_count, prune_model, prune_to_dir

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             num_hidden_layers=3, tie_word_embeddings=False)
TEXT = "\n\n".join(f"Line {i}: pruning keeps the heads, neurons and channels that matter most." for i in range(20))


def _ids(n=2, t=10, seed=0):
    return torch.randint(0, 5000, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _randomize_biases(model, seed=0):
    """HF initializes biases to zero; make them random so bias slicing is really exercised (Qwen2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))


def _scores(model, ids=None):
    return compute_importance(model, _ids() if ids is None else ids, batch_size=2, layer_loss=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_nothing_and_removing_zeroed_units_is_exact(tiny_factory, arch):
    """Pruning nothing is the identity. Then zero some heads' o_proj columns, neurons' up rows, channels
    everywhere they enter the residual stream, and one layer's o_proj/down_proj: pruning exactly those
    leaves the logits unchanged."""
    model = load_model(tiny_factory(arch=arch, **SHAPE))
    _randomize_biases(model)
    ids = _ids()
    # pruning nothing is the identity
    student, rec = prune_model(model, _scores(model, ids), PruneConfig())
    assert torch.equal(_logits(model, ids), _logits(student, ids))
    assert rec["params_before"] == rec["params_after"] == count_params(model)
    assert rec["kept_layers"] == [0, 1, 2] and rec["kept_heads"] == [[0, 1, 2, 3]] * 3

    hd, D = model.config.head_dim, model.config.hidden_size
    dead_neurons = [3, 40, 41, 100]
    dead_channels = [0, 7, 64, 127]
    with torch.no_grad():
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            att.o_proj.weight[:, 1 * hd:2 * hd] = 0  # head 1 (KV group 0) and head 2 (group 1) write nothing
            att.o_proj.weight[:, 2 * hd:3 * hd] = 0
            mlp.up_proj.weight[dead_neurons] = 0
            att.o_proj.weight[dead_channels] = 0
            mlp.down_proj.weight[dead_channels] = 0
            if att.o_proj.bias is not None:
                att.o_proj.bias[dead_channels] = 0
        model.model.embed_tokens.weight[:, dead_channels] = 0
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    eps_ref, eps = _logits(model, ids), model.config.rms_norm_eps
    # RMSNorm's eps is the one inexact part of channel removal (relative to these random models' tiny
    # activations it moves logits by ~2e-5); set it to 0 so the comparison isolates the pruning itself.
    model.config.rms_norm_eps = 0.0
    for m in model.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 0.0
    scores = _scores(model, ids)
    assert (scores.neurons[:, dead_neurons] == 0).all() and (scores.channels[dead_channels] == 0).all()
    assert scores.layer_block_influence.argmin() == 1
    # Head scores measure the o_proj *input*, which zeroed o_proj columns do not change: mark them lowest.
    scores.heads[:, [1, 2]] = -1.0
    ref = _logits(model, ids)

    targets = [dict(num_attention_heads=2), dict(intermediate_size=124), dict(hidden_size=124),
               dict(num_hidden_layers=2),
               dict(num_attention_heads=2, intermediate_size=124, hidden_size=124, num_hidden_layers=2)]
    for target in targets:
        student, rec = prune_model(model, scores, PruneConfig(**target))
        torch.testing.assert_close(_logits(student, ids), ref, rtol=1e-5, atol=2e-5, msg=str(target))
        assert rec["params_after"] < rec["params_before"] == count_params(model)
        assert param_count(model.config, rec["student"]) == rec["params_after"] == count_params(student)
    assert rec["kept_layers"] == [0, 2] and rec["kept_heads"] == [[0, 3], [0, 3]]
    assert rec["kept_neurons"] == [124, 124] and rec["kept_channels"] == [c for c in range(D) if c not in dead_channels]
    assert rec["student"] == {"num_hidden_layers": 2, "hidden_size": 124, "intermediate_size": 124,
                              "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": hd}
    assert rec["params_after"] == count_params(student)
    # with the teacher's eps restored the student is still within 1e-4
    for m in list(model.modules()) + list(student.modules()):
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = eps
    torch.testing.assert_close(_logits(student, ids), eps_ref, rtol=0, atol=1e-4)
    # RMSNorm rescaling is what makes channel removal exact: without it the logits change.
    plain, _ = prune_model(model, scores, PruneConfig(hidden_size=124, rescale_norms=False))
    assert not torch.allclose(_logits(plain, ids), ref, rtol=1e-3, atol=1e-3)


def _manual_scores(model, heads=None, layers=None, loss=None):
    c = model.config
    L, H, I, D = c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.hidden_size
    return ImportanceScores(
        heads=torch.tensor(heads, dtype=torch.float32) if heads is not None else torch.ones(L, H),
        neurons=torch.arange(L * I, dtype=torch.float32).view(L, I), channels=torch.arange(D, dtype=torch.float32),
        layer_block_influence=torch.tensor(layers if layers is not None else [1.0] * L),
        layer_loss_increase=torch.tensor(loss) if loss is not None else None, num_key_value_heads=c.num_key_value_heads)


def test_heads_pruned_within_kv_groups(tiny_gqa_model_dir):
    model = load_model(tiny_gqa_model_dir)  # 4 query heads in 2 KV groups: {0,1} -> kv 0, {2,3} -> kv 1
    hd = model.config.head_dim
    # globally the best two heads are 0 and 1 (both group 0); each group must still keep its best head
    heads = [[9, 8, 1, 2], [1, 9, 8, 2], [5, 6, 7, 8], [3, 1, 2, 2]]
    student, rec = prune_model(model, _manual_scores(model, heads=heads), PruneConfig(num_attention_heads=2))
    assert rec["kept_heads"] == [[0, 3], [1, 2], [1, 3], [0, 2]]  # ties keep the lower index
    assert student.config.num_attention_heads == 2 and student.config.num_key_value_heads == 2
    for t_layer, s_layer, kept in zip(model.model.layers, student.model.layers, rec["kept_heads"]):
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kept])
        assert torch.equal(s_layer.self_attn.q_proj.weight, t_layer.self_attn.q_proj.weight[rows])
        assert torch.equal(s_layer.self_attn.o_proj.weight, t_layer.self_attn.o_proj.weight[:, rows])
        assert torch.equal(s_layer.self_attn.k_proj.weight, t_layer.self_attn.k_proj.weight)
        assert torch.equal(s_layer.self_attn.v_proj.weight, t_layer.self_attn.v_proj.weight)


def test_depth_keeps_best_layers_in_order(tiny_gqa_model_dir):
    model = load_model(tiny_gqa_model_dir)
    scores = _manual_scores(model, layers=[0.5, 0.1, 0.9, 0.3], loss=[0.2, 0.3, 0.1, 0.4])
    for metric, expect in [("block_influence", [0, 2]), ("loss", [1, 3])]:
        student, rec = prune_model(model, scores, PruneConfig(num_hidden_layers=2, layer_metric=metric))
        assert rec["kept_layers"] == expect and student.config.num_hidden_layers == 2
        for s_layer, t_idx in zip(student.model.layers, expect):
            t_layer = model.model.layers[t_idx]
            assert torch.equal(s_layer.mlp.down_proj.weight, t_layer.mlp.down_proj.weight)
            assert torch.equal(s_layer.self_attn.q_proj.weight, t_layer.self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="layer_loss"):
        prune_model(model, _manual_scores(model), PruneConfig(num_hidden_layers=2, layer_metric="loss"))


def test_layer_types_sliced_for_sliding_window_qwen2():
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, use_sliding_window=True,
                      sliding_window=64, max_window_layers=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student, rec = prune_model(model, _manual_scores(model, layers=[0.1, 0.9, 0.2, 0.8]),
                               PruneConfig(num_hidden_layers=2))
    assert rec["kept_layers"] == [1, 3]
    assert student.config.layer_types == ["full_attention", "sliding_attention"]


@pytest.fixture(scope="module")
def scored(tiny_gqa_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    (root / "calib.txt").write_text(TEXT)
    score_model(tiny_gqa_model_dir, root / "calib.txt", ScoreConfig(num_samples=2, seq_len=16, batch_size=2),
                root / "scores")
    return root / "scores"


def test_prune_to_dir_round_trip(tiny_gqa_model_dir, scored, tmp_path):
    cfg = PruneConfig(num_hidden_layers=3, hidden_size=192, intermediate_size=256, num_attention_heads=2)
    out = tmp_path / "student"
    rec = prune_to_dir(tiny_gqa_model_dir, scored, cfg, out)
    assert (out / "manifest.json").is_file() and (out / "model.safetensors").is_file()
    on_disk = json.loads((out / "pruning.json").read_text())
    assert on_disk["kept_layers"] == rec["kept_layers"] and len(rec["kept_layers"]) == 3
    assert on_disk["params_after"] < on_disk["params_before"]
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
            config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (3, 192, 256, 2, 2, 64)
    # identical to pruning in memory, and loadable unchanged by AutoModelForCausalLM
    in_memory, _ = prune_model(load_model(tiny_gqa_model_dir), load_scores(scored), cfg)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(in_memory, ids))
    assert count_params(loaded) == rec["params_after"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and len(tok) == 49152


def test_tied_embeddings_stay_tied(tiny_model_dir):
    model = load_model(tiny_model_dir)
    student, _ = prune_model(model, _scores(model), PruneConfig(hidden_size=96, num_hidden_layers=3))
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert student.model.embed_tokens.weight.shape == (49152, 96)


def test_candidate_shapes_fit_budget_and_rank_by_loss(tiny_gqa_model_dir):
    model = load_model(tiny_gqa_model_dir)
    total = count_params(model)
    assert param_count(model.config) == total
    ids = _ids()
    # the 49k-token embeddings dominate this tiny model: dropping 3 of 4 layers only saves 6.4%
    cands = candidate_shapes(model.config, 0.95, scores=_scores(model, ids), model=model, calibration=ids,
                             max_per_kind=1, slack=0.05)
    assert sorted(c["kind"] for c in cands) == ["depth", "mixed", "width"]
    assert all(0.9 * total <= c["params"] <= 0.95 * total for c in cands)
    assert [c["proxy_loss"] for c in cands] == sorted(c["proxy_loss"] for c in cands)
    depth = next(c for c in cands if c["kind"] == "depth")["shape"]
    assert depth["hidden_size"] == 256 and depth["num_hidden_layers"] < 4
    with pytest.raises(ValueError, match="prune.params"):
        candidate_shapes(model.config, 1.5)


# ------------------------------------------------------------------------------- parameter budget (prune.params)

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def test_budget_config_is_exclusive_with_shape_fields():
    from pydantic import ValidationError

    from compactlm.config import RecipeError, load_recipe

    assert PruneConfig(params=0.5).params == 0.5
    with pytest.raises(ValidationError, match="either params .* or an explicit shape.*unset num_hidden_layers"):
        PruneConfig(params=0.5, num_hidden_layers=3)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValidationError, match="params"):
            PruneConfig(params=bad)
    with pytest.raises(ValidationError, match="proxy"):
        PruneConfig(params=0.5, proxy="ppl")
    recipe = Path(__file__).resolve().parents[1] / "configs/tiny-test.yaml"  # it sets an explicit shape
    with pytest.raises(RecipeError, match="  prune: give either params"):
        load_recipe(recipe, ["prune.params=0.5"])
    r = load_recipe(recipe, ["prune.params=0.5", "prune.num_hidden_layers=null", "prune.intermediate_size=null",
                             "prune.proxy=kl", "prune.candidates=2"])
    assert (r.prune.params, r.prune.proxy, r.prune.candidates) == (0.5, "kl", 2)


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
    with pytest.raises(ValueError, match=r"prune.params=0.05: no student shape fits.*set prune.params to at "
                                         r"least 0.055"):
        candidate_shapes(config, 0.05)
    with pytest.raises(ValueError, match="no student shape fits"):  # what preflight calls
        target_shape(config, PruneConfig(params=0.05))
    assert target_shape(config, PruneConfig(params=0.5))["num_hidden_layers"] == 11
    assert candidate_shapes(config, 0.055)


def _kl_manual(teacher, student, ids):
    from compactlm.distillation.losses import _forward_kl_tokens

    t, s = _logits(teacher, ids)[:, :-1], _logits(student, ids)[:, :-1]
    V = t.shape[-1]
    return float(_forward_kl_tokens(torch.log_softmax(s.reshape(-1, V), -1),
                                    torch.log_softmax(t.reshape(-1, V), -1)).mean())


@pytest.mark.parametrize("proxy", ["loss", "kl"])
def test_rank_candidates(tiny_gqa_model_dir, scored, proxy, monkeypatch):
    from compactlm.importance.compute import calibration_loss
    from compactlm.pruning import budget, rank_candidates

    ids = _ids(n=3, t=12)
    cfg = PruneConfig(params=0.95, proxy=proxy, candidates=3, search=5)
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
        assert [c["shape"] for c in again] == [c["shape"] for c in ranked]
        assert [c["proxy_value"] for c in again] == pytest.approx([c["proxy_value"] for c in ranked], rel=1e-3)
    with pytest.raises(ValueError, match="prune.params is not set"):
        rank_candidates(tiny_gqa_model_dir, scored, PruneConfig(), ids)
    with pytest.raises(ValueError, match="is a budget, not a shape"):
        prune_model(teacher, scores, cfg)


def test_prune_to_dir_with_budget_picks_the_best_candidate(tiny_gqa_model_dir, scored, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    cfg = PruneConfig(params=0.95, search=4, proxy_samples=2, proxy_seq_len=16)
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
    assert torch.equal(_logits(loaded, _ids()), _logits(in_memory, _ids()))


def test_budget_keeps_the_teacher_dtype(tiny_gqa_model_dir, scored, tmp_path):
    """Candidates are ranked in fp32 (bf16 is slow on CPU); the student is saved in the teacher's dtype,
    bit-identical to pruning the bf16 teacher directly."""
    from compactlm.models import copy_model_side_files

    bf16_dir = tmp_path / "teacher-bf16"
    load_model(tiny_gqa_model_dir, dtype="bfloat16").save_pretrained(bf16_dir, safe_serialization=True)
    copy_model_side_files(tiny_gqa_model_dir, bf16_dir)
    rec = prune_to_dir(bf16_dir, scored, PruneConfig(params=0.95, search=3), tmp_path / "out",
                       calibration=_ids(n=2, t=12))
    assert rec["dtype"] == "bfloat16" and json.loads((tmp_path / "out/config.json").read_text())["dtype"] == "bfloat16"
    saved = load_model(tmp_path / "out", dtype="bfloat16")
    direct, _ = prune_model(load_model(bf16_dir, dtype="bfloat16"), load_scores(scored),
                            PruneConfig(**rec["candidate"]["shape"]))
    sd = direct.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in saved.state_dict().items())


def test_preflight_checks_the_budget(tiny_gqa_model_dir):
    from compactlm.config import Recipe, RecipeError, preflight

    preflight(Recipe(teacher=str(tiny_gqa_model_dir), prune=PruneConfig(params=0.95)), tiny_gqa_model_dir)
    with pytest.raises(RecipeError, match="prune: prune.params=0.05: no student shape fits"):
        preflight(Recipe(teacher=str(tiny_gqa_model_dir), prune=PruneConfig(params=0.05)), tiny_gqa_model_dir)


def test_prune_to_dir_shape_override_and_errors(tiny_gqa_model_dir, scored, tmp_path):
    shape = {"num_hidden_layers": 3, "intermediate_size": 256}
    # an explicit shape wins over the budget (the flow's fan-out over the top-k candidates)
    rec = prune_to_dir(tiny_gqa_model_dir, scored, PruneConfig(params=0.5, rescale_norms=False), tmp_path / "a",
                       shape=shape)
    assert rec["selection"] == "shape" and rec["ranking"] is None and rec["rescale_norms"] is False
    assert rec["candidate"]["kind"] == "mixed" and rec["candidate"]["params"] == rec["params_after"]
    assert rec["student"]["num_hidden_layers"] == 3 and rec["student"]["intermediate_size"] == 256
    assert rec["student"]["hidden_size"] == 256  # missing keys keep the teacher's value
    plain = prune_to_dir(tiny_gqa_model_dir, scored, PruneConfig(num_hidden_layers=2), tmp_path / "b")
    assert plain["selection"] == "config" and plain["candidate"]["kind"] == "depth" and plain["ranking"] is None
    bad = [
        (dict(cfg=PruneConfig(params=0.95)), "pass calibration="),
        (dict(cfg=PruneConfig(params=0.05), calibration=_ids()), r"prune.params=0.05: no student shape fits"),
        (dict(cfg=PruneConfig(), shape={"layers": 2}), r"shape has unknown keys \['layers'\]"),
        (dict(cfg=PruneConfig(), shape={"num_hidden_layers": 9}), "larger than the teacher's 4"),
        (dict(cfg=PruneConfig(), shape={"num_hidden_layers": -1}), "num_hidden_layers"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            prune_to_dir(tiny_gqa_model_dir, scored, kwargs.pop("cfg"), tmp_path / "never", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("target,field", [
    (dict(num_hidden_layers=5), "num_hidden_layers"), (dict(hidden_size=512), "hidden_size"),
    (dict(intermediate_size=1024), "intermediate_size"), (dict(num_attention_heads=8), "num_attention_heads"),
    (dict(num_attention_heads=3), "multiple of the teacher's num_key_value_heads"),
    (dict(hidden_size=250), r"prune.hidden_size as a multiple of num_attention_heads=4 \(e.g. 248 or 252\)"),
])
def test_bad_targets_write_nothing(tiny_gqa_model_dir, scored, tmp_path, target, field):
    with pytest.raises(ValueError, match=field):
        prune_to_dir(tiny_gqa_model_dir, scored, PruneConfig(**target), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_nonpositive_and_unsupported(tiny_gqa_model_dir):
    for bad in (0, -2):
        with pytest.raises(ValueError, match="hidden_size"):
            PruneConfig(hidden_size=bad)
        with pytest.raises(ValueError, match="prune.intermediate_size"):  # bypassing pydantic still fails
            prune_model(load_model(tiny_gqa_model_dir), ImportanceScores(*[torch.zeros(1)] * 4),
                        PruneConfig.model_construct(intermediate_size=bad, layer_metric="block_influence"))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="supported architectures: llama, mistral, qwen2, qwen3"):
        prune_model(gpt2, ImportanceScores(*[torch.zeros(1)] * 4), PruneConfig())


VLLM_SCRIPT = textwrap.dedent("""
    import sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        # the CPU backend reserves gpu_memory_utilization x RAM for the KV cache: keep it small on a shared box
        llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256,
                  gpu_memory_utilization=0.1)
        out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=5, temperature=0.0))
        print("VLLM_OK", " ".join(map(str, out[0].outputs[0].token_ids)))
""")


@pytest.mark.integration
def test_pruned_model_loads_in_vllm(tiny_model_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    score_model(tiny_model_dir, calib, ScoreConfig(num_samples=2, seq_len=16, layer_loss=False), tmp_path / "s")
    out = tmp_path / "student"
    prune_to_dir(tiny_model_dir, tmp_path / "s", PruneConfig(num_hidden_layers=3, hidden_size=96,
                                                             intermediate_size=192), out)
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_OK")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-8000:]
    vllm_ids = [int(t) for t in lines[0].split()[1:]]
    # vLLM's greedy tokens match HF's on the same pruned checkpoint
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        hf = model.generate(prompt, max_new_tokens=5, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert len(vllm_ids) >= 1 and vllm_ids[0] == hf[0], (vllm_ids, hf)
