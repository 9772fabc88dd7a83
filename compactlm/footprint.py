"""How much memory a stage's model work takes, from a model's ``config.json`` alone (no weights).

Each function returns the bytes of one named part (weights, optimizer state, activations, logits, KV cache) for
one process, counted the way compactlm's own code holds them; :mod:`compactlm.plan` adds them up per stage. The
counts follow the tensors PyTorch keeps, for a pre-norm decoder (Llama, Qwen2/3, Mistral, Gemma, Phi-3, StableLM):

* weights: parameters x bytes per element (tied embeddings once);
* training state: fp32 parameters, gradients and AdamW's two moments (16 bytes per trainable parameter);
* saved activations of one decoder layer per token (what its backward needs, fp32 on CPU): each RMSNorm keeps
  its input, its normalised input and the output the next linear reads (3 x hidden, twice); attention keeps q, k
  and v after RoPE (k and v repeated to every query head), its output and o_proj's contiguous input (5 x q
  width); the MLP keeps gate, up, SiLU(gate) and their product (4 x intermediate). Gradient checkpointing keeps a
  layer's input only and recomputes one layer at a time;
* logits: [tokens, vocab] in fp32, and the copies the chunked losses make of the loss rows (see ``distill``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compactlm.models import stored_dtype
from compactlm.pruning.shapes import param_split, shape_of

GiB = 2**30
MiB = 2**20
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Resident memory of a stage process before its models: Python, torch, transformers and the modules a model and a
#: tokenizer load pull in (measured 0.55-0.6 GiB on the CPU build, benchmarks/plan.py).
RUNTIME_CPU = int(0.6 * GiB)
#: The CUDA context and the caching allocator's slack of one GPU process.
RUNTIME_GPU = int(1.0 * GiB)


@dataclass(frozen=True)
class Dims:
    """The sizes that set a model's memory: from a config, optionally at a pruned shape."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int
    layer_params: int  # one decoder layer's parameters
    embed_params: int  # embeddings (+ an untied head): what sits outside the layers
    dtype: str  # the dtype config.json says the weights are stored in

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim


def dims(config: Any, shape: dict[str, int] | None = None) -> Dims:
    """`config`'s sizes, or those of its student at `shape` (the prune fields: layers, hidden, MLP, heads)."""
    s = {**shape_of(config), **(shape or {})}
    outside, per_layer = param_split(config, shape)
    return Dims(layers=s["num_hidden_layers"], hidden=s["hidden_size"], intermediate=s["intermediate_size"],
                heads=s["num_attention_heads"], kv_heads=s["num_key_value_heads"], head_dim=s["head_dim"],
                vocab=config.vocab_size, params=outside + s["num_hidden_layers"] * per_layer, layer_params=per_layer,
                embed_params=outside, dtype=stored_dtype(config))


def weights(d: Dims, dtype: str) -> int:
    return d.params * BYTES[dtype]


def train_state(trainable: int) -> int:
    """fp32 gradients and AdamW's exp_avg and exp_avg_sq (the fp32 weights are counted as weights)."""
    return trainable * 12


def saved_per_token_layer(d: Dims) -> int:
    """Elements one decoder layer keeps for its backward, per token (see the module docstring)."""
    return 6 * d.hidden + 5 * d.q + 4 * d.intermediate


def activations(d: Dims, tokens: int, *, checkpointing: bool, nbytes: int = 4) -> int:
    """What the forward keeps for the backward over `tokens` tokens (one micro-batch)."""
    per_layer = saved_per_token_layer(d) * tokens * nbytes
    if checkpointing:
        return d.layers * d.hidden * tokens * nbytes + per_layer
    return d.layers * per_layer + 3 * d.hidden * tokens * nbytes  # + the final norm's


def forward_workspace(d: Dims, tokens: int, nbytes: int = 4) -> int:
    """A no-grad forward's largest live set over `tokens`: the residual stream, the MLP's gate, up and
    product, and the attention's q, k, v and output."""
    return tokens * (3 * d.hidden + 3 * d.intermediate + 2 * d.q + 2 * d.kv) * nbytes


def logits(d: Dims, tokens: int, nbytes: int = 4) -> int:
    return tokens * d.vocab * nbytes


def kv_cache(d: Dims, tokens: int, nbytes: int) -> int:
    """Keys and values of every layer for `tokens` tokens (a generation engine's cache)."""
    return 2 * d.layers * d.kv * tokens * nbytes


def largest_tensor(d: Dims) -> int:
    """Elements of the model's largest single tensor: an embedding matrix or an MLP projection."""
    return max(d.vocab * d.hidden, d.intermediate * d.hidden)


def largest_unit(d: Dims, nbytes: int) -> int:
    """The larger of FSDP's units, one decoder layer or the root unit (embeddings, head, final norm)."""
    return max(d.embed_params, d.layer_params) * nbytes


def gathered(d: Dims, nbytes: int) -> int:
    """What FSDP holds unsharded at once: the root unit (embeddings, head, final norm; gathered for the whole
    forward), the decoder layer computing and the next one, prefetched."""
    return (d.embed_params + 2 * d.layer_params) * nbytes


@dataclass
class StageNeed:
    """One stage's memory per process: `parts` held throughout, plus the largest of `transient` (working sets that
    do not overlap in time: loading a file, a batch's activations and logits). `ranks` processes; on `device`
    'gpu' each has a GPU of its own, on 'cpu' they share the host."""

    stage: str
    device: str
    strategy: str
    parts: dict[str, int] = field(default_factory=dict)
    transient: dict[str, int] = field(default_factory=dict)
    ranks: int = 1
    fix: str = ""

    @property
    def model_bytes(self) -> int:
        """Parts + the largest transient, without the process runtime: what benchmarks/plan.py measures."""
        return sum(self.parts.values()) + max(self.transient.values(), default=0)

    @property
    def per_process(self) -> int:
        return self.model_bytes + (RUNTIME_GPU if self.device == "gpu" else RUNTIME_CPU)

    def need_gib(self) -> float:
        """GiB one GPU needs, or the host needs for all of its processes."""
        return self.per_process * (1 if self.device == "gpu" else self.ranks) / GiB

    def largest(self, k: int = 3) -> list[tuple[str, int]]:
        peak = max(self.transient.items(), key=lambda kv: kv[1], default=None)
        items = [kv for kv in [*self.parts.items(), *([peak] if peak else [])] if kv[1] > 0]
        return sorted(items, key=lambda kv: -kv[1])[:k]


__all__ = ["BYTES", "RUNTIME_CPU", "RUNTIME_GPU", "Dims", "GiB", "MiB", "StageNeed", "activations", "dims",
           "forward_workspace", "gathered", "kv_cache", "largest_tensor", "largest_unit", "logits",
           "saved_per_token_layer", "train_state", "weights"]
