"""The score stage: load a model, take calibration data, compute importance, publish scores and plots."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compactlm.artifacts import publish_dir, write_json_atomic
from compactlm.config import ScoreConfig
from compactlm.formats.scores import SUMMARY_FILE, ImportanceScores

TOP_N = 10


def _ranked(values, labels, n: int) -> tuple[list[dict], list[dict]]:
    import torch

    flat = values.flatten()
    order = torch.argsort(flat, descending=True, stable=True).tolist()
    top = [{**labels(i), "score": float(flat[i])} for i in order[:n]]
    bottom = [{**labels(i), "score": float(flat[i])} for i in order[::-1][:n]]
    return top, bottom


def summarize(scores: ImportanceScores) -> dict[str, Any]:
    """JSON-able summary: per-layer scores and the top / bottom heads, neurons, channels and layers."""
    n_heads = scores.heads.shape[1]
    n_neurons = scores.neurons.shape[1]
    per_layer = []
    for i in range(scores.num_layers):
        row = {"layer": i, "block_influence": float(scores.layer_block_influence[i]),
               "heads": [float(v) for v in scores.heads[i]],
               "neuron_mean": float(scores.neurons[i].mean())}
        if scores.layer_loss_increase is not None:
            row["loss_increase"] = float(scores.layer_loss_increase[i])
        per_layer.append(row)
    out: dict[str, Any] = {"base_loss": scores.base_loss, "per_layer": per_layer, "top": {}, "bottom": {}}
    for name, values, labels in [
        ("heads", scores.heads, lambda i: {"layer": i // n_heads, "head": i % n_heads}),
        ("neurons", scores.neurons, lambda i: {"layer": i // n_neurons, "neuron": i % n_neurons}),
        ("channels", scores.channels, lambda i: {"channel": i}),
        ("layers_block_influence", scores.layer_block_influence, lambda i: {"layer": i}),
    ] + ([("layers_loss_increase", scores.layer_loss_increase, lambda i: {"layer": i})]
         if scores.layer_loss_increase is not None else []):
        out["top"][name], out["bottom"][name] = _ranked(values, labels, TOP_N)
    return out


def score_model(model_dir: str | os.PathLike, calibration: str | os.PathLike, cfg: ScoreConfig,
                out_dir: str | os.PathLike, *, device: str = "cpu", seed: int = 0,
                log_fn: Callable[[dict[str, float], int], None] | None = None) -> dict[str, Any]:
    """Score `model_dir` on `calibration` (generated dataset dir or .txt/.jsonl file); publish to `out_dir`.

    Writes ``scores.safetensors`` (heads [L, H], neurons [L, I], channels [D], layer_block_influence [L],
    layer_loss_increase [L] when cfg.layer_loss), ``scores.json`` (settings, model shape, base loss,
    per-layer scores, top/bottom items) and ``plots/{heads,neurons,layers}.png``, then ``manifest.json``
    last (atomic publish). Returns the summary with "plots" as absolute paths in `out_dir`.
    """
    import torch

    from compactlm.arch import check_arch, head_dim_of
    from compactlm.calibration import calibration_ids
    from compactlm.importance.compute import compute_importance
    from compactlm.importance.plots import write_plots
    from compactlm.models import load_model, load_tokenizer, pick_device

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    device = pick_device(device)
    if not Path(calibration).exists():
        raise ValueError(f"calibration data not found: {str(calibration)!r} (give a generated dataset dir "
                         "or a .txt/.jsonl file)")
    from transformers import AutoConfig

    check_arch(AutoConfig.from_pretrained(model_dir, trust_remote_code=False))
    tokenizer = load_tokenizer(model_dir)
    ids = calibration_ids(calibration, tokenizer, num_samples=cfg.num_samples, seq_len=cfg.seq_len, seed=seed,
                          text_field=cfg.text_field)
    torch.manual_seed(seed)
    if cfg.streaming:  # one decoder layer in memory at a time
        from compactlm.importance.streaming import stream_importance

        scores = stream_importance(model_dir, ids, batch_size=cfg.batch_size, seq_agg=cfg.seq_agg,
                                   batch_agg=cfg.batch_agg, device=device, log_fn=log_fn)
        c = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    else:
        model = load_model(model_dir, dtype="float32", device=device)
        scores = compute_importance(model, ids, batch_size=cfg.batch_size, seq_agg=cfg.seq_agg,
                                    batch_agg=cfg.batch_agg, layer_loss=cfg.layer_loss, log_fn=log_fn)
        c = model.config
    summary = {
        "settings": {**cfg.model_dump(mode="json"), "seed": seed, "device": device,
                     "num_sequences": int(ids.shape[0]), "num_tokens": int(ids.numel()),
                     "calibration": str(calibration)},
        "model": {"model_dir": str(model_dir), "model_type": c.model_type,
                  "num_hidden_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
                  "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
                  "num_key_value_heads": c.num_key_value_heads, "head_dim": head_dim_of(c)},
        **summarize(scores),
    }
    manifest = {"stage": "score", "model_dir": str(model_dir), "calibration": str(calibration),
                "config": cfg.model_dump(mode="json"), "seed": seed, "base_loss": scores.base_loss}
    with publish_dir(out_dir, manifest) as tmp:
        scores.save_tensors(tmp)
        plots = write_plots(scores, tmp / "plots")
        summary["plots"] = [str(Path("plots") / p.name) for p in plots]
        write_json_atomic(tmp / SUMMARY_FILE, summary)
    return {**summary, "plots": [str(out_dir / p) for p in summary["plots"]]}
