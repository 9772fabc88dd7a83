"""What `compactlm run` shows: one line per stage start and end, a progress bar while a long stage runs, the
warnings that matter (once each), and the result. Everything else (Prefect's log lines, vLLM / lm-eval /
transformers internals, child processes) goes to log files: the whole run to ``<workdir>/logs/run-<time>.log``,
each stage to ``<workdir>/logs/<MLflow parent run>/<stage>.log`` (logged to the stage's MLflow run). ``-v``
shows all of it live as well.

On a terminal the bar redraws one line in place; otherwise (a CI log, a file) a stage prints at 25 / 50 / 75 %.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from compactlm import progress

UNITS = {"generate": "prompts", "score": "batches", "distill": "steps", "evaluate": "models"}

#: Loggers whose warnings reach the console (ours and the Prefect run loggers our tasks and flows write to).
OURS = ("compactlm", "flows", "tasks", "prefect.flow_runs", "prefect.task_runs")


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def _figures(info: dict[str, Any]) -> str:
    parts = []
    if info.get("loss") is not None:
        parts.append(f"loss {info['loss']:.3f}")
    for key in ("tok_s", "tokens_per_s", "completion_tokens_per_s"):
        if info.get(key):
            parts.append(f"{info[key]:,.0f} tok/s")
            break
    if info.get("model"):
        parts.append(str(info["model"]))
    if info.get("rows") is not None:
        parts.append(f"{info['rows']:,} rows")
    if info.get("params"):
        parts.append(f"{info['params'] / 1e6:,.1f}M parameters")
    return ", ".join(parts)


class _Warnings(logging.Handler):
    """Our warnings and errors on the console, each message once."""

    def __init__(self, console: Console):
        super().__init__(logging.WARNING)
        self.console, self.seen = console, set()

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(OURS) or (record.levelno >= logging.ERROR and record.name.startswith("prefect")):
            return  # a failed task or flow: the stage's FAILED line and the run's last line say it once
        msg = record.getMessage().splitlines()[0]
        if msg in self.seen:
            return
        self.seen.add(msg)
        self.console.line(f"{record.levelname.lower()}: {msg}")


class Console:
    """``with Console(workdir, verbose) as c: ...`` around a run (see the module docstring)."""

    def __init__(self, workdir: Path, verbose: bool = False, out: IO[str] | None = None):
        from tasks.capture import terminal

        self.verbose = verbose
        self.log = Path(workdir) / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
        self.out: IO[str] = out or terminal()
        self.tty = self.out.isatty()
        self._bar: dict[str, Any] = {}
        self._stack = ExitStack()

    def __enter__(self) -> Console:
        import tasks.common
        from tasks.capture import capture_output

        tasks.common.SHOW_STAGE_OUTPUT = self.verbose
        self._stack.enter_context(capture_output(self.log, tee=self.verbose))
        self._stack.enter_context(progress.listening(self.event))
        if not self.verbose:  # with -v Prefect's own handler shows warnings live
            handler = _Warnings(self)
            logging.getLogger().addHandler(handler)
            self._stack.callback(logging.getLogger().removeHandler, handler)
        return self

    def __exit__(self, *exc) -> None:
        self._clear_bar()
        self._stack.close()
        if not self.verbose:  # e.g. "Stopping temporary server" when the process exits
            for handler in logging.getLogger().handlers:
                if type(handler).__name__ == "PrefectConsoleHandler":
                    handler.setLevel(logging.WARNING)

    # ------------------------------------------------------------------ output
    def line(self, text: str) -> None:
        self._clear_bar()
        self.out.write(text + "\n")
        self.out.flush()

    def _clear_bar(self) -> None:
        if self.tty and self._bar.get("drawn"):
            self.out.write("\r\033[K")
            self._bar["drawn"] = False

    # ------------------------------------------------------------------ events
    def event(self, e: dict[str, Any]) -> None:
        kind, stage = e["kind"], e["stage"]
        if kind == "start":
            self._bar = {"stage": stage, "t0": time.time(), "quarter": 0, "drawn": False}
            if not e.get("cached"):
                self.line(f"{stage:<9} started   -> {e.get('output', '')}")
        elif kind == "end":
            self._end(stage, e)
        elif kind == "progress" and self._bar:
            # the running stage's engine: a chain's distill-2 and the teacher correction report as distill
            self._progress(self._bar["stage"], e)

    def _end(self, stage: str, e: dict[str, Any]) -> None:
        seconds = _fmt_s(e.get("seconds", 0.0))
        if not e.get("ok", True):
            self.line(f"{stage:<9} FAILED    after {seconds}: {e.get('error', '')}")
            self.line(f"{'':<9} log:      {e.get('log', '')}")
        elif e.get("cached"):
            self.line(f"{stage:<9} cached    {e.get('output', '')}")
        else:
            figures = _figures(e.get("summary") or {})
            self.line(f"{stage:<9} done      in {seconds}" + (f" ({figures})" if figures else ""))
        self._bar = {}

    def _progress(self, stage: str, e: dict[str, Any]) -> None:
        done, total = e["done"], e.get("total")
        figures = _figures(e)
        count = f"{done:,}/{total:,} {UNITS.get(e['stage'], '')}" if total else f"{done:,}"
        if self.tty:
            frac = done / total if total else 0.0
            bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
            eta = ""
            elapsed = time.time() - self._bar["t0"]
            if total and 0 < done < total:
                eta = f", ETA {_fmt_s(elapsed * (total - done) / done)}"
            self.out.write(f"\r\033[K{stage:<9} [{bar}] {count}" + (f", {figures}" if figures else "") + eta)
            self.out.flush()
            self._bar["drawn"] = True
        elif total:
            quarter = int(4 * done / total)
            if 0 < quarter < 4 and quarter > self._bar["quarter"]:
                self._bar["quarter"] = quarter
                self.line(f"{stage:<9} {25 * quarter:>3} %     {count}" + (f" ({figures})" if figures else ""))
