"""One process of a ``ddp`` / ``fsdp`` distillation, as torchrun starts it (:mod:`compactlm.distillation.launch`):
distill, report rank 0's step metrics and summary on stdout, write an error file when it fails.

    python -m compactlm.distillation.rank ARGS_JSON     (under torchrun; RANK and WORLD_SIZE set)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from compactlm.config import DistillConfig
from compactlm.distillation.launch import METRICS, RESULT


def main(args_file: str) -> None:
    """One rank: distill, report rank 0's metrics and summary on stdout, write an error file on failure."""
    from compactlm.distillation.trainer import distill

    args = json.loads(Path(args_file).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    def log_fn(metrics: dict, step: int) -> None:  # called on rank 0 only
        os.write(1, (METRICS + json.dumps([metrics, step]) + "\n").encode())

    try:
        summary = distill(args["teacher"], args["student"], args["data"], DistillConfig(**args["config"]),
                          args["out"], seed=args["seed"], device=args["device"], log_fn=log_fn)
    except BaseException as e:
        kind = "value" if isinstance(e, ValueError) else "float" if isinstance(e, FloatingPointError) else "other"
        errors = Path(os.environ.get("COMPACTLM_RANK_ERRORS", "."))
        (errors / f"error-{rank}.json").write_text(json.dumps(
            {"rank": rank, "world": world, "kind": kind, "type": type(e).__name__, "message": str(e)}))
        raise
    if rank == 0:
        os.write(1, (RESULT + json.dumps(summary) + "\n").encode())


if __name__ == "__main__":
    main(sys.argv[1])
