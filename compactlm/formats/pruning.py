"""The pruning record, ``pruning.json``: how a student was cut from its teacher. It travels with the student
(prune writes it; distillation copies it into the distilled student and reads its layer and channel maps).

Keys: ``architecture`` (the teacher's model_type), ``written_as`` (the student's: a width-pruned Qwen2 may be
written as the identical Llama, see :func:`compactlm.arch.written_as`), ``teacher`` / ``student`` (shapes),
``kept_layers`` (the teacher index of each student layer, in order), ``kept_heads`` (teacher query heads per student
layer), ``kept_neurons`` (count per student layer), ``kept_channels`` (teacher hidden channels kept), the
compensations ``norm_scale`` / ``q_norm_scale`` / ``embed_scale``, ``params_before`` / ``params_after`` /
``param_ratio``, and how the shape was chosen: ``selection`` ("config" | "shape" | "params"), ``budget``,
``candidate`` and, for a parameter budget, the whole ``ranking``.

A student pruned from a compactlm student (a schedule's later rounds) also has ``root``: ``teacher_dir``,
``kept_layers`` and ``kept_channels`` composed through every parent record, i.e. relative to the original teacher,
which is what distillation learns from; :func:`kept_layers` and :func:`kept_channels` return those.
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


def root_of(record: dict[str, Any]) -> dict[str, Any]:
    """{"teacher_dir", "kept_layers", "kept_channels"} of `record` relative to the original teacher."""
    return record.get("root") or {k: record.get(k) for k in ("teacher_dir", "kept_layers", "kept_channels")}


def compose_root(parent: dict[str, Any] | None, record: dict[str, Any]) -> dict[str, Any] | None:
    """The ``root`` of a student pruned from a model whose record is `parent` (None: a plain model, no root):
    its layer and channel maps taken through the parent's to the original teacher. A channel map that is not a
    selection of channels (a rotated hidden size: None) makes the composed map None."""
    if parent is None:
        return None
    up = root_of(parent)
    layers, channels = record.get("kept_layers"), record.get("kept_channels")

    def through(kept: list[int] | None, above: list[int] | None) -> list[int] | None:
        return None if kept is None or above is None else [above[i] for i in kept]

    return {"teacher_dir": up["teacher_dir"], "kept_layers": through(layers, up["kept_layers"]),
            "kept_channels": through(channels, up["kept_channels"])}


def kept_layers(model_dir: str | os.PathLike) -> list[int] | None:
    """Teacher layer index of each student layer, when the student was pruned by compactlm (the original
    teacher's, through every round of a schedule)."""
    record = read_record(model_dir)
    return None if record is None else root_of(record)["kept_layers"]


def kept_channels(model_dir: str | os.PathLike) -> list[int] | None:
    """Teacher hidden channel of each student channel, when the student was pruned by compactlm (the original
    teacher's, through every round of a schedule)."""
    record = read_record(model_dir)
    return None if record is None else root_of(record)["kept_channels"]
