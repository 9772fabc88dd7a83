"""Resolve the teacher reference to a local safetensors directory (GGUF converted once, cached)."""

from __future__ import annotations

from prefect import task

from compactlm.models import resolve_model
from tasks.common import retry_transient


@task(name="resolve-teacher", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def resolve_teacher(ref: str) -> str:
    return str(resolve_model(ref))
