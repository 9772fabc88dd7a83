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
from typing import Any


def _load_config(raw: str) -> Any:
    from compactlm.config import EvalConfig, parse_stage_config

    return parse_stage_config(raw, EvalConfig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compactlm.evaluation", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory (or any compactlm model ref)")
    parser.add_argument("--config", default="{}", help="EvalConfig as a JSON object or a .json/.yaml path")
    parser.add_argument("--out", required=True, help="result JSON file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (HF speed benchmark, dtype choice)")
    args = parser.parse_args(argv)

    from pydantic import ValidationError

    from compactlm.artifacts import write_json_atomic
    from compactlm.evaluation.runner import evaluate_in_process
    from compactlm.models import resolve_model

    try:
        cfg = _load_config(args.config)
        result = evaluate_in_process(resolve_model(args.model), cfg, device=args.device, seed=args.seed)
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        print(f"error: invalid --config: {msg}", file=sys.stderr, flush=True)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(json.dumps({"out": str(out), "seconds": result["seconds"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
