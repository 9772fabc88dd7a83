"""Minitron activation importance from forward passes with hooks.

Every score is accumulated on the fly: a hook reduces its activation to one number per (sequence, unit)
with ``seq_agg`` and adds it to running sums; no activation outlives its forward call. After all batches,
``batch_agg`` turns the per-sequence numbers into one score per unit. Magnitudes are aggregated: a head
contributes the L2 norm of its slice of the ``o_proj`` input at each token, a neuron ``|down_proj input|``,
a channel the magnitude of what the attention and the MLP read from the residual stream (the input of their
first projection: the RMSNorm output of pre-norm families; :func:`compactlm.arch.layer_probes`). Minitron
(Muralidharan et al., 2024) found mean over the sequence then L2 over the batch best; that is the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from compactlm.arch import check_arch, head_dim_of, layer_probes
from compactlm.calibration import batches, calibration_loss, lm_loss_sums
from compactlm.choices import BATCH_AGG_CHOICES as BATCH_AGGS
from compactlm.choices import SEQ_AGG_CHOICES as SEQ_AGGS
from compactlm.formats.scores import ImportanceScores
from compactlm.progress import report

if TYPE_CHECKING:
    import torch

    from compactlm.arch import Probes


def _seq_agg(x: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, N] non-negative magnitudes -> [B, N]."""
    x = x.float()
    if how == "mean":
        return x.mean(dim=1)
    if how == "l2":
        return x.pow(2).sum(dim=1).sqrt()
    return x.var(dim=1, unbiased=False)


class _BatchAgg:
    """Running sums over sequences of [B, *shape] values; ``result()`` applies the batch aggregation."""

    def __init__(self, how: str):
        self.how = how
        self.n = 0
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None

    def add(self, v: torch.Tensor) -> None:
        v = v.detach().double()
        if self.s is None:
            self.s = v.sum(0)
            self.ss = v.pow(2).sum(0)
        else:
            self.s += v.sum(0)
            self.ss += v.pow(2).sum(0)
        self.n += v.shape[0]

    def result(self) -> torch.Tensor:
        assert self.s is not None and self.ss is not None, "no batch was seen"
        if self.how == "l2":
            out = self.ss.sqrt()
        elif self.how == "mean":
            out = self.s / self.n
        else:
            out = (self.ss / self.n - (self.s / self.n) ** 2).clamp_min(0)
        return out.float().cpu()


def _hidden_arg(args: tuple, kwargs: dict):
    return args[0] if args else kwargs["hidden_states"]


def compute_importance(model, input_ids: torch.Tensor, *, batch_size: int = 8, seq_agg: str = "mean",
                       batch_agg: str = "l2", layer_loss: bool = True,
                       log_fn: Callable[[dict[str, float], int], None] | None = None) -> ImportanceScores:
    """Score heads, neurons, embedding channels and layers of `model` on calibration `input_ids` [N, L].

    One forward pass over the data collects the width scores, the block influence of each layer and the
    base loss; with ``layer_loss`` one more pass per layer measures the loss increase when that layer is
    skipped (its output replaced by its input). Deterministic for fixed data; the model is not modified
    (all hooks are removed, even on error). Runs on the model's device.
    """
    check_arch(model.config)
    check_inputs(input_ids, batch_size, seq_agg, batch_agg)
    cfg = model.config
    layers = layer_probes(model)
    n_heads, hd = cfg.num_attention_heads, head_dim_of(cfg)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return _compute(model, input_ids, layers, n_heads, hd, device, batch_size, seq_agg, batch_agg,
                        layer_loss, log_fn)
    finally:
        model.train(was_training)


def check_inputs(input_ids: torch.Tensor, batch_size: int, seq_agg: str, batch_agg: str) -> None:
    """ValueError naming the argument when the calibration ids or the aggregation settings are bad."""
    if seq_agg not in SEQ_AGGS:
        raise ValueError(f"seq_agg must be one of {SEQ_AGGS}, got {seq_agg!r}")
    if batch_agg not in BATCH_AGGS:
        raise ValueError(f"batch_agg must be one of {BATCH_AGGS}, got {batch_agg!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if input_ids.ndim != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [num_samples >= 1, seq_len >= 2], got {tuple(input_ids.shape)}")


class _Collector:
    """Forward hooks that accumulate every width score and the block influence while the model runs (all layers
    at once as a context manager, or layer by layer with :meth:`attach`)."""

    def __init__(self, layers: list[Probes], n_heads: int, head_dim: int, seq_agg: str, batch_agg: str,
                 n_layers: int | None = None):
        import torch

        n = len(layers) if n_layers is None else n_layers
        self.layers, self.n_heads, self.hd, self.seq_agg = layers, n_heads, head_dim, seq_agg
        self.heads = [_BatchAgg(batch_agg) for _ in range(n)]
        self.neurons = [_BatchAgg(batch_agg) for _ in range(n)]
        self.channels = _BatchAgg(batch_agg)
        self.channel_buf: dict[str, torch.Tensor] = {}
        self.bi_sum = torch.zeros(n, dtype=torch.float64)
        self.bi_count = [0] * n
        self.handles: list = []

    def _head_hook(self, i: int):
        def hook(mod, args):
            x = args[0]
            b, t, _ = x.shape
            norms = x.view(b, t, self.n_heads, self.hd).float().norm(dim=-1)  # [B, T, H]
            self.heads[i].add(_seq_agg(norms, self.seq_agg))
        return hook

    def _neuron_hook(self, i: int):
        def hook(mod, args):
            self.neurons[i].add(_seq_agg(args[0].abs(), self.seq_agg))
        return hook

    def _channel_hook(self, mod, args):
        v = _seq_agg(args[0].abs(), self.seq_agg).double()
        self.channel_buf["sum"] = self.channel_buf["sum"] + v if "sum" in self.channel_buf else v

    def _block_hook(self, i: int):
        import torch

        def hook(mod, args, kwargs, output):
            x_in = _hidden_arg(args, kwargs).float()
            x_out = (output[0] if isinstance(output, tuple) else output).float()
            # cos(x_in, x_out) per token [B, T]; ~2.5x cheaper than F.cosine_similarity (same value)
            norms = x_in.norm(dim=-1) * x_out.norm(dim=-1)
            cos = torch.linalg.vecdot(x_in, x_out) / norms.clamp_min(1e-8)
            self.bi_sum[i] += (1.0 - cos).double().sum().cpu()
            self.bi_count[i] += cos.numel()
        return hook

    def attach(self, i: int, probes: Probes) -> list:
        """Hook layer `i`'s probes; returns the handles (remove them when the layer is done)."""
        handles = [probes.o_proj.register_forward_pre_hook(self._head_hook(i)),
                   probes.down_proj.register_forward_pre_hook(self._neuron_hook(i))]
        handles += [module.register_forward_pre_hook(self._channel_hook) for module in probes.channel_inputs]
        handles.append(probes.layer.register_forward_hook(self._block_hook(i), with_kwargs=True))
        return handles

    def __enter__(self) -> _Collector:
        for i, probes in enumerate(self.layers):
            self.handles += self.attach(i, probes)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def block_influence(self) -> torch.Tensor:
        import torch

        return (self.bi_sum / torch.tensor(self.bi_count, dtype=torch.float64).clamp_min(1)).float()

    def scores(self, *, base_loss: float, layer_loss_increase, num_key_value_heads: int,
               settings: dict) -> ImportanceScores:
        """The accumulated statistics as scores. ValueError when the calibration loss is not finite."""
        import torch

        if not math.isfinite(base_loss):
            raise ValueError(f"calibration loss is {base_loss}: the model produced non-finite logits")
        return ImportanceScores(
            heads=torch.stack([h.result() for h in self.heads]),
            neurons=torch.stack([n.result() for n in self.neurons]),
            channels=self.channels.result(),
            layer_block_influence=self.block_influence(),
            layer_loss_increase=layer_loss_increase,
            base_loss=float(base_loss),
            num_key_value_heads=int(num_key_value_heads),
            settings=settings,
        )


def _layer_loss_increase(model, layers: list, input_ids, batch_size: int, base_loss: float, log_fn):
    """Calibration loss with each layer skipped (its output replaced by its input) minus the base loss."""
    import torch

    out = torch.zeros(len(layers))
    for i, layer in enumerate(layers):
        def skip(mod, args, kwargs, output):
            x_in = _hidden_arg(args, kwargs)
            return (x_in, *output[1:]) if isinstance(output, tuple) else x_in

        handle = layer.register_forward_hook(skip, with_kwargs=True)
        try:
            out[i] = calibration_loss(model, input_ids, batch_size=batch_size) - base_loss
        finally:
            handle.remove()
        if log_fn is not None:
            log_fn({"score/layer_loss_increase": float(out[i])}, i)
    return out


def _compute(model, input_ids, layers, n_heads, hd, device, batch_size, seq_agg, batch_agg, layer_loss,
             log_fn) -> ImportanceScores:
    import torch

    total, count, n_batches = 0.0, 0, -(-len(input_ids) // batch_size)
    with _Collector(layers, n_heads, hd, seq_agg, batch_agg) as col, torch.no_grad():
        for i, batch in enumerate(batches(input_ids, batch_size)):
            col.channel_buf.clear()
            s, c = lm_loss_sums(model, batch.to(device))
            total, count = total + s, count + c
            col.channels.add(col.channel_buf["sum"])
            report("score", i + 1, n_batches)
    base_loss = total / count
    loss_increase = (_layer_loss_increase(model, [p.layer for p in layers], input_ids, batch_size, base_loss,
                                          log_fn) if layer_loss else None)
    return col.scores(base_loss=base_loss, layer_loss_increase=loss_increase,
                      num_key_value_heads=model.config.num_key_value_heads,
                      settings={"seq_agg": seq_agg, "batch_agg": batch_agg, "batch_size": batch_size,
                                "num_samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]),
                                "layer_loss": layer_loss})
