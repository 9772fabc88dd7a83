"""Progress of long stages: the library reports, whoever listens shows it (the CLI's console draws a bar).

A stage calls :func:`report` as it goes (``report("distill", step, steps, loss=2.31, tok_s=410.0)``); the
orchestration announces (:func:`announce`) a stage's start and end. Listeners get one event dict per call
(``stage``, ``kind``: start | progress | end, ``done``, ``total`` and the figures); with no listener a report
costs one list lookup. A stage that runs in a child process (generation) reports through its stdout:
:func:`emit_line` writes one ``@progress {json}`` line, and the parent passes it on with :func:`parse_line`.
Listeners must be cheap and must not raise; one that does is dropped (progress never breaks a stage).
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: listener(event)
Listener = Callable[[dict[str, Any]], None]
PREFIX = "@progress "

_listeners: list[Listener] = []
_lock = threading.Lock()


def report(stage: str, done: int, total: int | None = None, **info: Any) -> None:
    """`done` of `total` units of `stage` are finished; `info` adds figures (loss, tok_s, rows, ...)."""
    _send({"stage": stage, "kind": "progress", "done": int(done), "total": None if total is None else int(total),
           **info})


def announce(stage: str, kind: str, **info: Any) -> None:
    """`stage` starts (``kind="start"``: output, cached) or ends (``"end"``: seconds, cached, ok, log)."""
    _send({"stage": stage, "kind": kind, **info})


def _send(event: dict[str, Any]) -> None:
    for fn in list(_listeners):
        try:
            fn(dict(event))
        except Exception:  # noqa: BLE001 - a broken display must not break the stage
            with _lock:
                if fn in _listeners:
                    _listeners.remove(fn)


@contextmanager
def listening(fn: Listener) -> Iterator[None]:
    """Call `fn` for every report made while the block runs (from any thread)."""
    with _lock:
        _listeners.append(fn)
    try:
        yield
    finally:
        with _lock:
            if fn in _listeners:
                _listeners.remove(fn)


def emit_line(event: dict[str, Any]) -> None:
    """A listener for child processes: one ``@progress`` line on stdout per report."""
    if event["kind"] == "progress":
        print(PREFIX + json.dumps(event), file=sys.stdout, flush=True)


def parse_line(line: str) -> bool:
    """If `line` is a child's ``@progress`` line, report it here and return True."""
    if not line.startswith(PREFIX):
        return False
    try:
        event = json.loads(line[len(PREFIX):])
        stage, done, total = event.pop("stage"), event.pop("done"), event.pop("total")
        event.pop("kind", None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    report(stage, done, total, **event)
    return True
