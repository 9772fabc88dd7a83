"""Importance scores of a teacher larger than memory (``score.streaming``): the calibration hidden states go
through the model one decoder layer at a time, each layer's weights read from the safetensors files, run over every
batch with the usual hooks, then freed. Peak memory is about one layer, the embeddings and head, and the hidden
states of the calibration set ([samples, seq_len, hidden] in fp32).

The model runs as its own code: a *shell* (the model built with no decoder layers of its own: embeddings, final
norm, head, rotary tables, with their weights from the files) gets one stub per layer. In a first pass the stubs
record what the model hands each layer (hidden states into layer 0, the attention mask, position embeddings and
the rest, per layer, so sliding-window layers get theirs) and stop before the head. Then each real layer is built on
the meta device, materialised from the files, and called with exactly those arguments. In a last pass the final
stub returns the last layer's output, so the model's own final norm, head (and logit soft-capping) give the base
loss. Every statistic is accumulated by the same hooks as the in-memory pass (:mod:`compactlm.importance.compute`),
so the scores are the same up to float summation order. ``layer_loss`` (a pass per skipped layer) is not offered.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from compactlm.calibration import batches, lm_loss_sums
from compactlm.formats.scores import ImportanceScores
from compactlm.progress import report
from compactlm.runtime import release_freed_memory

if TYPE_CHECKING:
    import torch


class _Stop(Exception):
    """Raised by the last stub of a capture pass: nothing after the layers is needed."""


class _Stub:
    """Stands in for decoder layer `i`: records its inputs (capture), or passes them on / returns the stored final
    hidden states (replay)."""

    def __init__(self, i: int, last: bool, state: dict[str, Any]):
        self.i, self.last, self.state = i, last, state

    def __call__(self, hidden_states, *args, **kwargs):
        if self.state["mode"] == "capture":
            if self.i == 0:
                self.state["inputs"].append(hidden_states.detach())
            self.state["kwargs"][-1][self.i] = (args, kwargs)
            if self.last:
                raise _Stop
            return hidden_states
        return self.state["final"] if self.last else hidden_states


def _shell(model_dir, config, tensors, device: str, state: dict[str, Any]):
    """The model without decoder layers of its own (weights from `tensors`, assigned without a copy; buffers such
    as the rotary tables built as usual), one stub per layer."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    empty = copy.deepcopy(config)
    empty.num_hidden_layers = 0  # layer_types stay: rotary tables are built per layer type (gemma3)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device: no random init
        shell = AutoModelForCausalLM.from_config(empty, dtype=torch.float32)
    weights = {k: tensors.get(k, torch.float32).to(device) for k in tensors.keys() if ".layers." not in k}
    missing, unexpected = shell.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights outside the decoder layers do not fit the model (missing {missing}, "
                         f"unexpected {unexpected})")
    if config.tie_word_embeddings:
        shell.tie_weights()
    shell.to(device).eval()
    shell.config.num_hidden_layers = config.num_hidden_layers
    n = config.num_hidden_layers
    del shell.model.layers
    shell.model.layers = [_Stub(i, i == n - 1, state) for i in range(n)]  # a plain list: no parameters
    return shell


def _layer(skeleton, tensors, i: int, device: str):
    """Decoder layer `i` of the meta-device `skeleton`, materialised from the files in fp32."""
    import torch

    layer = skeleton.model.layers[i]
    prefix = f"model.layers.{i}."
    layer.to_empty(device=device)
    layer.load_state_dict({k[len(prefix):]: tensors.get(k, torch.float32) for k in tensors.keys()
                           if k.startswith(prefix)}, strict=True)
    return layer.eval()


def stream_importance(model_dir: str | os.PathLike, input_ids: torch.Tensor, *, batch_size: int = 8,
                      seq_agg: str = "mean", batch_agg: str = "l2", device: str = "cpu",
                      log_fn: Callable[[dict[str, float], int], None] | None = None) -> ImportanceScores:
    """:func:`compactlm.importance.compute.compute_importance` (with ``layer_loss=False``) of the model in
    `model_dir`, one decoder layer in memory at a time (see the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from compactlm.arch import Probes, check_arch, family, head_dim_of
    from compactlm.importance.compute import _Collector, check_inputs
    from compactlm.weights import TeacherTensors

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    check_arch(config)
    check_inputs(input_ids, batch_size, seq_agg, batch_agg)
    tensors = TeacherTensors(model_dir, "score.streaming")
    state: dict[str, Any] = {"mode": "capture", "inputs": [], "kwargs": []}
    with torch.no_grad():
        shell = _shell(model_dir, config, tensors, device, state)
        chunks = list(batches(input_ids, batch_size))
        for batch in chunks:
            state["kwargs"].append({})
            try:
                shell(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
        hidden, fam, n = state["inputs"], family(config), config.num_hidden_layers
        col = _Collector([], config.num_attention_heads, head_dim_of(config), seq_agg, batch_agg, n_layers=n)
        channel_sums: list[dict[str, torch.Tensor]] = [{} for _ in chunks]
        with torch.device("meta"):  # every layer's modules, no storage until materialised
            skeleton = AutoModelForCausalLM.from_config(config)
        for i in range(n):
            layer = _layer(skeleton, tensors, i, device)
            probes = Probes(layer, layer.self_attn.o_proj, layer.mlp.down_proj,
                            (layer.get_submodule(fam.attn_in), layer.get_submodule(fam.mlp_in)))
            handles = col.attach(i, probes)
            try:
                for b in range(len(chunks)):
                    col.channel_buf = channel_sums[b]  # this batch's channel sums, over the layers so far
                    args, kwargs = state["kwargs"][b][i]
                    out = layer(hidden[b], *args, **kwargs)
                    hidden[b] = out[0] if isinstance(out, tuple) else out
            finally:
                for h in handles:
                    h.remove()
            layer.to_empty(device="meta")  # its storage freed ...
            release_freed_memory()  # ... and handed back, so the next layer does not stack on top of it
            report("score", i + 1, n)
        for sums in channel_sums:
            col.channels.add(sums["sum"])
        total, count = 0.0, 0
        state["mode"] = "replay"
        for b, batch in enumerate(chunks):
            for r in range(batch.shape[0]):  # row by row: the logits of one sequence at a time
                state["final"] = hidden[b][r:r + 1]
                s, c = lm_loss_sums(shell, batch[r:r + 1].to(device))
                total, count = total + s, count + c
    return col.scores(base_loss=total / count, layer_loss_increase=None, num_key_value_heads=config.num_key_value_heads,
                      settings={"seq_agg": seq_agg, "batch_agg": batch_agg, "batch_size": batch_size,
                                "num_samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]),
                                "layer_loss": False, "streaming": True})
