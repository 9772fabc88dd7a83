"""Where the engines run: the environment vLLM needs on this machine (shared by generation and evaluation, so
neither imports the other)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

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

    Both are set only while the engine starts (and restored after), so they never leak into the caller.
    """
    defaults = {"VLLM_CPU_KVCACHE_SPACE": str(DEFAULT_CPU_KVCACHE_GIB), "TORCH_COMPILE_DISABLE": "1",
                **cpu_binding()}
    added = [k for k in defaults if k not in os.environ]
    for k in added:
        os.environ[k] = defaults[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
