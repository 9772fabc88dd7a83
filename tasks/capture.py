"""Everything a stage prints, into the stage's log file: engine internals (vLLM, lm-eval, transformers), its
child processes' output, C-level writes, all at the file-descriptor level.

``with capture_output(path, tee=True): ...`` points fds 1 and 2 at a pipe for the block; a reader thread writes
what arrives to the file and, when the capture tees, on to what stdout was before (both streams arrive through
one pipe, so a tee shows stderr on stdout too). Captures nest: the CLI captures the whole run into
``run-<time>.log`` and each stage into its own file. Fds belong to the process, so a capture another thread
opens inside one takes over until it ends, and one that ends out of order hands its fds to the capture above
it. :func:`terminal` is a file object on the original stdout, for a console's own lines.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO


@dataclass
class _Frame:
    """One capture: its pipe, the fds 1/2 it replaced (``prev``), the pump thread, its file."""

    file: IO[bytes]
    tee: bool
    prev: tuple[int, int]
    write_fd: int
    reader: threading.Thread | None = None
    ended: bool = False  # popped: its prev fds are closed by the pump once it has drained the pipe
    owns_prev: bool = True  # False once prev was handed to the capture above it


_lock = threading.Lock()
_frames: list[_Frame] = []
_terminal: list[IO[str]] = []


def terminal() -> IO[str]:
    """A text stream on the original stdout (fd 1 as it was before any capture), line buffered."""
    with _lock:
        if not _terminal:
            fd = os.dup(_frames[0].prev[0] if _frames else 1)
            _terminal.append(os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="replace"))
        return _terminal[0]


def _pump(frame: _Frame, read_fd: int) -> None:
    """Copy the frame's pipe to its file (and on to what stdout was before, when it tees) until EOF."""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        try:
            frame.file.write(chunk)
            frame.file.flush()
        except (OSError, ValueError):
            pass  # a full disk must not block the stage's output
        if frame.tee:
            with _lock:
                if not frame.owns_prev:
                    continue
                try:
                    os.write(frame.prev[0], chunk)
                except OSError:
                    pass
    os.close(read_fd)
    frame.file.close()
    with _lock:
        if frame.ended and frame.owns_prev:
            for fd in frame.prev:
                os.close(fd)
            frame.owns_prev = False


def _push(frame_file: IO[bytes], tee: bool) -> _Frame:
    read_fd, write_fd = os.pipe()
    with _lock:
        frame = _Frame(frame_file, tee, (os.dup(1), os.dup(2)), write_fd)
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        _frames.append(frame)
    frame.reader = threading.Thread(target=_pump, args=(frame, read_fd), name="compactlm-capture", daemon=True)
    frame.reader.start()
    return frame


def _pop(frame: _Frame) -> None:
    """End `frame`: the innermost gives fds 1/2 back; one ended out of order (another thread's capture opened
    inside it) hands what it had replaced to the capture above it. Then its pump drains (2 s at most: a child
    process may still hold the pipe; the pump then goes on in the background)."""
    with _lock:
        i = _frames.index(frame)
        if i == len(_frames) - 1:
            os.dup2(frame.prev[0], 1)
            os.dup2(frame.prev[1], 2)
        else:
            above = _frames[i + 1]
            for fd in above.prev:
                os.close(fd)
            above.prev, frame.owns_prev = frame.prev, False
        os.close(frame.write_fd)
        frame.ended = True
        del _frames[i]
    frame.reader.join(timeout=2.0)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


@contextmanager
def capture_output(path: str | os.PathLike, *, tee: bool) -> Iterator[Path]:
    """Append everything written to fds 1 and 2 during the block to `path`; `tee` also passes it on as before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _flush()
    frame = _push(open(path, "ab"), tee)
    try:
        yield path
    finally:
        _flush()
        _pop(frame)
