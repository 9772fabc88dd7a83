"""How `compactlm run` ends when it is interrupted or loses its Prefect server: in seconds, with one clear line.

Without a guard, a terminal's Ctrl-C also kills Prefect's temporary server (it is in the same process group), and
the run then spends minutes retrying API calls to the dead server before it exits; when only the server dies, the
process hangs at exit draining its event queue. :class:`RunGuard` (used by ``flows.cli``):

* on SIGINT / SIGTERM: lets the run unwind normally (stages mark their MLflow runs failed), silences the
  retry noise, and if the unwinding has not finished after ``grace`` seconds ends the process itself;
* watches the temporary server (a child ``uvicorn ... prefect.server.api.server:create_app``): if it dies while the
  run goes on, ends the run;
* either way kills the run's own child processes (a generation or evaluation subprocess) and prints one line:
  what happened and how to resume (rerun the same command: finished stage outputs are reused).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import TextIO

SERVER_MARK = "prefect.server.api.server:create_app"


class RunGuard:
    def __init__(self, resume_hint: str, grace: float = 6.0, poll: float = 0.5, stream: TextIO | None = None):
        self.resume_hint = resume_hint
        self.grace = grace
        self.poll = poll
        self.interrupted: str | None = None
        self.done = threading.Event()
        self._stderr: TextIO = stream or sys.stderr  # where the one line goes (the console's terminal)
        self._previous: dict[int, object] = {}

    # -------------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> RunGuard:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        threading.Thread(target=self._watch_server, name="compactlm-server-watch", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def message(self) -> str:
        what = {"SIGINT": "interrupted", "SIGTERM": "terminated"}.get(self.interrupted or "", "stopped")
        return f"compactlm: {what}. {self.resume_hint}"

    # --------------------------------------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame) -> None:
        if self.interrupted is not None:  # a second Ctrl-C: do not wait for the unwinding
            self._exit(self.message(), 130)
        self.interrupted = signal.Signals(signum).name
        self._mute()
        threading.Thread(target=self._deadline, name="compactlm-exit-deadline", daemon=True).start()
        raise KeyboardInterrupt

    def _deadline(self) -> None:
        if not self.done.wait(self.grace):
            self._exit(self.message(), 130)

    # ------------------------------------------------------------------------------------- the Prefect server
    def _watch_server(self) -> None:
        import psutil

        server = None
        while not self.done.is_set():
            if server is None:
                server = _find_server()
            elif not server.is_running() or server.status() == psutil.STATUS_ZOMBIE:
                time.sleep(1.0)  # a terminal's Ctrl-C kills the server too: let the signal handler speak first
                if self.interrupted is None and not self.done.is_set():
                    self._mute()
                    self._exit("compactlm: the temporary Prefect server stopped unexpectedly, so the run cannot "
                               f"go on. {self.resume_hint}", 1)
                return
            time.sleep(self.poll)

    # ------------------------------------------------------------------------------------------- exiting
    def _mute(self) -> None:
        """Keep the one line ours: Prefect's API retry messages go to /dev/null from now on."""
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives until the process ends

    def _exit(self, line: str, code: int) -> None:
        _kill_children()
        print(line, file=self._stderr, flush=True)
        os._exit(code)


def _find_server():
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if SERVER_MARK in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def _kill_children() -> None:
    """SIGKILL every descendant (stage subprocesses, the temporary server): nothing outlives the run."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=3)
