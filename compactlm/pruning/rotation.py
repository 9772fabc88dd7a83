"""Cutting the hidden size along principal components instead of channels (``prune.repair.hidden: pca``).

Slicing channels keeps the residual-stream coordinates that matter most and drops the rest, but what a dropped
channel carried is lost, whatever the others carry. The residual stream of a pre-norm decoder can instead be
rotated first (SliceGPT, Ashkboos et al. 2024): with ``Q`` orthogonal, every module that reads the stream through
an RMSNorm and every module that writes to it can absorb ``Q`` so that the model computes exactly the same
function in the rotated basis, and in the basis of the stream's principal components the leading coordinates
hold most of its energy; keeping them loses less than keeping any ``D'`` of the original channels.

One rotation for the whole stream (SliceGPT fits one per layer and adds a matrix to every residual connection,
which no stock HF or vLLM model has), so the student stays a plain model of its family:

1. the RMSNorm weights ``g`` are folded into the projections that read their output (``W <- W diag(g)``, norm
   weight 1): an RMSNorm without weight commutes with an orthogonal map, ``rms(x Q) = rms(x)``;
2. ``Q`` = the eigenvectors of the residual stream's second moment, ``sum x x^T / |x|^2`` over the calibration
   tokens at every RMSNorm input (each token direction counts once, as the norm sees it), largest first;
3. embeddings ``E <- E Q``, readers (q/k/v, gate/up) ``W <- W Q``, writers (o_proj, down_proj) ``W <- Q^T W``
   (and their biases), the output head ``W <- W diag(g_final) Q``.

The rotated teacher is then sliced like any other, keeping the leading ``D'`` coordinates, and the least-squares
refit of the output projections (:mod:`.repair`) runs on it.

What it needs of the teacher: pre-norm RMSNorm layers (llama, mistral, qwen2, qwen3, phi3: Gemma's and OLMo2's
norms of the sublayer outputs act on the stream itself and would need a weight between the rotation and the
residual add) and an output head of its own. A tied head is the embedding matrix, which must become ``E Q`` for
the input and ``E diag(g_final) Q`` for the output: the final norm's weight has nowhere to go. Keeping it as the
diagonal of ``Q^T diag(g_final) Q`` was tried: on SmolLM2-135M (final norm weights from -2.1 to 3.3) the unsliced
rotated model's WikiText-2 perplexity went from 38.8 to 1.8 million. Untying costs ``vocab x hidden`` parameters,
so it is the user's call (an untied copy of the teacher), not a silent default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compactlm.arch import decoder_layers, family

if TYPE_CHECKING:
    import torch

#: model_types whose residual stream can be rotated (pre-RMSNorm layers, no norm on a sublayer's output).
ROTATABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def check_rotatable(config: Any) -> None:
    """Raise ValueError naming the field and the fix when `config`'s teacher cannot be rotated."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ROTATABLE:
        raise ValueError(f"prune.repair.hidden='pca' rotates the residual stream, which needs pre-RMSNorm layers; "
                         f"{model_type!r} normalizes its sublayer outputs. Set prune.repair.hidden='slice' (or "
                         f"leave it unset) for this teacher; pca supports: {', '.join(ROTATABLE)}")
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError("prune.repair.hidden='pca' folds the final norm's weight into the output head, but this "
                         "teacher ties its head to its input embeddings (tie_word_embeddings: true). Set "
                         "prune.repair.hidden='slice', or prune an untied copy of the teacher (its own lm_head; "
                         "the student then keeps vocab x hidden more parameters)")


def _readers(model) -> list[tuple[Any, list]]:
    """(RMSNorm, the linear modules reading its output) for every norm of the residual stream, in order."""
    fam = family(model.config)
    attn = [fam.attn_in] if fam.fused else ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    mlp = [fam.mlp_in] if fam.fused else ["mlp.gate_proj", "mlp.up_proj"]
    out = []
    for layer in decoder_layers(model):
        out.append((layer.input_layernorm, [layer.get_submodule(n) for n in attn]))
        out.append((layer.post_attention_layernorm, [layer.get_submodule(n) for n in mlp]))
    return out


def stream_moment(model, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``sum x x^T / |x|^2`` (float64 [D, D]) over the calibration tokens `ids` [N, T] at every RMSNorm input of
    the residual stream (each layer's two and the final one)."""
    import torch

    from compactlm.calibration import batches

    check_rotatable(model.config)
    norms = [norm for norm, _ in _readers(model)] + [model.model.norm]
    dim = model.config.hidden_size
    device = next(model.parameters()).device
    moment = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def hook(_module, args) -> None:
        x = args[0].reshape(-1, dim).double()
        x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        moment.addmm_(x.T, x)

    handles = [n.register_forward_pre_hook(hook) for n in norms]
    try:
        with torch.no_grad():
            for batch in batches(ids.to(device), batch_size):
                model.model(input_ids=batch, use_cache=False)  # the decoder only: no output head needed
    finally:
        for h in handles:
            h.remove()
    return moment


def principal_basis(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q [D, D] float64 with the principal directions as columns, largest first; their share of the energy)."""
    import torch

    values, vectors = torch.linalg.eigh(moment)
    order = torch.argsort(values, descending=True)
    values = values[order].clamp(min=0)
    return vectors[:, order], values / values.sum()


def rotate_residual(model, q: torch.Tensor) -> None:
    """Rewrite `model` (fp32, untied head, in place) to compute the same function with its residual stream in
    basis `q` [D, D] (module docstring)."""
    import torch

    check_rotatable(model.config)
    with torch.no_grad():
        q = q.to(device=next(model.parameters()).device, dtype=torch.float64)
        for norm, readers in _readers(model):
            for lin in readers:
                lin.weight.copy_((lin.weight.double() * norm.weight.double()) @ q)
            norm.weight.fill_(1.0)
        for layer in decoder_layers(model):
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
                writer.weight.copy_(q.T @ writer.weight.double())
                if writer.bias is not None:
                    writer.bias.copy_(q.T @ writer.bias.double())
        embed, head, final = model.get_input_embeddings(), model.get_output_embeddings(), model.model.norm
        if head.weight.data_ptr() == embed.weight.data_ptr():  # a config that says untied, weights that are not
            raise ValueError("rotate_residual: the output head shares the embedding matrix; see check_rotatable")
        head.weight.copy_((head.weight.double() * final.weight.double()) @ q)
        final.weight.fill_(1.0)
        embed.weight.copy_(embed.weight.double() @ q)


__all__ = ["ROTATABLE", "check_rotatable", "principal_basis", "rotate_residual", "stream_moment"]
