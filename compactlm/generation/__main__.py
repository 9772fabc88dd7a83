"""CLI: ``python -m compactlm.generation --model DIR --out DIR --config JSON_OR_PATH [--seed N]``.

Runs :func:`compactlm.generation.generate_dataset` in its own process, so the engine's memory is freed when it
exits. Prints the manifest's stats as one JSON line on success; exits 2 with a one-line error on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _load_config(raw: str) -> Any:
    from compactlm.config import GenerateConfig, parse_stage_config

    return parse_stage_config(raw, GenerateConfig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compactlm.generation", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="teacher: local HF dir (or any compactlm model ref)")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--config", default="{}", help="GenerateConfig as a JSON object or a .json/.yaml path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from pydantic import ValidationError

    from compactlm.generation import generate_dataset
    from compactlm.models import resolve_model

    try:
        cfg = _load_config(args.config)
        model_dir = resolve_model(args.model)
        manifest = generate_dataset(model_dir, cfg, args.out, seed=args.seed, progress=not args.no_progress)
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        print(f"error: invalid --config: {msg}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **manifest["stats"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
