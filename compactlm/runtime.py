"""Where the engines run: the environment vLLM needs on this machine and how a vLLM engine is started (shared by
generation, evaluation and on-policy distillation, so no stage imports another)."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

#: KV cache size (GiB) given to vLLM on CPU when VLLM_CPU_KVCACHE_SPACE is unset (vLLM's own default is large).
DEFAULT_CPU_KVCACHE_GIB = 2


def affinity_cores() -> list[int]:
    """The CPU cores this process may run on, in order (every core where the OS has no affinity call)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def cpu_binding() -> dict[str, str]:
    """vLLM's CPU thread binding: all cores of this process's affinity, none reserved ({} when the user chose)."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, affinity_cores())), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@contextmanager
def vllm_cpu_env() -> Iterator[None]:
    """Environment for starting vLLM on CPU; the engine's spawned processes read it while ``LLM()`` runs.

    * ``VLLM_CPU_KVCACHE_SPACE``: a modest KV cache (GiB) unless the user set one.
    * ``VLLM_CPU_OMP_THREADS_BIND`` = every core this process may use and ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``,
      unless the user set either: vLLM's own default binds the worker to the last core and keeps the others for
      its scheduler, which on a 2-core machine halves generation speed (benchmarks/vllm_binding.py measured
      both on this kind of machine and each dtype; docs/benchmarks.md).
    * ``TORCH_COMPILE_DISABLE=1`` unless set: with ``enforce_eager`` vLLM does not compile the model, but some
      helpers stay wrapped in ``torch.compile`` with the inductor backend on CPU (the sampler's
      ``batched_count_greater_than`` that ranks tokens whenever log-probs are asked for). Their first call
      makes inductor generate C++ and gcc-compile it, which a machine with a cold inductor cache pays in the
      first step. With dynamo disabled they run eagerly.
    * ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set: the engine core runs in the calling process (every
      compactlm caller on CPU is a process of its own: the generation stage's, the evaluation's, the trainer's).
      A separate engine-core process costs a second interpreter that imports torch and vLLM: SmolLM2-135M in bf16
      on 2 cores started in 8.9 s instead of 23.6 s and shut down in 1.1 s instead of 5.0 s, at the same speed
      (760 vs 752 tok/s), and its completions were identical run to run, which the separate process's
      asynchronous scheduling did not give (benchmarks/vllm_inprocess.py, docs/benchmarks.md).

    They are set only while the engine starts (and restored after), so they never leak into the caller's
    environment. With the engine in this process, dynamo is turned off in this process too
    (``torch._dynamo.config.disable``, which the environment variable only sets when torch is first imported), so
    that the compiled helper runs eagerly here as it would in an engine process of its own.
    """
    defaults = {"VLLM_CPU_KVCACHE_SPACE": str(DEFAULT_CPU_KVCACHE_GIB), "TORCH_COMPILE_DISABLE": "1",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **cpu_binding()}
    added = [k for k in defaults if k not in os.environ]
    for k in added:
        os.environ[k] = defaults[k]
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and os.environ["TORCH_COMPILE_DISABLE"] == "1":
        import torch._dynamo

        torch._dynamo.config.disable = True
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_vllm(model_dir: str | os.PathLike, *, dtype: str, max_model_len: int, seed: int, max_logprobs: int = 20,
               tensor_parallel_size: int = 1, in_process: bool = False, gpu_memory_utilization: float | None = None):
    """A vLLM ``LLM`` on `model_dir`: eager, no remote code, compactlm's CPU environment (:func:`vllm_cpu_env`).

    `in_process` keeps vLLM's engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` while it starts),
    so that the caller can reload its weights from tensors in memory (``collective_rpc("reload_weights")``);
    `gpu_memory_utilization` bounds the share of the GPU it takes when it shares the device with training.
    """
    import torch

    cuda = torch.cuda.is_available()
    # On CPU, vLLM 0.32 rewinds a seeded request's torch.Generator when a chunked (partial) prefill step's sample is
    # discarded, and CPU generators have no offset: the engine dies with "CPU Generator does not use offset" once a
    # prompt is split across steps (seen at 128 prompts x 128 tokens). Every compactlm request is seeded, so on CPU
    # prompts are prefilled whole (each step's token budget still >= one max_model_len prompt).
    extra = {} if cuda else {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, max_model_len)}
    if gpu_memory_utilization is not None and cuda:
        extra["gpu_memory_utilization"] = gpu_memory_utilization
    threads = torch.get_num_threads()  # an in-process CPU worker sets its own; the caller keeps its setting
    env = _environ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}) if in_process else nullcontext()
    try:
        with nullcontext() if cuda else vllm_cpu_env(), env:
            from vllm import LLM

            return LLM(model=str(Path(model_dir)), dtype=dtype, max_model_len=max_model_len, seed=seed,
                       enforce_eager=True, max_logprobs=max_logprobs, tensor_parallel_size=tensor_parallel_size,
                       trust_remote_code=False, **extra)
    finally:
        torch.set_num_threads(threads)


def stop_vllm(llm) -> None:
    """Shut down `llm`'s engine core (best effort: the process's exit frees it anyway)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass


def release_freed_memory() -> bool:
    """Hand memory the process has freed back to the system (glibc's ``malloc_trim``): freeing one large tensor
    after another (a layer at a time) otherwise leaves it in the allocator's heap, and the resident size creeps up
    by about a layer per layer, more or less depending on which thread freed what. False where there is no glibc."""
    libc = _libc()
    try:
        return bool(libc is not None and libc.malloc_trim(0))
    except AttributeError:  # a libc without malloc_trim (musl)
        return False


@functools.cache
def _libc():
    """The C library, found once (``find_library`` runs ``ldconfig`` in a subprocess: a fork of this process)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None
