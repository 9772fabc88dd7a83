"""The pruning record, ``pruning.json``: how a student was cut from its teacher. It travels with the student
(prune writes it; distillation copies it into the distilled student and reads its layer and channel maps).

Keys: ``architecture`` (the teacher's model_type), ``written_as`` (the student's: a width-pruned Qwen2 may be
written as the identical Llama, see :func:`compactlm.arch.written_as`), ``teacher`` / ``student`` (shapes),
``kept_layers`` (the teacher index of each student layer, in order), ``kept_heads`` (teacher query heads per student
layer), ``kept_neurons`` (count per student layer), ``kept_channels`` (teacher hidden channels kept), the
compensations ``norm_scale`` / ``q_norm_scale`` / ``embed_scale``, ``params_before`` / ``params_after`` /
``param_ratio``, and how the shape was chosen: ``selection`` ("config" | "shape" | "params"), ``budget``,
``candidate`` and, for a parameter budget, the whole ``ranking``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from compactlm.artifacts import write_json_atomic

RECORD_FILE = "pruning.json"


def write_record(model_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    write_json_atomic(Path(model_dir) / RECORD_FILE, record)


def read_record(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The record of a pruned (or pruned-then-distilled) student, or None for any other model directory."""
    path = Path(model_dir) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def kept_layers(model_dir: str | os.PathLike) -> list[int] | None:
    """Teacher layer index of each student layer, when the student was pruned by compactlm."""
    record = read_record(model_dir)
    return None if record is None else record.get("kept_layers")


def kept_channels(model_dir: str | os.PathLike) -> list[int] | None:
    """Teacher hidden channel of each student channel, when the student was pruned by compactlm."""
    record = read_record(model_dir)
    return None if record is None else record.get("kept_channels")
