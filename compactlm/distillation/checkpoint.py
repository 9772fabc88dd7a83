"""Resumable training checkpoints, written atomically beside the output directory.

Layout (``root = <out_dir>.ckpt``; ``out_dir`` itself is only written at the end, by ``publish_dir``)::

    <out_dir>.ckpt/step-00000012/
        student.safetensors      student weights (fp32 as trained; tied tensors stored once)
        projection.safetensors   hidden-state KD projection, when there is one
        optimizer.pt             {"optimizer": AdamW state_dict, "torch_rng": ..., "cuda_rng": [...]}; tensors and
                                 plain containers only, read back with torch.load(weights_only=True)
        state.json               step, rows drawn from the data stream, counters, loss curve so far, fingerprint

Under ``distill.strategy: fsdp`` the weights and optimizer state are DCP shards instead (``dcp/``, each process
writes its own; :mod:`compactlm.distillation.sharded`) with one ``rng-<rank>.pt`` per process, and all processes
build the checkpoint together (:func:`save_sharded`, :func:`load` with ``sharded=True``).

A checkpoint is built in ``.tmp-step-*`` inside the root and renamed to ``step-N`` when complete, so any
``step-*`` directory is whole; a kill mid-write leaves only a ``.tmp-*`` directory, removed on the next start.
After a new checkpoint is in place the older ones are deleted (the newest is always kept). The LR schedule is
a pure function of the step, so it needs no state. The ``fingerprint`` (config without ``checkpoint_every``,
seed, device, input fingerprints) must match for a checkpoint to be resumed; others are ignored and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactlm.artifacts import as_write_error, write_json_atomic

if TYPE_CHECKING:
    import torch

STATE_FILE = "state.json"
OPTIM_FILE = "optimizer.pt"


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    """``<out_dir>.ckpt`` beside the output directory."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.ckpt"


def run_fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _step_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if p.is_dir())


def latest(root: str | os.PathLike, fingerprint: str) -> Path | None:
    """The newest complete checkpoint of this run under `root`, or None. Removes stale temp directories."""
    root = Path(root)
    if not root.is_dir():
        return None
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for path in reversed(_step_dirs(root)):
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if state.get("fingerprint") == fingerprint:
            return path
    return None


def save(root: str | os.PathLike, step: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
         state: dict[str, Any]) -> Path:
    """Write checkpoint `step` atomically; returns its directory. `state` must be JSON-serialisable."""
    import torch
    from safetensors.torch import save_model

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step:08d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), **_rng()}, tmp / OPTIM_FILE)
        return _install(root, tmp, step, state)
    except Exception as e:
        _raise_write_error(e, root, step)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(root: Path, tmp: Path, step: int, state: dict[str, Any]) -> Path:
    """Finish the checkpoint built in `tmp`: its ``state.json`` last, then renamed into place as ``step-N`` and the
    older checkpoints dropped; returns its directory."""
    write_json_atomic(tmp / STATE_FILE, {**state, "step": step})
    final = root / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in _step_dirs(root):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _raise_write_error(e: Exception, root: Path, step: int) -> None:
    """A full disk or file-size limit while writing checkpoint `step` as a WriteError naming it (else nothing)."""
    err = as_write_error(e, root / f"step-{step:08d}", "the last good checkpoint is kept and a rerun resumes from it"
                         if _step_dirs(root) else "")
    if err is not None:
        raise err from e


def save_sharded(root: str | os.PathLike, step: int, modules: dict[str, torch.nn.Module],
                 optimizer: torch.optim.Optimizer, state: dict[str, Any], rank: int, barrier) -> None:
    """Every process of an FSDP run: write checkpoint `step` together (DCP shards, one RNG file each); rank 0
    then writes ``state.json``, renames the directory into place and drops older checkpoints."""
    import torch

    from compactlm.distillation import sharded

    root = Path(root)
    tmp = root / f".tmp-step-{step:08d}"  # one name for every process (no random suffix)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        sharded.save(tmp, modules, optimizer)
        torch.save(_rng(), tmp / f"rng-{rank}.pt")
        barrier()
        if rank == 0:
            _install(root, tmp, step, state)
    except Exception as e:
        _raise_write_error(e, root, step)
        raise


def _rng() -> dict[str, Any]:
    import torch

    blob = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        blob["cuda_rng"] = torch.cuda.get_rng_state_all()
    return blob


def _set_rng(blob: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(blob["torch_rng"])
    if "cuda_rng" in blob and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])


def load(path: str | os.PathLike, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, *,
         sharded: bool = False, rank: int = 0) -> dict[str, Any]:
    """Restore modules, optimizer and RNG from checkpoint `path` (every process of an FSDP run together, with
    `sharded`); returns its ``state.json``."""
    import torch
    from safetensors.torch import load_model

    path = Path(path)
    if sharded:
        from compactlm.distillation import sharded as dcp_shards

        dcp_shards.load(path, modules, optimizer)
        _set_rng(torch.load(path / f"rng-{rank}.pt", weights_only=True))
        return json.loads((path / STATE_FILE).read_text())
    for name, module in modules.items():
        missing, unexpected = load_model(module, str(path / f"{name}.safetensors"), strict=True)
        if missing or unexpected:  # pragma: no cover - strict=True raises first
            raise RuntimeError(f"checkpoint {path}/{name}: missing {missing}, unexpected {unexpected}")
    blob = torch.load(path / OPTIM_FILE, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    _set_rng(blob)
    return json.loads((path / STATE_FILE).read_text())


def remove(root: str | os.PathLike) -> None:
    shutil.rmtree(root, ignore_errors=True)
