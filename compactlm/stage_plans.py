"""Each stage's memory, from its config and the models' sizes (:class:`compactlm.footprint.Dims`), the way the
stage's code holds its tensors. :mod:`compactlm.plan` puts them together for a recipe and a machine.

Devices: `gpu` True plans the stage on CUDA (bf16 where the stage computes in bf16 there), False on the host.
Loading a model in the dtype it is stored in costs nothing beyond its weights on the host (safetensors maps the file
and the parameters are views of its pages); in another dtype the file's pages are resident while the converted copy
is made, a transient that does not overlap a batch's working set (:func:`_loading`).
"""

from __future__ import annotations

import os

from compactlm import footprint as fp
from compactlm.config import (
    CorrectConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    PruneConfig,
    ScoreConfig,
)
from compactlm.distillation.sampler import GPU_SHARE as SAMPLER_GPU_SHARE
from compactlm.evaluation.runner import eval_dtype
from compactlm.footprint import BYTES, Dims, GiB, StageNeed
from compactlm.pruning.budget import PROXY_BATCH_SIZE
from compactlm.runtime import DEFAULT_CPU_KVCACHE_GIB

#: vLLM's share of a GPU (its gpu_memory_utilization default) and its CUDA graphs and activations beyond weights.
VLLM_GPU_SHARE, VLLM_OVERHEAD = 0.9, int(1.5 * GiB)
#: vLLM's libraries and its engine process on CPU beyond RUNTIME_CPU (measured with a tiny model and SmolLM2-135M:
#: peak RSS of the caller + the engine = 2 x weights + KV space + 2.0 GiB; benchmarks/plan.py).
VLLM_CPU_RUNTIME = int(1.4 * GiB)
#: Tokens of one benchmark request in the evaluate stage's plan (multiple-choice context and continuation).
EVAL_TOKENS = 512


def _file(d: Dims) -> int:
    return fp.weights(d, d.dtype)


def _loading(d: Dims, dtype: str, gpu: bool = False) -> int:
    """The file's pages while a model is converted from its stored dtype to `dtype` (0 when they match: the
    weights are the pages; 0 on a GPU, whose copy is counted as the weights)."""
    return 0 if gpu or dtype == d.dtype else _file(d)


def _auto(dtype: str, gpu: bool) -> str:
    """A stage's dtype: "auto" is bf16 on a GPU and fp32 on CPU (generation on CPU takes bf16 only where it is
    native: planned as fp32, the larger)."""
    return dtype if dtype != "auto" else "bfloat16" if gpu else "float32"


def _vllm_cpu_kv() -> int:
    """The KV cache vLLM gets on CPU: $VLLM_CPU_KVCACHE_SPACE GiB, else compactlm's default."""
    return int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or DEFAULT_CPU_KVCACHE_GIB) * GiB)


def _vllm(stage: str, field: str, d: Dims, dtype: str, tp: int, max_model_len: int, gpu: bool,
          gpu_mem_gib: float) -> StageNeed:
    """A vLLM engine: on GPUs its share of each (weights split over `tp` GPUs, the KV cache of one max_model_len
    sequence at least, CUDA graphs and activations, the tenth of the GPU it leaves); on CPU the weights and the KV
    space compactlm gives it."""
    if gpu:
        parts = {"weights": fp.weights(d, "bfloat16") // tp,
                 "kv cache (one max_model_len sequence)": fp.kv_cache(d, max_model_len, 2) // tp,
                 "vllm workspace": VLLM_OVERHEAD, "vllm reserve": int((1 - VLLM_GPU_SHARE) * gpu_mem_gib * GiB)}
        return StageNeed(stage, "gpu", f"vLLM, tensor parallel {tp}", parts=parts, ranks=tp,
                         fix=f"{field}.tensor_parallel_size: more GPUs per engine")
    return StageNeed(stage, "cpu", "vLLM (CPU)", fix=f"{field}.dtype: bfloat16, or a smaller VLLM_CPU_KVCACHE_SPACE",
                     parts={"weights, twice (vLLM's two processes)": 2 * fp.weights(d, dtype),
                            "kv cache": _vllm_cpu_kv(), "vllm runtime": VLLM_CPU_RUNTIME})


def generate(cfg: GenerateConfig, t: Dims, gpu: bool, gpu_mem_gib: float) -> StageNeed:
    dtype = _auto(cfg.dtype, gpu)
    nbytes = BYTES[dtype]
    if cfg.engine == "vllm":
        return _vllm("generate", "generate", t, dtype, cfg.tensor_parallel_size, cfg.max_model_len, gpu, gpu_mem_gib)
    rows = cfg.batch_size * cfg.n
    tokens = rows * cfg.max_model_len
    return StageNeed("generate", "gpu" if gpu else "cpu", f"transformers generate, batch {cfg.batch_size}",
                     parts={"weights": t.params * nbytes, "kv cache": fp.kv_cache(t, tokens, nbytes)},
                     transient={"loading": _loading(t, dtype, gpu),
                                "prefill": fp.forward_workspace(t, tokens, nbytes) + fp.logits(t, rows)},
                     fix="generate.batch_size: fewer prompts per batch, or engine: vllm")


def _lora_params(d: Dims, rank: int) -> int:
    """Adapters on every linear of every layer (the default targets): r x (inputs + outputs) each."""
    linears = [(d.hidden, d.q), (d.hidden, d.kv), (d.hidden, d.kv), (d.q, d.hidden), (d.hidden, d.intermediate),
               (d.hidden, d.intermediate), (d.intermediate, d.hidden)]
    return d.layers * rank * sum(a + b for a, b in linears)


def _training(d: Dims, lora_rank: int | None, gpu: bool) -> dict[str, int]:
    """The trained model's resident parts: fp32 weights, gradients + AdamW (adapters only with LoRA), and on CUDA
    autocast's bf16 copy of the weights."""
    trainable = _lora_params(d, lora_rank) if lora_rank else d.params
    parts = {"weights (fp32)": fp.weights(d, "float32"), "grads + AdamW": fp.train_state(trainable)}
    if gpu:
        parts["autocast bf16 weights"] = fp.weights(d, "bfloat16")
    return parts


def _logit_copies(d: Dims, tokens: int, teacher: bool, gpu: bool) -> int:
    """The loss's [tokens, vocab] tensors (fp32 on CPU, bf16 under CUDA autocast): the student's logits, its loss
    rows (the chunked losses index the masked rows: a copy) and the gradients of both; with a teacher, its logits
    and loss rows."""
    return fp.logits(d, tokens, 2 if gpu else 4) * (4 + (2 if teacher else 0))


def correct(cfg: CorrectConfig, t: Dims, gpu: bool) -> StageNeed:
    tokens = (cfg.micro_batch_size or cfg.batch_size) * cfg.seq_len
    step = fp.activations(t, tokens, checkpointing=cfg.gradient_checkpointing, nbytes=2 if gpu else 4)
    return StageNeed("correct", "gpu" if gpu else "cpu", "fine-tune the teacher" + (" (LoRA)" if cfg.lora else ""),
                     parts=_training(t, cfg.lora and cfg.lora.rank, gpu),
                     transient={"loading": _loading(t, "float32", gpu),
                                "step": step + _logit_copies(t, tokens, False, gpu)},
                     fix="correct.lora, correct.gradient_checkpointing: true, or a smaller correct.micro_batch_size")


def score(cfg: ScoreConfig, t: Dims, gpu: bool) -> StageNeed:
    tokens = cfg.batch_size * cfg.seq_len
    rows = 2 * fp.logits(t, cfg.seq_len)  # the loss is taken row by row: one row's logits in fp32 and its softmax
    where = "gpu" if gpu else "cpu"
    if cfg.streaming:
        return StageNeed("score", where, "streaming: one decoder layer at a time", parts={
            "embeddings + head (fp32)": t.embed_params * 4, "one layer (fp32)": t.layer_params * 4,
            "calibration hidden states": cfg.num_samples * cfg.seq_len * t.hidden * 4},
            transient={"batch": fp.forward_workspace(t, tokens) + rows})
    batch = fp.forward_workspace(t, tokens) + fp.logits(t, tokens) + rows
    return StageNeed("score", where, "in memory (fp32)", parts={"weights (fp32)": fp.weights(t, "float32")},
                     transient={"loading": _loading(t, "float32", gpu), "batch": batch},
                     fix="score.streaming: true (one decoder layer at a time)")


def _grams(cfg: PruneConfig, t: Dims) -> int:
    """A repair's Gram matrices of one pass (fp32, |inputs|^2 per refitted projection), at most
    ``repair.max_memory_gb`` unless one alone is larger."""
    if cfg.repair is None:
        return 0
    one = [4 * t.q ** 2, 4 * t.intermediate ** 2]
    return max(min(int(cfg.repair.max_memory_gb * GiB), t.layers * sum(one)), max(one))


def prune(cfg: PruneConfig, t: Dims, s: Dims, gpu: bool, cpus: int = 1) -> StageNeed:
    """Streaming: a tensor and its slice. In memory: the teacher, the student and its serialized copy (a repair:
    the teacher in fp32 and the Gram matrices of a pass). A budget first measures min(search, CPUs) candidates at
    once, then cuts the chosen shape. Each candidate task loads the teacher as stored (its file's pages, shared by
    the tasks) and makes only the candidate fp32; the KL proxy's and a repair's teacher forwards convert one
    module's weights to fp32 at a time (the largest: an embedding or MLP matrix), and the KL proxy holds a batch of
    the teacher's log-probs beside the student's logits."""
    if cfg.streaming:
        largest = fp.largest_tensor(t) * BYTES[t.dtype]
        return StageNeed("prune", "cpu", "streaming: tensor by tensor from the files",
                         parts={"a teacher tensor and its slice": 2 * largest})
    dtype = "float32" if cfg.repair is not None else t.dtype
    fix = "prune.streaming: true (tensor by tensor; an explicit shape, no repair)"
    if cfg.budget is None:
        return StageNeed("prune", "gpu" if gpu and cfg.repair is not None else "cpu", f"in memory ({dtype})",
                         parts={"teacher": fp.weights(t, dtype), "student": fp.weights(s, dtype)},
                         transient={"loading": _loading(t, dtype), "saving": fp.weights(s, t.dtype),
                                    "repair statistics": _grams(cfg, t)}, fix=fix)
    k = max(1, min(cfg.budget.search, cpus))
    tokens = min(8, cfg.budget.proxy_samples) * cfg.budget.proxy_seq_len
    runs_teacher = cfg.budget.proxy == "kl" or cfg.repair is not None
    converted = fp.largest_tensor(t) * 4 if runs_teacher and t.dtype != "float32" else 0
    batch = min(PROXY_BATCH_SIZE, cfg.budget.proxy_samples) * cfg.budget.proxy_seq_len
    teacher_logp = fp.logits(t, batch) if cfg.budget.proxy == "kl" else 0  # a batch's, beside the student's logits
    each = (fp.weights(s, "float32") + fp.forward_workspace(t, tokens) + fp.logits(t, tokens) + converted
            + teacher_logp + _grams(cfg, t))
    cut = fp.weights(t, dtype) + 2 * fp.weights(s, dtype) + _grams(cfg, t)
    return StageNeed("prune", "gpu" if gpu else "cpu", f"budget search, {k} candidates at once", transient={
        f"{k} candidates at once": k * each + _file(t), "final cut": cut},
        fix="a smaller prune.budget.search (candidates measured at once), or an explicit shape with prune.streaming")


def distill(cfg: DistillConfig, name: str, t: Dims, s: Dims, gpu: bool, gpus: int,
            gpu_mem_gib: float = 0.0) -> StageNeed:
    """One distillation stage per process: the student's state (sharded over the ranks with fsdp), the teacher
    when a step runs it, one micro-batch's activations and the loss's logits; with on-policy sampling on vLLM, the
    engine beside them (30 % of the GPU; on CPU the student's weights, its KV space and vLLM's libraries)."""
    world = cfg.nproc  # 1 with strategy single (the config refuses more)
    micro = cfg.micro_batch_size or cfg.batch_size // world
    tokens = min(micro, cfg.batch_size // world) * cfg.seq_len
    online = cfg.runs_teacher
    parts = _training(s, cfg.lora and cfg.lora.rank, gpu)
    t_bytes = 2 if gpu else 4
    if online:
        parts["teacher"] = fp.weights(t, "bfloat16" if gpu else "float32")
    if cfg.strategy == "fsdp":  # a shard of each, plus the units gathered for the forward and backward
        parts.pop("autocast bf16 weights", None)  # FSDP's mixed precision gathers bf16 weights instead
        parts = {f"{k} / {world}": v // world for k, v in parts.items()}
        parts["gathered units"] = fp.gathered(s, 2 if gpu else 4) + (fp.gathered(t, t_bytes) if online else 0)
    elif cfg.strategy == "ddp":
        parts["ddp gradient buckets"] = fp.weights(s, "float32")
    step = fp.activations(s, tokens, checkpointing=cfg.gradient_checkpointing, nbytes=2 if gpu else 4) + \
        _logit_copies(s, tokens, online and cfg.kd_weight > 0, gpu)
    if online and cfg.hidden_weight > 0:
        step += (t.layers + 1) * tokens * t.hidden * t_bytes
    if cfg.on_policy is not None and cfg.on_policy.engine == "vllm":
        parts["on-policy vLLM sampler"] = int(SAMPLER_GPU_SHARE * gpu_mem_gib * GiB) if gpu else \
            fp.weights(s, "float32") + _vllm_cpu_kv() + VLLM_CPU_RUNTIME
    loading = _loading(s, "float32", gpu) + (_loading(t, "float32", gpu) if online else 0)
    if cfg.strategy == "fsdp":  # loaded in the stored dtype; one unit at a time converted while it is sharded
        loading = 0 if gpu else fp.largest_unit(s, 4)
    what = {"single": "one process", "ddp": f"ddp x {world}", "fsdp": f"fsdp x {world}"}[cfg.strategy]
    what += ", online teacher" if online else ", offline targets" if cfg.kd_weight > 0 else ""
    return StageNeed(name, "gpu" if gpu else "cpu", what, parts=parts, transient={"loading": loading, "step": step},
                     ranks=world, fix=_distill_fix(cfg, name, gpu, gpus))


def distill_host(cfg: DistillConfig, name: str, t: Dims, s: Dims) -> StageNeed | None:
    """On GPUs with several processes, the host side while they load. Under fsdp each loads the models in their
    stored dtype (the files' pages, shared: counted once over the processes) and FSDP converts one unit at a time as
    it moves it to the GPU; under ddp each converts the whole student to fp32 on the host before moving it."""
    world, online = cfg.nproc, cfg.runs_teacher
    if world == 1:
        return None
    files = _file(s) + (_file(t) if online else 0)
    if cfg.strategy == "fsdp":
        parts = {"the unit being converted (fp32)": fp.largest_unit(s, 4)}
    else:
        parts = {"student fp32 copy": _loading(s, "float32") and fp.weights(s, "float32"),
                 "teacher bf16 copy": _loading(t, "bfloat16") and fp.weights(t, "bfloat16") if online else 0}
    return StageNeed(f"{name} (host)", "cpu", f"{world} processes load, then move to their GPUs", parts=parts,
                     ranks=world, transient={"files (page cache, shared)": files // world},
                     fix=f"fewer {name}.nproc, or {name}.strategy: fsdp (converts one unit at a time)")


def _distill_fix(cfg: DistillConfig, name: str, gpu: bool, gpus: int) -> str:
    online, fixes = cfg.runs_teacher, []
    if gpu and cfg.strategy != "fsdp" and gpus > 1:
        fixes.append(f"{name}.strategy: fsdp with {name}.nproc: {gpus} (shards the student's state"
                     + (" and the teacher" if online else "") + ")")
    if not cfg.gradient_checkpointing:
        fixes.append(f"{name}.gradient_checkpointing: true")
    if (cfg.micro_batch_size or cfg.batch_size) > 1:
        fixes.append(f"a smaller {name}.micro_batch_size")
    if online and cfg.kd_weight > 0 and cfg.hidden_weight == 0 and cfg.on_policy is None:
        fixes.append(f"{name}.mode: offline (no teacher in memory; needs generate.topk_logprobs)")
    return ", ".join(fixes) or "a machine with more memory"


def evaluate(cfg: EvalConfig, t: Dims, s: Dims, gpu: bool, gpu_mem_gib: float) -> StageNeed:
    """The models are evaluated one after another: the larger of teacher and student sets the peak. With the hf
    backend, a bound: one batch of requests up to EVAL_TOKENS (lm-eval pads a batch to its longest request and
    takes a log-softmax of its logits); what the shipped short tasks take is far below (docs/benchmarks.md)."""
    dtype = eval_dtype(cfg, "cuda" if gpu else "cpu")
    big = t if t.params >= s.params else s
    if cfg.backend == "vllm":
        return _vllm("evaluate", "eval", big, dtype, cfg.tensor_parallel_size, cfg.max_length or 4096, gpu,
                     gpu_mem_gib)
    nbytes = BYTES[dtype]
    tokens = cfg.batch_size * min(EVAL_TOKENS, cfg.max_length or EVAL_TOKENS)
    batch = fp.forward_workspace(big, tokens, nbytes) + 2 * fp.logits(big, tokens, nbytes)
    return StageNeed("evaluate", "gpu" if gpu else "cpu", f"hf, batch {cfg.batch_size}, requests up to "
                     f"{tokens // cfg.batch_size} tokens", parts={"weights": big.params * nbytes},
                     transient={"loading": _loading(big, dtype, gpu), "batch": batch},
                     fix="eval.backend: vllm with eval.tensor_parallel_size: more GPUs (a model larger than one "
                     "GPU), a smaller eval.batch_size, or eval.dtype: bfloat16" if gpu else
                     "a smaller eval.batch_size, or eval.max_length")


def export(cfg: ExportConfig, s: Dims) -> StageNeed:
    """GGUF: llama.cpp's converter and quantizer read tensor by tensor; a vLLM directory loads the student in fp32
    and writes its compressed copy."""
    parts = {"largest tensor (gguf)": 2 * fp.largest_tensor(s) * 4}
    if cfg.vllm:
        parts = {"student (fp32)": fp.weights(s, "float32"), "compressed copy": fp.weights(s, "bfloat16")}
    return StageNeed("export", "cpu", "llama.cpp / compressed-tensors", parts=parts,
                     transient={"loading": _loading(s, "float32") if cfg.vllm else 0}, fix="export fewer formats")


__all__ = ["correct", "distill", "distill_host", "evaluate", "export", "generate", "prune", "score"]
