"""Start the processes of a ``ddp`` / ``fsdp`` distillation (``distill.nproc`` of them) with torchrun and wait for
them: ``python -m torch.distributed.run --standalone --nproc-per-node N -m compactlm.distillation.rank ARGS``.

The caller (the distill task, or ``distill()`` called from Python) stays one process: rank 0's step metrics come
back as ``COMPACTLM_METRICS`` lines on the ranks' stdout and go to the caller's ``log_fn`` (the stage's MLflow
child run) and progress display; its summary comes back as one ``COMPACTLM_RESULT`` line; everything else the
ranks print is passed through (the stage log). A rank that raises writes its error (type, message) to a file
before it exits; torchrun then stops the other ranks, and the caller raises that error: a ValueError (bad input,
``DistillError``) or a FloatingPointError as itself, anything else as a RuntimeError naming the rank. A rank that
dies without a word (killed, out of memory) fails the run with its exit status; nothing hangs, and a rerun
resumes from the last checkpoint. On CPU each rank gets ``cores / nproc`` threads unless OMP_NUM_THREADS is set.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compactlm.config import DistillConfig

METRICS, RESULT = "COMPACTLM_METRICS ", "COMPACTLM_RESULT "


def needs_launch(cfg: DistillConfig) -> bool:
    """Whether `cfg` asks for several processes and this is not already one of them."""
    return cfg.strategy != "single" and "RANK" not in os.environ


def run_ranks(teacher_dir: str | os.PathLike, student_dir: str | os.PathLike, data_dir: str | os.PathLike,
              cfg: DistillConfig, out_dir: str | os.PathLike, *, seed: int, device: str,
              log_fn: Callable[[dict, int], None] | None) -> dict[str, Any]:
    """Run the distillation on ``cfg.nproc`` torchrun processes; returns rank 0's summary (see the module
    docstring for what comes back and how failures surface)."""
    from compactlm import progress

    args = {"teacher": str(teacher_dir), "student": str(student_dir), "data": str(data_dir), "out": str(out_dir),
            "config": cfg.model_dump(mode="json"), "seed": seed, "device": device}
    with tempfile.TemporaryDirectory(prefix="compactlm-ranks-") as tmp:
        (Path(tmp) / "args.json").write_text(json.dumps(args))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}",
               "-m", "compactlm.distillation.rank", str(Path(tmp) / "args.json")]
        env = {**os.environ, "COMPACTLM_RANK_ERRORS": tmp}
        if not device.startswith("cuda"):
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc)))
        summary, tail = None, collections.deque(maxlen=40)  # the last lines, for a failure's message
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            for line in proc.stdout:
                if line.startswith(METRICS):
                    metrics, step = json.loads(line[len(METRICS):])
                    if log_fn is not None:
                        log_fn(metrics, step)
                    progress.report("distill", step, cfg.steps, loss=metrics.get("loss"),
                                    tok_s=metrics.get("tokens_per_s"))
                elif line.startswith(RESULT):
                    summary = json.loads(line[len(RESULT):])
                else:
                    sys.stdout.write(line)
                    tail.append(line)
            rc = proc.wait()
        if rc != 0 or summary is None:
            raise _rank_failure(Path(tmp), rc, "".join(tail))
    return summary


#: What a rank raises when another one vanished under it (a lost connection): a consequence, not the cause.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Socket Timeout", "gloo/transport",
             "NCCL communicator was aborted", "NCCL error")


def _rank_failure(errors: Path, rc: int, tail: str) -> Exception:
    """The first rank error written to `errors` as the exception to raise (errors that only say a peer vanished
    come last), else one naming the exit status."""
    from compactlm.distillation.setup import DistillError

    found = [json.loads(p.read_text()) for p in sorted(errors.glob("error-*.json"), key=lambda p: p.stat().st_mtime)]
    own = [e for e in found if not any(s in e["message"] for s in PEER_LOST)]
    if not own:
        lost = f" (the others then lost it: {found[0]['message'][:200]})" if found else ""
        return RuntimeError(f"a distillation process died without an error of its own (killed, or out of "
                            f"memory?), torchrun exit status {rc}{lost}; a rerun resumes from the last checkpoint. "
                            f"Last output:\n{tail}")
    err = own[0]
    message = f"{err['message']} (rank {err['rank']} of {err['world']})"
    if err["kind"] == "value":
        return DistillError(message)
    if err["kind"] == "float":
        return FloatingPointError(message)
    return RuntimeError(f"distillation rank {err['rank']} failed: {err['type']}: {message}")
