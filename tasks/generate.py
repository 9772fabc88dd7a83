"""Generation stage: vLLM runs in a child process (its engine memory is freed on exit, and a crash of the
engine cannot take the flow down); shards already written are skipped on retry.

Logged to the stage's child MLflow run: every manifest stat as a metric (prompts, completions, tokens, tok/s,
``dropped.<filter>``, ``self_instruct.*``), the dataset as the run's input (``mlflow.data.from_pandas``, context
"training"), a sample table ``samples.json`` (``log_table``: first SAMPLE_ROWS rows), the manifest and, with
self-instruct, the kept instructions.
"""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from pathlib import Path

from prefect import get_run_logger, task

from compactlm import progress
from compactlm.artifacts import read_manifest
from compactlm.config import GenerateConfig
from compactlm.formats.generated import read_rows
from compactlm.tracking import Tracker
from tasks.common import RunContext, log_dataset_input, retry_transient, run_stage


def run_logged(cmd: list[str]) -> None:
    """Run a command: its output goes to stdout (the stage's log file), its ``@progress`` lines to the console's
    progress bar, its own summary lines (``[generate] ...``, the final JSON, ``error: ...``) to the Prefect log
    too; raise with its last lines if it fails: a ValueError with its one ``error: ...`` line for bad input (exit 2,
    not retried), else a RuntimeError."""
    logger = get_run_logger()
    tail: deque[str] = deque(maxlen=30)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if progress.parse_line(line):
                continue
            tail.append(line)
            print(line, flush=True)
            if line.startswith(("[generate]", "{", "error: ")):
                logger.info(line)
    if proc.returncode == 2:
        error = next((ln for ln in reversed(tail) if ln.startswith("error: ")), None)
        if error is not None:
            raise ValueError(error.removeprefix("error: "))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}:\n" + "\n".join(tail))


#: Rows of the sample table logged to MLflow (the whole dataset is the run's dataset input).
SAMPLE_ROWS = 50
TABLE_COLUMNS = ["id", "prompt_id", "sample", "prompt", "completion", "finish_reason", "prompt_tokens",
                 "completion_tokens"]


def dataset_frame(out: Path):
    """The generated dataset as a pandas DataFrame of TABLE_COLUMNS (token lists replaced by their lengths)."""
    import pandas as pd

    try:
        rows = read_rows(out, [c for c in TABLE_COLUMNS if not c.endswith("_tokens")]
                              + ["prompt_token_ids", "completion_token_ids"])
    except FileNotFoundError:
        rows = []
    for r in rows:
        r["prompt_tokens"] = len(r.pop("prompt_token_ids"))
        r["completion_tokens"] = len(r.pop("completion_token_ids"))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def log_generated(tracker: Tracker, run_id: str, out: Path, manifest: dict) -> None:
    """Stats as metrics, the dataset as the run's input (``mlflow.data``), a sample table, the manifest."""
    stats = manifest["stats"]
    tracker.log_metrics(run_id, {**stats, "dropped_total": sum(stats["dropped"].values())})
    tracker.log_artifact(run_id, out / "manifest.json")
    instructions = out / "self_instruct" / "instructions.jsonl"
    if instructions.is_file():
        tracker.log_artifact(run_id, instructions, "self_instruct")
    df = dataset_frame(out)
    log_dataset_input(tracker, run_id, df, out / "data", f"generated-{out.name}")
    tracker.client.log_table(run_id, df.head(SAMPLE_ROWS), "samples.json")


@task(name="generate", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def generate(ctx: RunContext, teacher_dir: str, cfg: GenerateConfig) -> str:
    def produce(out: Path, log_step) -> dict:
        run_logged([sys.executable, "-m", "compactlm.generation", "--model", teacher_dir, "--out", str(out),
                    "--config", cfg.model_dump_json(), "--seed", str(ctx.seed), "--progress-lines"])
        return read_manifest(out)

    # A local prompts file/dir is an input too: editing it changes the key (hf: datasets are named by id).
    local = cfg.prompts != "builtin" and not cfg.prompts.startswith("hf:")
    upstream = [teacher_dir] + ([str(Path(cfg.prompts).expanduser())] if local else [])
    return run_stage(ctx, "generate", cfg, upstream, produce, log_generated)
