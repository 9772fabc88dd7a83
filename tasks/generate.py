"""Generation stage: vLLM runs in a child process (its engine memory is freed on exit, and a crash of the
engine cannot take the flow down); shards already written are skipped on retry."""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from pathlib import Path

from prefect import get_run_logger, task

from compactlm.artifacts import read_manifest
from compactlm.config import GenerateConfig
from compactlm.datasets import read_generated
from compactlm.tracking import Tracker
from tasks.common import RunContext, run_stage


def run_logged(cmd: list[str]) -> None:
    """Run a command, streaming its output to the Prefect log; raise with its last lines if it fails."""
    logger = get_run_logger()
    tail: deque[str] = deque(maxlen=30)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if line:
                logger.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}:\n" + "\n".join(tail))


def _log(tracker: Tracker, run_id: str, out: Path, manifest: dict) -> None:
    tracker.log_metrics(run_id, manifest["stats"])
    tracker.log_artifact(run_id, out / "manifest.json")
    rows = read_generated(out, columns=["id", "prompt", "completion", "finish_reason"])[:50]
    tracker.log_dict(run_id, {"columns": ["id", "prompt", "completion", "finish_reason"],
                              "data": [[r["id"], r["prompt"], r["completion"], r["finish_reason"]] for r in rows]},
                     "samples.json")


@task(name="generate", retries=1, retry_delay_seconds=5)
def generate(ctx: RunContext, teacher_dir: str, cfg: GenerateConfig) -> str:
    def produce(out: Path, log_step) -> dict:
        run_logged([sys.executable, "-m", "compactlm.generation", "--model", teacher_dir, "--out", str(out),
                    "--config", cfg.model_dump_json(), "--seed", str(ctx.seed)])
        return read_manifest(out)

    return run_stage(ctx, "generate", cfg, [teacher_dir], produce, _log)
