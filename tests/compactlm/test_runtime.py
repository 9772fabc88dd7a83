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
