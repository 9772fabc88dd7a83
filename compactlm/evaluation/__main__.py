"""CLI: ``python -m compactlm.evaluation --model DIR --config JSON_OR_PATH --out FILE [--seed N] [--device D]``.

Runs :func:`compactlm.evaluation.runner.evaluate_in_process` in its own process (how ``backend: vllm`` is
evaluated: vLLM spawns workers and frees its memory only when its process ends) and writes the result dict
as JSON to ``--out`` (temp file + rename, so a crash never leaves a partial file). Prints
``{"out": FILE, "seconds": ...}`` as one JSON line on success; exits 2 with one ``error: ...`` line on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compactlm.evaluation", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory (or any compactlm model ref)")
    parser.add_argument("--config", default="{}", help="EvalConfig as a JSON object or a .json/.yaml path")
    parser.add_argument("--out", required=True, help="result JSON file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (HF speed benchmark, dtype choice)")
    args = parser.parse_args(argv)

    from compactlm.artifacts import write_json_atomic
    from compactlm.config import EvalConfig
    from compactlm.evaluation.runner import evaluate_in_process
    from compactlm.models import resolve_model
    from compactlm.stage_cli import exit_code, parse_stage_config

    def run() -> None:
        cfg = parse_stage_config(args.config, EvalConfig)
        result = evaluate_in_process(resolve_model(args.model), cfg, device=args.device, seed=args.seed)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result)
        print(json.dumps({"out": str(out), "seconds": result["seconds"]}), flush=True)

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
