"""The data stage: the distillation's training mixture (compactlm.mixture), keyed by its sources and the tokens
wanted. Logged to its child MLflow run: each source's requested and realised tokens and share as metrics, and
each source as its own dataset input (context "training"), plus the manifest."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from compactlm.config import DataConfig
from compactlm.tracking import Tracker
from tasks.common import RunContext, log_dataset_input, retry_transient, run_stage

SAMPLE_COLUMNS = ["id", "source", "prompt", "completion"]


def _log(tracker: Tracker, run_id: str, out: Path, manifest: dict) -> None:
    import pandas as pd

    from compactlm.formats.generated import read_rows

    tracker.log_metrics(run_id, {"tokens": manifest["tokens"], "tokens_requested": manifest["tokens_requested"]})
    for s in manifest["sources"]:
        key = f"source.{s['index']}.{s['kind']}"
        tracker.log_metrics(run_id, {f"{key}.tokens": s["tokens"], f"{key}.share": s["share"],
                                     f"{key}.share_requested": s["share_requested"], f"{key}.epochs": s["epochs"]})
    tracker.log_artifact(run_id, out / "manifest.json")
    frame = pd.DataFrame(read_rows(out, SAMPLE_COLUMNS), columns=SAMPLE_COLUMNS)
    for s in manifest["sources"]:
        name = f"data-{out.name}-{s['index']}-{s['kind']}"
        log_dataset_input(tracker, run_id, frame[frame["source"] == s["label"]], out / "data", name)


@task(name="data", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def mix(ctx: RunContext, teacher_dir: str, generated_dir: str | None, cfg: DataConfig, tokens: int) -> str:
    """Mix `cfg`'s sources into `tokens` tokens (the teacher's tokenizer) and return the dataset's directory."""
    from compactlm.mixture import build_mixture

    def produce(out: Path, log_step) -> dict:
        return build_mixture(cfg, teacher_dir, out, tokens=tokens, generated_dir=generated_dir, seed=ctx.seed)

    files = [str(Path(s.path).expanduser()) for s in cfg.sources if s.path and not s.path.startswith("hf:")]
    upstream = [teacher_dir] + ([generated_dir] if generated_dir else []) + files
    return run_stage(ctx, "data", cfg, upstream, produce, _log, extra_key={"tokens": tokens})
