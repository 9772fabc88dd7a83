"""Repair after slicing: the output projections of every kept layer refitted by least squares (issue #17).

Slicing keeps the most important heads, neurons and channels and changes no kept weight, so what the removed units
contributed is simply lost. Each layer's two output projections (attention ``o_proj``, whose inputs are the
concatenated heads, and MLP ``down_proj``, whose inputs are the neurons) are linear, and the removed units are
correlated with the kept ones, so part of what they contributed can be rebuilt from the kept units in closed form.
With ``h`` the teacher's projection input on calibration tokens, ``G = sum h h^T`` its Gram matrix, ``W`` the
teacher's weight at the kept output channels and ``S`` the kept inputs:

    W' = argmin sum ||W h - W' h_S||^2 + lam ||W' - W_S||^2  =  (W G[:, S] + lam W_S) (G[S, S] + lam I)^-1

with ``lam = damping * mean(diag G[S, S])``. The ridge pulls toward the sliced weights ``W_S`` (not toward zero),
so a projection that lost no input comes back unchanged: depth pruning and "prune nothing" stay exact, and only
projections with removed heads or neurons are measured at all. The statistics are the teacher's own (one forward
pass over the calibration tokens, forward hooks on ``self_attn.o_proj`` / ``mlp.down_proj``, which every supported
family has): each projection learns to stand in for the teacher's on the teacher's activations, independent of
what the rest of the student does (fitting on the student's own activations against the teacher's outputs was
tried: the fit chases upstream errors and held-out perplexity got worse, docs/benchmarks.md).

Memory: one ``|inputs| x |inputs|`` float32 matrix per refitted projection (for a 70B Llama MLP 28672^2 x 4 bytes
= 3.3 GB). Layers are measured in as few passes over the calibration tokens as keep the statistics within
``max_memory_gb``; each pass runs the teacher only up to its last layer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from compactlm.arch import decoder_layers, head_dim_of

if TYPE_CHECKING:
    import torch

#: The projections refitted in every kept layer, by their path in the decoder layer.
PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")


class _Stop(Exception):
    """Raised by a hook once the layers a pass needs have run."""


def _jobs(config: Any, plan: dict[str, Any]) -> list[tuple[int, str, Any]]:
    """What to refit, in teacher-layer order: (teacher layer, projection, kept inputs) for every output projection
    that lost inputs (heads for ``o_proj``, neurons for ``down_proj``)."""
    import torch

    from compactlm.pruning.slicing import _layer_index

    t, hd = plan["teacher"], head_dim_of(config)
    channels = torch.tensor(plan["kept_channels"], dtype=torch.long)
    jobs = []
    for s, layer in enumerate(plan["kept_layers"]):
        index = _layer_index(plan, s, channels)  # the same kept columns slicing took
        if len(index["q"]) < t["num_attention_heads"] * hd:
            jobs.append((layer, "self_attn.o_proj", index["q"]))
        if len(index["mlp"]) < t["intermediate_size"]:
            jobs.append((layer, "mlp.down_proj", index["mlp"]))
    return jobs


def _passes(jobs: list, config: Any, max_memory_gb: float) -> list[list]:
    """`jobs` cut into consecutive groups whose float32 Gram matrices (one per projection) fit the budget."""
    width = {"self_attn.o_proj": config.num_attention_heads * head_dim_of(config),
             "mlp.down_proj": config.intermediate_size}
    groups: list[list] = [[]]
    used = 0.0
    for job in jobs:
        need = 4 * width[job[1]] ** 2 / 2 ** 30
        if groups[-1] and used + need > max_memory_gb:
            groups.append([])
            used = 0.0
        groups[-1].append(job)
        used += need
    return [g for g in groups if g]


def _grams(teacher, keys: set[tuple[int, str]], ids: torch.Tensor, batch_size: int) -> dict:
    """{(layer, module): sum over calibration tokens of h h^T, h the module's input}, in one teacher pass."""
    from compactlm.calibration import batches

    layers, grams, handles = decoder_layers(teacher), {}, []
    for layer, name in keys:
        def hook(_m, inp, _out, key=(layer, name)):
            h = inp[0].reshape(-1, inp[0].shape[-1]).float()
            grams[key] = h.T @ h if key not in grams else grams[key].addmm_(h.T, h)
        handles.append(layers[layer].get_submodule(name).register_forward_hook(hook))

    def stop(*_):
        raise _Stop

    handles.append(layers[max(k[0] for k in keys)].register_forward_hook(stop))
    try:
        for batch in batches(ids, batch_size):
            try:
                teacher(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return grams


def _fit(w: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float) -> tuple[torch.Tensor, float, float]:
    """(W', relative error of the sliced weight, relative error of W') for teacher weight rows `w` [D', I]."""
    import torch

    w, gram = w.double(), gram.double()
    g_sk, g_ss, w_s = gram[:, kept], gram[kept][:, kept], w[:, kept]
    lam = damping * float(g_ss.diagonal().mean().clamp(min=1e-12))
    cross = w @ g_sk  # sum of y h_S^T with y = W h
    eye = torch.eye(len(kept), dtype=torch.float64, device=gram.device)  # on the teacher's device (CUDA too)
    fitted = torch.linalg.solve(g_ss + lam * eye, (cross + lam * w_s).T).T
    total = float(((w @ gram) * w).sum())

    def error(v: torch.Tensor) -> float:
        return max(total - 2 * float((v * cross).sum()) + float(((v @ g_ss) * v).sum()), 0.0) / max(total, 1e-30)

    return fitted, error(w_s), error(fitted)


def reconstruct(teacher, student, plan: dict[str, Any], ids: torch.Tensor, *, damping: float = 0.01,
                batch_size: int = 8, max_memory_gb: float = 2.0) -> dict[str, Any]:
    """Refit `student`'s weights in place (module docstring) from the teacher's activations on calibration `ids`
    [N, T]. `plan` is :func:`compactlm.pruning.slicing.plan_pruning`'s for the `student` that
    :func:`~compactlm.pruning.slicing.prune_model` built from `teacher`. Returns the report: per refitted
    projection the relative error of its output against the teacher's on the calibration tokens, sliced (before)
    and refitted (after), their means and the number of passes over the calibration tokens."""
    import torch

    config = teacher.config
    groups = _passes(_jobs(config, plan), config, max_memory_gb)
    student_of = {layer: s for s, layer in enumerate(plan["kept_layers"])}
    t_layers, s_layers = decoder_layers(teacher), decoder_layers(student)
    device = next(teacher.parameters()).device
    channels = torch.tensor(plan["kept_channels"], dtype=torch.long, device=device)
    rows = []
    with torch.no_grad():
        for group in groups:
            grams = _grams(teacher, {job[:2] for job in group}, ids.to(device), batch_size)
            for layer, name, kept in group:
                w = t_layers[layer].get_submodule(name).weight.index_select(0, channels)
                fitted, before, after = _fit(w, grams.pop((layer, name)), kept.to(device), damping)
                target = s_layers[student_of[layer]].get_submodule(name).weight
                target.copy_(fitted.to(target.dtype))
                rows.append({"layer": student_of[layer], "projection": name, "error_before": round(before, 6),
                             "error_after": round(after, 6)})
    mean = {k: round(math.fsum(r[k] for r in rows) / len(rows), 6) if rows else 0.0
            for k in ("error_before", "error_after")}
    return {"method": "least_squares", "damping": damping, "tokens": int(ids.numel()), "passes": len(groups),
            **{f"mean_{k}": v for k, v in mean.items()}, "projections": rows}


__all__ = ["PROJECTIONS", "reconstruct"]
