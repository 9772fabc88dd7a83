"""Fault injection for the subprocess scripts: pause a real call at a chosen point, or limit file writes."""

from __future__ import annotations

import resource
import signal
import time

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over the limit fails with EFBIG instead of killing us


def pause_after(real, marker: str = "IN-PUBLISH"):
    """`real` that, once it returned, announces `marker` on stdout and sleeps (the test kills us there)."""
    def wrapped(*a, **kw):
        out = real(*a, **kw)
        print(marker, flush=True)
        time.sleep(600)
        return out
    return wrapped


def limit_writes(n: int = 4096) -> None:
    """From now on every write over `n` bytes fails with a real EFBIG from the kernel (as on a full disk)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
