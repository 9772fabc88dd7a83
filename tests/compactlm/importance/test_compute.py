"""Importance scores: shapes, determinism, aggregation against a manual computation, GQA grouping, bad input."""

from __future__ import annotations

import pytest
import torch

from compactlm.calibration import calibration_loss
from compactlm.importance import compute_importance
from compactlm.models import load_model


def _ids(n=4, t=16, seed=0):
    return torch.randint(0, 5000, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gqa_model(tiny_gqa_model_dir):
    return load_model(tiny_gqa_model_dir)


def test_shapes_and_determinism(gqa_model):
    ids = _ids()
    a = compute_importance(gqa_model, ids, batch_size=2, seq_agg="mean", batch_agg="l2", layer_loss=True)
    b = compute_importance(gqa_model, ids, batch_size=3, seq_agg="mean", batch_agg="l2", layer_loss=True)
    cfg = gqa_model.config
    assert a.heads.shape == (4, cfg.num_attention_heads)
    assert a.neurons.shape == (4, cfg.intermediate_size)
    assert a.channels.shape == (cfg.hidden_size,)
    assert a.layer_block_influence.shape == (4,) and a.layer_loss_increase.shape == (4,)
    for name in ("heads", "neurons", "channels", "layer_block_influence", "layer_loss_increase"):
        # batching changes only float summation order
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6)
    assert (a.heads > 0).all() and (a.neurons >= 0).all() and (a.channels > 0).all()
    assert a.base_loss == pytest.approx(calibration_loss(gqa_model, ids), rel=1e-6)
    # hooks are removed: a plain forward is unchanged and no hook is left behind
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in gqa_model.modules())


def test_exactly_deterministic(gqa_model):
    ids = _ids(seed=1)
    a = compute_importance(gqa_model, ids, batch_size=2, layer_loss=False)
    b = compute_importance(gqa_model, ids, batch_size=2, layer_loss=False)
    for name in ("heads", "neurons", "channels", "layer_block_influence"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.layer_loss_increase is None


@pytest.mark.parametrize("seq_agg,batch_agg", [("mean", "l2"), ("l2", "mean"), ("var", "var"), ("mean", "mean")])
def test_aggregation_matches_manual(gqa_model, seq_agg, batch_agg):
    """Neuron and head scores equal a direct computation from captured activations."""
    ids = _ids(n=3, t=12, seed=2)
    captured = {}
    layer = gqa_model.model.layers[1]
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("down", a[0].clone())),
             layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("o", a[0].clone()))]
    with torch.no_grad():
        gqa_model(ids)
    for h in hooks:
        h.remove()
    scores = compute_importance(gqa_model, ids, batch_size=1, seq_agg=seq_agg, batch_agg=batch_agg,
                                layer_loss=False)

    def agg(x):  # x [N, T, U] magnitudes
        x = x.double()
        per_seq = {"mean": x.mean(1), "l2": x.pow(2).sum(1).sqrt(), "var": x.var(1, unbiased=False)}[seq_agg]
        return {"l2": per_seq.pow(2).sum(0).sqrt(), "mean": per_seq.mean(0),
                "var": per_seq.var(0, unbiased=False)}[batch_agg].float()

    torch.testing.assert_close(scores.neurons[1], agg(captured["down"].abs()), rtol=1e-4, atol=1e-6)
    o = captured["o"]
    head_norms = o.view(*o.shape[:2], gqa_model.config.num_attention_heads, -1).norm(dim=-1)
    torch.testing.assert_close(scores.heads[1], agg(head_norms), rtol=1e-4, atol=1e-6)


def test_zeroed_units_score_zero_and_gqa_grouping(tiny_gqa_model_dir):
    """Heads are scored per query head and follow the KV-group mapping head h -> KV head h // group."""
    model = load_model(tiny_gqa_model_dir)
    hd = model.config.head_dim
    layer = model.model.layers[2]
    with torch.no_grad():
        layer.self_attn.v_proj.weight[hd:2 * hd] = 0  # KV head 1 serves query heads 2 and 3
        layer.mlp.up_proj.weight[[5, 17]] = 0
        for lay in model.model.layers:
            lay.input_layernorm.weight[[3, 9]] = 0
            lay.post_attention_layernorm.weight[[3, 9]] = 0
        dead = model.model.layers[1]
        dead.self_attn.o_proj.weight.zero_()
        dead.mlp.down_proj.weight.zero_()
    s = compute_importance(model, _ids(n=2), batch_size=2, layer_loss=True)
    assert s.heads[2, 2] == 0 and s.heads[2, 3] == 0
    assert (s.heads[2, :2] > 0).all() and (s.heads[[0, 1, 3]] > 0).all()
    assert s.neurons[2, 5] == 0 and s.neurons[2, 17] == 0 and (s.neurons[0] > 0).all()
    assert s.channels[3] == 0 and s.channels[9] == 0 and (s.channels > 0).sum() == model.config.hidden_size - 2
    # a layer that adds nothing to the residual stream: no influence, no loss change when skipped
    assert s.layer_block_influence[1].abs() < 1e-6 and (s.layer_block_influence[[0, 2, 3]] > 1e-3).all()
    assert s.layer_loss_increase[1].abs() < 1e-5


def test_bad_input(gqa_model):
    with pytest.raises(ValueError, match="seq_agg"):
        compute_importance(gqa_model, _ids(), seq_agg="max")
    with pytest.raises(ValueError, match="batch_agg"):
        compute_importance(gqa_model, _ids(), batch_agg="sum")
    with pytest.raises(ValueError, match="input_ids"):
        compute_importance(gqa_model, torch.zeros(4, dtype=torch.long))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        compute_importance(gpt2, torch.zeros(1, 8, dtype=torch.long))
