"""Where the engines run: the environment vLLM needs on this machine (shared by generation and evaluation, so
neither imports the other)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

#: KV cache size (GiB) given to vLLM on CPU when VLLM_CPU_KVCACHE_SPACE is unset (vLLM's own default is large).
DEFAULT_CPU_KVCACHE_GIB = 2


@contextmanager
def vllm_cpu_env() -> Iterator[None]:
    """Environment for starting vLLM on CPU; the engine's spawned processes read it while ``LLM()`` runs.

    * ``VLLM_CPU_KVCACHE_SPACE``: a modest KV cache (GiB) unless the user set one.
    * ``TORCH_COMPILE_DISABLE=1`` unless set: with ``enforce_eager`` vLLM does not compile the model, but some
      helpers stay wrapped in ``torch.compile`` with the inductor backend on CPU (the sampler's
      ``batched_count_greater_than`` that ranks tokens whenever log-probs are asked for). Their first call
      makes inductor generate C++ and gcc-compile it, which a machine with a cold inductor cache pays in the
      first step. With dynamo disabled they run eagerly.

    Both are set only while the engine starts (and restored after), so they never leak into the caller.
    """
    defaults = {"VLLM_CPU_KVCACHE_SPACE": str(DEFAULT_CPU_KVCACHE_GIB), "TORCH_COMPILE_DISABLE": "1"}
    added = [k for k in defaults if k not in os.environ]
    for k in added:
        os.environ[k] = defaults[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
