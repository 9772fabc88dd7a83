"""`compactlm` command line: validate and run recipes without touching Prefect directly.

    compactlm run configs/smollm2-demo.yaml [--set distill.steps=50 ...]
    compactlm validate configs/smollm2-demo.yaml [--set ...]
    compactlm plan configs/smollm2-demo.yaml [--gpus 8 --gpu-mem 80 --cpu-mem 1024] [--teacher-config FILE]
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
from compactlm.models import ModelRefError, local_config
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
    parsers = {}
    for name, help_ in (("run", "validate a recipe, then run the compress flow"),
                        ("validate", "validate a recipe and print it with defaults filled in"),
                        ("plan", "per stage, the memory it needs and the strategy it uses (from config.json only); "
                                 "exits 3 when a stage does not fit")):
        sp = parsers[name] = sub.add_parser(name, help=help_)
        sp.add_argument("recipe", help="path to a YAML recipe (see configs/)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set distill.steps=50 (repeatable)")
    parsers["run"].add_argument("-v", "--verbose", action="store_true",
                                help="also show every stage's output live (vLLM, lm-eval, Prefect); it is always "
                                     "in <workdir>/logs")
    sp = parsers["plan"]
    sp.add_argument("--gpus", type=int, help="GPUs to plan for (default: what nvidia-smi lists)")
    sp.add_argument("--gpu-mem", type=float, metavar="GiB", help="memory of each GPU (default: nvidia-smi's)")
    sp.add_argument("--cpu-mem", type=float, metavar="GiB", help="host memory (default: this machine's)")
    sp.add_argument("--cpus", type=int, help="host CPUs (default: this machine's; sets how many budget candidates "
                    "are measured at once)")
    sp.add_argument("--teacher-config", metavar="PATH", help="the teacher's config.json (or folder), to plan "
                    "before downloading it; default: the recipe's teacher when it is a local folder")
    sp.add_argument("--student-config", metavar="PATH", help="a student of your own's config.json (or folder)")
    sp.add_argument("--json", action="store_true", help="print the plan as JSON")
    sub.add_parser("schema", help="print the recipe's JSON schema (the Prefect UI form)")
    return p


def _plan(args: argparse.Namespace) -> int:
    """`compactlm plan`: the table (or JSON); 3 when a stage does not fit, 2 on bad input."""
    from compactlm.plan import Machine, check_fits, plan_run

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        teacher = args.teacher_config or local_config(recipe.teacher)
        if teacher is None:
            raise ValueError(f"teacher {recipe.teacher!r} has no local config.json yet: pass --teacher-config "
                             "PATH (its config.json), or run once to fetch or convert it")
        student = args.student_config or (None if recipe.pruned_student else local_config(recipe.student))
        machine = Machine.detect(0 if recipe.device == "cpu" and args.gpus is None else args.gpus, args.gpu_mem,
                                 args.cpu_mem, args.cpus)
        plan = plan_run(recipe, teacher, machine, student)
    except (RecipeError, ValueError) as e:
        print(f"compactlm: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    try:
        check_fits(plan)
    except ValueError as e:
        print(f"compactlm: {e}", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "schema":
        print(json.dumps(Recipe.model_json_schema(), indent=2))
        return 0
    if args.command == "plan":
        return _plan(args)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        local = local_config(recipe.teacher)
        preflight(recipe, local.parent if local else None)
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
