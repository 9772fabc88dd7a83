"""The environment the engines get on this machine."""

from __future__ import annotations

import os


def test_vllm_cpu_env_is_scoped_and_respects_the_user(monkeypatch):
    from compactlm.runtime import vllm_cpu_env

    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    with vllm_cpu_env():
        assert os.environ["TORCH_COMPILE_DISABLE"] == "1" and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert "TORCH_COMPILE_DISABLE" not in os.environ and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"


def test_vllm_binds_every_core_unless_the_user_chose(monkeypatch):
    from compactlm.runtime import vllm_cpu_env

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    with vllm_cpu_env():
        cores = [int(c) for c in os.environ["VLLM_CPU_OMP_THREADS_BIND"].split(",")]
        assert cores == sorted(os.sched_getaffinity(0)) and os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")  # vLLM's own choice, kept
    with vllm_cpu_env():
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "auto" and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ
