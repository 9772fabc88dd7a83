"""`compactlm` command line: validate and run recipes without touching Prefect directly.

    compactlm run configs/smollm2-demo.yaml [--set distill.steps=50 ...]
    compactlm validate configs/smollm2-demo.yaml [--set ...]
    compactlm schema

The recipe is validated before Prefect, torch or any model is imported, so a bad recipe fails in well under
a second with one message naming the field.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from compactlm.config import Recipe
from compactlm.models import ModelRefError
from compactlm.preflight import preflight
from compactlm.recipe import RecipeError, load_recipe

# Embedded defaults for one machine: no analytics calls (often no network), and a patient start for the
# Prefect server that runs in-process when PREFECT_API_URL is unset.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compactlm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "validate a recipe, then run the compress flow"),
                        ("validate", "validate a recipe and print it with defaults filled in")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("recipe", help="path to a YAML recipe (see configs/)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set distill.steps=50 (repeatable)")
        if name == "run":
            sp.add_argument("-v", "--verbose", action="store_true",
                            help="also show every stage's output live (vLLM, lm-eval, Prefect); it is always in "
                                 "<workdir>/logs")
    sub.add_parser("schema", help="print the recipe's JSON schema (the Prefect UI form)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "schema":
        print(json.dumps(Recipe.model_json_schema(), indent=2))
        return 0
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        local = Path(recipe.teacher).expanduser()
        preflight(recipe, local if (local / "config.json").is_file() else None)
    except (RecipeError, ModelRefError, ValueError) as e:
        print(f"compactlm: {e}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(json.dumps(recipe.model_dump(mode="json"), indent=2))
        return 0

    return _run(recipe, args)


def _run(recipe: Recipe, args: argparse.Namespace) -> int:
    from flows.console import Console
    from flows.guard import RunGuard

    workdir = Path(recipe.workdir).expanduser().resolve()
    hint = (f"Finished stage outputs are kept in {workdir}; rerun the same command to resume: "
            f"compactlm run {shlex.join([args.recipe, *(a for o in args.overrides for a in ('--set', o))])}")
    console = Console(workdir, verbose=args.verbose)
    console.line(f"compactlm: {recipe.name}: {recipe.teacher} -> "
                 f"{'pruned student' if recipe.pruned_student else recipe.student}; log {console.log}")
    try:
        with console, RunGuard(hint, stream=console.out) as guard:
            from flows.compress import compress

            result = compress(recipe)
    except KeyboardInterrupt:
        print(guard.message(), file=sys.__stderr__, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - the stage's line and its log already say where; end with one line
        print(f"compactlm: the run failed: {type(e).__name__}: {e}\nFull log: {console.log}", file=sys.stderr)
        return 1
    print("\n" + result["table"])
    print(f"Student model: {result['student']}")
    print(f"MLflow run {result['mlflow_run_id']} in experiment {result['experiment']!r}; open the UI with:")
    print(f"  mlflow ui --backend-store-uri {shlex.quote(result['tracking_uri'])}"
          if not result["tracking_uri"].startswith("http") else f"  {result['mlflow']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
