"""Slicing the weights: pruning nothing or zeroed units is exact for every family; heads stay in their KV groups; the
best layers are kept in order."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compactlm.config import PruneConfig
from compactlm.importance import ImportanceScores
from compactlm.models import count_params, load_model
from compactlm.pruning import param_count, prune_model
from compactlm.pruning.shapes import target_shape
from tests.compactlm.pruning.units import set_effective_eps, set_norm_eps, zero_units
from tests.helpers import logits_of, quick_scores, random_ids

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"]


SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             num_hidden_layers=3, tie_word_embeddings=False)
#: Gemma2 ships with tied embeddings (vLLM's Gemma2 has no separate lm_head): its tied path is tested here, and
#: Gemma3's untied one, since the embedding normalizer's compensation differs between the two.
ARCH_SHAPE = {"gemma2": dict(tie_word_embeddings=True)}


def _randomize_biases(model, seed=0):
    """HF initializes biases to zero; make them random so bias slicing is really exercised (Qwen2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_nothing_and_removing_zeroed_units_is_exact(tiny_factory, arch):
    """Pruning nothing is the identity. Then zero some heads' o_proj columns, neurons' up rows, channels
    everywhere they enter the residual stream, and one layer's o_proj/down_proj (family-aware: units.zero_units):
    pruning exactly those leaves the logits unchanged."""
    model = load_model(tiny_factory(arch=arch, **{**SHAPE, **ARCH_SHAPE.get(arch, {})}))
    _randomize_biases(model)
    ids = random_ids()
    # pruning nothing is the identity
    student, rec = prune_model(model, quick_scores(model, ids), PruneConfig())
    assert torch.equal(logits_of(model, ids), logits_of(student, ids))
    assert rec["params_before"] == rec["params_after"] == count_params(model)
    assert rec["kept_layers"] == [0, 1, 2] and rec["kept_heads"] == [[0, 1, 2, 3]] * 3

    hd, D = model.config.head_dim, model.config.hidden_size
    dead_neurons = [3, 40, 41, 100]
    dead_channels = [0, 7, 64, 127]
    zero_units(model, [1, 2], dead_neurons, dead_channels, dead_layer=1)  # head 1 (KV group 0), 2 (group 1)
    eps_ref, eps = logits_of(model, ids), model.config.rms_norm_eps
    # RMSNorm's eps is the one inexact part of channel removal (relative to these random models' tiny
    # activations it moves logits by ~2e-5); set it to 0 so the comparison isolates the pruning itself.
    model.config.rms_norm_eps = 0.0
    set_norm_eps(model.modules(), 0.0)
    scores = quick_scores(model, ids)
    assert (scores.neurons[:, dead_neurons] == 0).all() and (scores.channels[dead_channels] == 0).all()
    assert scores.layer_block_influence.argmin() == 1
    # Head scores measure the o_proj *input*, which zeroed o_proj columns do not change: mark them lowest.
    scores.heads[:, [1, 2]] = -1.0
    ref = logits_of(model, ids)

    targets = [dict(num_attention_heads=2), dict(intermediate_size=124), dict(hidden_size=124),
               dict(num_hidden_layers=2),
               dict(num_attention_heads=2, intermediate_size=124, hidden_size=124, num_hidden_layers=2)]
    for target in targets:
        student, rec = prune_model(model, scores, PruneConfig(**target))
        torch.testing.assert_close(logits_of(student, ids), ref, rtol=1e-5, atol=2e-5, msg=str(target))
        assert rec["params_after"] < rec["params_before"] == count_params(model)
        assert param_count(model.config, rec["student"]) == rec["params_after"] == count_params(student)
    assert rec["kept_layers"] == [0, 2] and rec["kept_heads"] == [[0, 3], [0, 3]]
    assert rec["kept_neurons"] == [124, 124] and rec["kept_channels"] == [c for c in range(D) if c not in dead_channels]
    assert rec["student"] == {"num_hidden_layers": 2, "hidden_size": 124, "intermediate_size": 124,
                              "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": hd}
    assert rec["params_after"] == count_params(student)
    # with the teacher's eps restored the student is still within 1e-4 (families whose eps shift is larger in
    # these random models: Phi3's eps is 10x Llama's, Gemma's and OLMo2's post-sublayer and OLMo2's q/k norms see
    # activations of ~1e-3, comparable to sqrt(eps))
    set_norm_eps(list(model.modules()) + list(student.modules()), eps)
    if arch in ("llama", "mistral", "qwen2", "qwen3"):
        torch.testing.assert_close(logits_of(student, ids), eps_ref, rtol=0, atol=1e-4)
    # ... and exactly the teacher whose rescaled norms use the eps they amount to (slicing.py's "up to eps")
    set_effective_eps(model, eps, hidden_ratio=124 / 128, head_ratio=2 / 4)
    torch.testing.assert_close(logits_of(student, ids), logits_of(model, ids), rtol=1e-5, atol=2e-5)
    # RMSNorm rescaling is what makes channel removal exact: without it the logits change.
    plain, _ = prune_model(model, scores, PruneConfig(hidden_size=124, rescale_norms=False))
    assert not torch.allclose(logits_of(plain, ids), ref, rtol=1e-3, atol=1e-3)


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
    # no architecture vLLM reads head_dim from has Qwen2's sliding layers: such width targets are refused up front
    with pytest.raises(ValueError, match=r"sliding-window layers .* keep prune.hidden_size = num_attention_heads x "
                                         r"head_dim \(here 64\)"):
        target_shape(cfg, PruneConfig(hidden_size=48))
    assert target_shape(cfg, PruneConfig(hidden_size=32, num_attention_heads=1))["hidden_size"] == 32  # 32 = 1 x 32


def test_width_pruned_qwen2_is_written_as_the_identical_llama(tiny_factory):
    """vLLM's Qwen2 derives head_dim = hidden / heads: a student whose hidden size is no longer heads x head_dim is
    written as Llama with attention_bias and a zero o_proj bias, which computes bit for bit what Qwen2 does."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = load_model(tiny_factory(arch="qwen2"))  # hidden 128 = 2 heads x 64
    _randomize_biases(model)
    ids, scores = random_ids(), quick_scores(model)
    for target, written in [(dict(num_hidden_layers=3, intermediate_size=192), "qwen2"),
                            (dict(hidden_size=64, num_attention_heads=1), "qwen2"),  # 64 = 1 x 64
                            (dict(hidden_size=96), "llama"), (dict(num_attention_heads=1), "llama")]:
        student, rec = prune_model(model, scores, PruneConfig(**target))
        assert (rec["architecture"], rec["written_as"], student.config.model_type) == ("qwen2", written, written)
        assert param_count(model.config, rec["student"]) == rec["params_after"] == count_params(student)
    assert student.config.attention_bias and not student.config.mlp_bias and student.config.head_dim == 64
    assert all(not layer.self_attn.o_proj.bias.any() for layer in student.model.layers)
    # the same weights as a Qwen2 (what vLLM cannot load): transformers gives bit-identical logits
    twin_cfg = Qwen2Config(**{k: v for k, v in student.config.to_dict().items()
                              if k not in ("model_type", "architectures", "attention_bias", "mlp_bias")})
    twin = Qwen2ForCausalLM(twin_cfg).eval()
    twin.load_state_dict({k: v for k, v in student.state_dict().items() if "o_proj.bias" not in k})
    assert torch.equal(logits_of(twin, ids), logits_of(student, ids))


def test_tied_embeddings_stay_tied(tiny_model_dir):
    model = load_model(tiny_model_dir)
    student, _ = prune_model(model, quick_scores(model), PruneConfig(hidden_size=96, num_hidden_layers=3))
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert student.model.embed_tokens.weight.shape == (49152, 96)


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
