"""Stage outputs on disk: content-keyed directories published atomically.

Each stage writes into ``<workdir>/<stage>/<key>/`` where ``key`` hashes the stage's config, the keys of
its upstream artifacts and compactlm's version. A directory is *complete* only once its
``manifest.json`` exists; it is written last, after every other file, and the directory itself is built
under a temporary name and renamed into place. So:

* a crash never leaves a directory a later run would mistake for a good one;
* asking again for the same inputs finds the finished directory and costs nothing;
* two runs with different inputs never write into each other's outputs, and two with the same inputs
  race harmlessly (the loser's identical copy is discarded).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


def code_version() -> str:
    from compactlm import __version__

    return __version__


def stage_key(stage: str, config: Any, upstream: list[str | os.PathLike] | None = None) -> str:
    """A short hash of what determines a stage's output: its config, its inputs' keys, the code version."""
    ups = [fingerprint(u) for u in upstream or []]
    cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    blob = json.dumps({"stage": stage, "config": cfg, "upstream": ups, "version": code_version()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint(path: str | os.PathLike) -> str:
    """Identity of an input artifact: the hash of its manifest when compactlm wrote it (the manifest is
    written last and describes the content), else a hash of its files' names, sizes and modification times
    (cheap for multi-GB model directories)."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return hashlib.sha256((p / MANIFEST).read_bytes()).hexdigest()[:16]
    if p.is_file():
        st = p.stat()
        return hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    h = hashlib.sha256(str(p.resolve()).encode())
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temp file, fsync it, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def publish_dir(final: str | os.PathLike, manifest: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary directory; on success write `manifest` into it and rename it to `final`.

    The caller may add entries to `manifest` inside the block. On an exception the temporary directory is
    removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        manifest.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        manifest.setdefault("compactlm_version", code_version())
        write_json_atomic(tmp / MANIFEST, manifest)
        if final.exists() and not is_complete(final):
            shutil.rmtree(final)  # leftovers of an older, interrupted layout
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def output_lock(final: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock for computing `final` (an advisory ``flock`` on ``.<name>.lock`` beside it).

    Two runs that need the same output serialise on it: the second waits, then finds it complete.
    Runs with different outputs never wait for each other.
    """
    import fcntl

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def dir_size_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
