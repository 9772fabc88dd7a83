"""Export stage: deployable files made from a model directory (the distilled student).

Public API::

    check_export(model_dir, cfg: ExportConfig) -> None         # before anything is written; ExportError
    write_exports(model_dir, cfg, dest) -> list[dict]           # the files, into an existing (temp) directory
    export_model(model_dir, cfg, out_dir) -> dict               # the same, published atomically with a manifest

Formats: GGUF for llama.cpp / Ollama (:mod:`compactlm.export.llamacpp`: llama.cpp's converter and quantizer) and
compressed-tensors directories for vLLM (:mod:`compactlm.export.compressed`). Every record says ``name`` (e.g.
``gguf-q4_k_m``, ``vllm-w8a8``), ``format`` (``gguf`` | ``vllm``), ``type``, ``path`` (relative to the output)
and ``size_bytes``; GGUF records also the tensor types inside (k-quants fall back to other types for tensors
whose rows are not a multiple of 256), whether the chat template is inside and the vocabulary size.

Output directory (``export-model/<key>/`` in a pipeline)::

    gguf/model-<type>.gguf      one file per export.gguf type
    vllm-<scheme>/              one HF directory per export.vllm scheme (loads in vLLM and transformers)
    logs/                       the converter's and quantizer's output
    exports.json                {"source": model_dir, "exports": [record, ...]}
    manifest.json               written last (then the directory is renamed into place)

Importing this package is cheap; torch, compressed-tensors and llama.cpp load when an export is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactlm.export.toolchain import ExportError, ToolchainError

if TYPE_CHECKING:
    from compactlm.config import ExportConfig

EXPORTS_FILE = "exports.json"


def check_export(model_dir: str | os.PathLike, cfg: ExportConfig) -> None:
    """What can be checked from the model's files before any export is written (architecture, tokenizer,
    toolchain); shape checks of the vLLM schemes run when the model is loaded, still before writing."""
    from compactlm.export.llamacpp import check_gguf

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"export: {model_dir} is not a Hugging Face model directory (no config.json)")
    check_gguf(model_dir, list(cfg.gguf))


def write_exports(model_dir: str | os.PathLike, cfg: ExportConfig, dest: str | os.PathLike,
                  threads: int | None = None) -> list[dict[str, Any]]:
    """Write every export `cfg` asks for into `dest` and ``exports.json`` beside them; return the records."""
    from compactlm.export.compressed import write_compressed
    from compactlm.export.llamacpp import write_gguf

    check_export(model_dir, cfg)
    dest = Path(dest)
    records: list[dict[str, Any]] = []
    if cfg.gguf:
        records += write_gguf(model_dir, dest, list(cfg.gguf), threads=threads or cfg.threads)
    for scheme in cfg.vllm:
        records.append(write_compressed(model_dir, dest, scheme, cfg.group_size))
    (dest / EXPORTS_FILE).write_text(json.dumps({"source": str(model_dir), "exports": records}, indent=2))
    return records


def export_model(model_dir: str | os.PathLike, cfg: ExportConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """:func:`write_exports` into `out_dir`, published atomically (a crash leaves no `out_dir`); returns the
    manifest (``exports``: the records, ``source``: `model_dir`)."""
    from compactlm.artifacts import publish_dir

    check_export(model_dir, cfg)
    manifest: dict[str, Any] = {"source": str(model_dir), "config": cfg.model_dump(mode="json")}
    with publish_dir(out_dir, manifest) as tmp:
        manifest["exports"] = write_exports(model_dir, cfg, tmp)
    return manifest


def read_exports(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a finished export directory, each with ``path`` made absolute."""
    out_dir = Path(out_dir)
    records = json.loads((out_dir / EXPORTS_FILE).read_text())["exports"]
    return [{**r, "path": str(out_dir / r["path"])} for r in records]


__all__ = ["EXPORTS_FILE", "ExportError", "ToolchainError", "check_export", "export_model", "read_exports",
           "write_exports"]
