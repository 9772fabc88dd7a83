"""The environment the engines get on this machine."""

from __future__ import annotations

import os


def test_vllm_cpu_env_is_scoped_and_respects_the_user(monkeypatch):
    import torch._dynamo

    from compactlm.runtime import vllm_cpu_env

    monkeypatch.setattr(torch._dynamo.config, "disable", False)  # restored after the test
    for k in ("TORCH_COMPILE_DISABLE", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    with vllm_cpu_env():
        assert os.environ["TORCH_COMPILE_DISABLE"] == "1" and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the engine core runs in this process...
    assert torch._dynamo.config.disable  # ...so its compiled helper runs eagerly here
    assert "TORCH_COMPILE_DISABLE" not in os.environ and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    torch._dynamo.config.disable = False
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the user's choice: an engine process of its own
    with vllm_cpu_env():
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    assert not torch._dynamo.config.disable


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
