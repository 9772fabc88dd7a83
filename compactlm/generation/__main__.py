"""CLI: ``python -m compactlm.generation --model DIR --out DIR --config JSON_OR_PATH [--seed N]``.

Runs :func:`compactlm.generation.generate_dataset` in its own process, so the engine's memory is freed when it
exits. Prints the manifest's stats as one JSON line on success; exits 2 with a one-line error on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compactlm.generation", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="teacher: local HF dir (or any compactlm model ref)")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--config", default="{}", help="GenerateConfig as a JSON object or a .json/.yaml path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--progress-lines", action="store_true",
                        help="also print one '@progress {json}' line per shard (for a parent process to show)")
    args = parser.parse_args(argv)

    from compactlm.config import GenerateConfig
    from compactlm.generation import generate_dataset
    from compactlm.models import resolve_model
    from compactlm.stage_cli import exit_code, parse_stage_config

    def run() -> None:
        from compactlm import progress

        if args.progress_lines:
            progress.listening(progress.emit_line).__enter__()  # for the life of this process
        cfg = parse_stage_config(args.config, GenerateConfig)
        manifest = generate_dataset(resolve_model(args.model), cfg, args.out, seed=args.seed,
                                    progress=not args.no_progress)
        print(json.dumps({"out": str(args.out), **manifest["stats"]}), flush=True)

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
