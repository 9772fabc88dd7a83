"""Plain slicing straight from the teacher's safetensors files (``prune.streaming``), for teachers larger than RAM.

The teacher is never loaded as a model: each of its tensors is read from its shard (plain file reads), sliced and
rescaled exactly as :func:`compactlm.pruning.slicing.prune_model` does (the same :func:`sliced_items`), and written
into the student's ``model.safetensors`` at its place. The student's header (names, shapes, offsets) is known
before any data is written, from a first pass that slices shape-only (meta-device) tensors and reads no data, so
the teacher is read once and peak memory is about one teacher tensor and its slice. The file is laid out as
safetensors' own writer lays it out (``__metadata__`` first, tensors by dtype then name, the header padded to 8
bytes), and config.json / generation_config.json are what ``save_pretrained`` writes, so the student directory is
byte-identical to the in-memory path's.

Only for plain slicing of an explicit shape: a budget's candidates and ``prune.repair`` run the teacher on
calibration data, which needs it in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactlm.config import PruneConfig
from compactlm.formats.scores import ImportanceScores
from compactlm.pruning.shapes import student_config
from compactlm.pruning.slicing import _scales, plan_pruning, pruning_record, sliced_items, zero_items
from compactlm.weights import DTYPES, TeacherTensors

if TYPE_CHECKING:
    import torch

def _sliced(key: str, tensor: torch.Tensor, plan: dict, config: Any, new_cfg: Any,
            scales: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's tensors from the teacher's `key` (none when its layer is dropped; a tied head is not stored)."""
    for name, t in sliced_items([(key, tensor)], plan, config, scales):
        if not (name == "lm_head.weight" and new_cfg.tie_word_embeddings):
            yield name, t


def _header(shapes: dict[str, tuple[list[int], str]]) -> tuple[bytes, list[str]]:
    """safetensors header bytes (padded to 8) for tensors {name: (shape, dtype name)}, and the data order."""
    order = sorted(shapes, key=lambda n: (-DTYPES[shapes[n][1]][1], n))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        shape, dtype = shapes[name]
        size = DTYPES[dtype][2] * math.prod(shape)
        header[name] = {"dtype": DTYPES[dtype][0], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), order


def write_student(model_dir: Path, config: Any, scores: ImportanceScores, cfg: PruneConfig, dtype: str,
                  out: Path) -> dict[str, Any]:
    """Slice the teacher in `model_dir` to `cfg`'s shape into `out` (model.safetensors, config.json,
    generation_config.json) tensor by tensor; return the pruning record (as :func:`prune_model`'s)."""
    import torch

    from compactlm.models import count_params_on_disk

    plan = plan_pruning(config, scores, cfg)
    scales = _scales(config, plan, cfg.rescale_norms)
    new_cfg = student_config(config, plan)
    torch_dtype = getattr(torch, dtype)
    teacher = TeacherTensors(model_dir)
    source: dict[str, str | None] = {}  # student tensor -> the teacher tensor it is sliced from (None: zeros)
    shapes: dict[str, tuple[list[int], str]] = {}
    for key in teacher.keys():  # pass 1: shapes only, from data-less tensors
        for name, t in _sliced(key, teacher.meta(key, torch_dtype), plan, config, new_cfg, scales):
            source[name], shapes[name] = key, (list(t.shape), dtype)
    zeros = dict(zero_items(config, new_cfg, torch_dtype))
    for name, t in zeros.items():
        source[name], shapes[name] = None, (list(t.shape), dtype)
    header, order = _header(shapes)
    with open(out / "model.safetensors", "wb") as f:  # pass 2: the data, in the file's order
        f.write(len(header).to_bytes(8, "little") + header)
        for name in order:
            key = source[name]
            t = zeros[name] if key is None else dict(
                _sliced(key, teacher.get(key, torch_dtype), plan, config, new_cfg, scales))[name]
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))  # no copy of the bytes
    _write_configs(model_dir, new_cfg, torch_dtype, out)
    after = sum(math.prod(shape) for shape, _ in shapes.values())
    return pruning_record(config, new_cfg, plan, cfg, scales, count_params_on_disk(model_dir), after)


def _write_configs(model_dir: Path, new_cfg: Any, dtype, out: Path) -> None:
    """config.json and generation_config.json as ``save_pretrained`` of the student model writes them (the model
    built on the meta device: no weights allocated)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from compactlm.models import MODEL_BUILD_LOCK

    with MODEL_BUILD_LOCK, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(new_cfg, dtype=dtype)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    if model.can_generate():
        model.generation_config.save_pretrained(out)
