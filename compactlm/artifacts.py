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

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"

# Write failures as the libraries report them: OSError (parquet, json), SafetensorError "I/O error: ... (os error
# 28)", torch.save's "PytorchStreamWriter failed writing file" / "unexpected pos" (errno lost).
_FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large",
                errno.EDQUOT: "disk quota exceeded"}
_OS_ERROR_CODE = re.compile(r"(?:os error|errno)\s*(\d+)", re.IGNORECASE)
_TORCH_WRITE_FAILED = ("failed writing file", "unexpected pos", "iostream error", "file write failed")


def _fsize_limit() -> int | None:
    """This process's file size limit (``ulimit -f``) in bytes, or None when unlimited."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


class WriteError(OSError):
    """A stage could not write its output (disk full, quota, file size limit): names the path and the cause.

    Raised in place of the library's own error (which often names neither); the original is its ``__cause__``.
    Nothing half-written is published; finished shards / checkpoints stay and a rerun with space resumes.
    """


def as_write_error(exc: BaseException, path: str | os.PathLike, keeps: str = "") -> WriteError | None:
    """`exc` as a :class:`WriteError` naming `path` when it is an out-of-space / size-limit failure, else None.

    `keeps` tells the user what survives (e.g. "finished shards are kept"); it is added to the message.
    """
    if isinstance(exc, WriteError):
        return None
    code: int | None = None
    seen: BaseException | None = exc
    torch_write = False
    for _ in range(6):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            code = seen.errno
            break
        m = _OS_ERROR_CODE.search(str(seen))
        if m and int(m.group(1)) in _FULL_ERRNOS:
            code = int(m.group(1))
            break
        torch_write = torch_write or any(t in str(seen) for t in _TORCH_WRITE_FAILED)
        seen = seen.__cause__ or seen.__context__
    if code is None and not torch_write:
        return None
    free = ""
    try:
        usage = shutil.disk_usage(next(p for p in Path(path).parents if p.exists()))
        free = f"; {usage.free / 2**20:.1f} MiB free on that filesystem"
        if code is None and usage.free < 1 << 20:  # torch.save drops the errno; an empty disk tells
            code = errno.ENOSPC
    except (OSError, StopIteration):
        pass
    if code is None and _fsize_limit() is not None:
        code = errno.EFBIG
    cause = _FULL_ERRNOS[code] if code else "the write failed (disk full or over a file size limit?)"
    if code == errno.EFBIG:
        limit = _fsize_limit()
        cause += f" (over the file size limit, ulimit -f = {limit} bytes)" if limit else " (over a file size limit)"
    msg = (f"could not write {path}: {cause}{free}. Free space (or raise the limit) and rerun"
           + (f": {keeps}" if keeps else "") + ". Nothing half-written was published")
    return WriteError(code or errno.EIO, msg)


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


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", *, keeps: str | None = None) -> Iterator[Any]:
    """Yield a file opened on a temp name beside `path` (``mode`` "w" text, "wb" binary); once the block ends, fsync
    it and rename it over `path`, so `path` is either absent, the old file or the whole new one.

    On any failure the temp file is deleted at once (a full disk gets its space back). With `keeps` given, an
    out-of-space / size-limit failure is raised as a :class:`WriteError` naming `path` and what survives.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        err = as_write_error(e, path, keeps) if keeps is not None else None
        if err is not None:
            raise err from e
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temp file, fsync it, then rename over `path`."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(final: str | os.PathLike) -> list[Path]:
    """Remove the temp directories of `final` left behind by killed processes of this host; return them.

    Temp names carry ``<host>-<pid>``; one is stale when its host is this one and that pid is gone. Temp
    directories of live processes, of other hosts (a shared filesystem) or in an older naming are kept:
    nothing ever reads a temp directory, so keeping one costs only space.
    """
    final = Path(final)
    prefix, host = _tmp_prefix(final), socket.gethostname()
    removed = []
    for p in final.parent.glob(glob.escape(prefix) + "*"):
        parts = p.name[len(prefix):].rsplit("-", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def publish_dir(final: str | os.PathLike, manifest: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary directory; on success write `manifest` into it and rename it to `final`.

    The caller may add entries to `manifest` inside the block. On an exception the temporary directory is
    removed and `final` is untouched; an out-of-space / file-size-limit failure is re-raised as
    :class:`WriteError` naming `final`. Temp directories of `final` left by killed processes (SIGKILL, power
    loss) are removed first (:func:`remove_stale_tmp`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(final)
    tmp = final.parent / f"{_tmp_prefix(final)}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:
            yield tmp
        except Exception as e:
            err = as_write_error(e, final)
            if err is not None:
                raise err from e
            raise
        manifest.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        manifest.setdefault("compactlm_version", code_version())
        try:
            write_json_atomic(tmp / MANIFEST, manifest)
        except OSError as e:
            err = as_write_error(e, final)
            if err is not None:
                raise err from e
            raise
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
