"""Shipped local lm-eval tasks and cheap validation of an :class:`EvalConfig`'s task list.

Every shipped task is one YAML file in ``compactlm/evaluation/tasks/`` written in lm-eval's own task
format. Data file paths in them use placeholders that are replaced by absolute paths at run time
(lm-eval resolves relative ``data_files`` against the CWD, not against the YAML):

* ``${tasks}``    -> the ``tasks/`` folder itself (``compactlm_facts``),
* ``${data_dir}`` -> :attr:`EvalConfig.data_dir` (real benchmark copies: ``compactlm_arc_easy`` ...),
* ``${heldout}``  -> the perplexity text (:attr:`EvalConfig.perplexity_text`).

Nothing here imports lm-eval, torch or ``datasets``: :func:`check_tasks` takes milliseconds and the YAML
is only parsed (``!function`` tags are kept as strings); :func:`build_task_configs` resolves them.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from compactlm.config import EvalConfig

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_HELDOUT = REPO_ROOT / "compactlm" / "data" / "heldout.txt"
PERPLEXITY_TASK = "compactlm_heldout"

_PLACEHOLDER = re.compile(r"\$\{(tasks|data_dir|heldout)\}")


def local_task_names() -> list[str]:
    """Names of the shipped benchmark tasks (the perplexity task is not listed: it is `perplexity: true`)."""
    return sorted(p.stem for p in TASKS_DIR.glob("compactlm_*.yaml") if p.stem != PERPLEXITY_TASK)


def _safe_yaml(path: Path) -> dict[str, Any]:
    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass


#: Stands in for eval.data_dir when it is unset; tasks that need it then fail the file check with a clear message.
_NO_DATA_DIR = Path("/nonexistent/eval.data_dir-is-not-set")


def _roots(cfg: EvalConfig) -> dict[str, Path]:
    return {"tasks": TASKS_DIR, "data_dir": resolve_data_dir(cfg.data_dir), "heldout": heldout_path(cfg)}


def resolve_data_dir(data_dir: str | None) -> Path:
    """`data_dir` as an absolute path (a relative one is taken relative to the current directory)."""
    if data_dir is None:
        return _NO_DATA_DIR
    return Path(data_dir).expanduser().resolve()


def heldout_path(cfg: EvalConfig) -> Path:
    return BUILTIN_HELDOUT if cfg.perplexity_text == "builtin" else Path(cfg.perplexity_text).expanduser().resolve()


def _substitute(obj: Any, roots: dict[str, Path], used: set[str]) -> Any:
    if isinstance(obj, str):
        def repl(m: re.Match) -> str:
            used.add(m.group(1))
            return str(roots[m.group(1)])

        return _PLACEHOLDER.sub(repl, obj)
    if isinstance(obj, dict):
        return {k: _substitute(v, roots, used) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, roots, used) for v in obj]
    return obj


def _data_files(kwargs: dict[str, Any]) -> list[str]:
    files: list[str] = []
    for key, value in kwargs.items():
        if key == "data_files":
            files += list(value.values()) if isinstance(value, dict) else [value] if isinstance(value, str) else value
        elif key.endswith("_file") and isinstance(value, str):
            files.append(value)
    return files


def _check_files(name: str, spec: dict[str, Any], used: set[str], cfg: EvalConfig) -> None:
    for f in _data_files(spec.get("dataset_kwargs") or {}):
        if Path(f).is_file():
            continue
        if "data_dir" in used:
            if cfg.data_dir is None:
                raise ValueError(
                    f"eval.data_dir: task {name!r} reads a local copy of its benchmark data, and eval.data_dir is not "
                    f"set. Set it to the folder holding one sub-folder per benchmark ({Path(f).parent.name}/...), "
                    f"or drop {name!r} from eval.tasks")
            d = resolve_data_dir(cfg.data_dir)
            where = "does not exist" if not d.is_dir() else "lacks this file"
            raise ValueError(
                f"eval.data_dir: task {name!r} needs {f}, but the data directory {d} {where}. Set eval.data_dir "
                f"to the folder holding the benchmark copies or drop {name!r} from eval.tasks"
            )
        if "heldout" in used:
            raise ValueError(f"eval.perplexity_text: file not found: {f} (give an existing .txt file or 'builtin')")
        raise ValueError(f"task {name!r}: data file {f} is missing from the compactlm install")


def _local_spec(name: str, cfg: EvalConfig) -> dict[str, Any]:
    """Parsed YAML of a shipped task with placeholders resolved and its data files checked."""
    used: set[str] = set()
    spec = _substitute(_safe_yaml(TASKS_DIR / f"{name}.yaml"), _roots(cfg), used)
    _check_files(name, spec, used, cfg)
    return spec


def offline_env() -> None:
    """No hub lookups: must run before `datasets` is first imported (it reads these at import time)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


@functools.lru_cache(maxsize=1)
def standard_task_manager():
    """lm-eval's TaskManager over its built-in task folders (indexing takes ~15 s; built once per process)."""
    offline_env()
    from lm_eval.tasks import TaskManager

    return TaskManager()


def check_tasks(cfg: EvalConfig) -> list[str]:
    """Validate `cfg` without loading a model or indexing lm-eval's built-in tasks; return the task names.

    Raises ValueError for: an empty task list, duplicates, `limit` < 1, a name that is neither a shipped
    local task nor a plausible lm-eval task name, a shipped task whose data files are missing (naming
    `eval.data_dir`), or a missing perplexity text. Shipped names are checked in milliseconds without
    importing lm-eval; only a name that is not shipped makes it index lm-eval's standard task set
    (~15 s, once per process). Such standard tasks download their data from the HF hub when run.
    """
    local = local_task_names()
    if not cfg.tasks:
        raise ValueError("eval.tasks: give at least one task, e.g. " + ", ".join(local))
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"eval.limit must be >= 1 (examples per task) or None for all, got {cfg.limit}")
    seen: set[str] = set()
    for name in cfg.tasks:
        if name in seen:
            raise ValueError(f"eval.tasks: {name!r} is listed twice")
        seen.add(name)
        if name in local:
            _local_spec(name, cfg)
        elif name == PERPLEXITY_TASK:
            raise ValueError(f"eval.tasks: {PERPLEXITY_TASK!r} is the perplexity task; set eval.perplexity: true "
                             "instead of listing it")
        elif (name.startswith("compactlm_") or not re.fullmatch(r"[A-Za-z0-9_.\-*]+", name)
              or name not in standard_task_manager().all_tasks):
            raise ValueError(
                f"eval.tasks: unknown task {name!r}. Shipped local tasks (offline): {', '.join(local)}. Any other "
                "name must be in lm-eval's standard task set (e.g. arc_easy, hellaswag), whose datasets come from "
                "the HF hub (online only)"
            )
    if cfg.perplexity:
        _local_spec(PERPLEXITY_TASK, cfg)
    return list(cfg.tasks)


def build_task_configs(cfg: EvalConfig, names: list[str]) -> list[str | dict[str, Any]]:
    """lm-eval task specs for `names`: a config dict (functions resolved, absolute paths) for each shipped
    task, the plain name for any other (looked up in lm-eval's standard task set)."""
    offline_env()
    from lm_eval.tasks._yaml_loader import load_yaml

    out: list[str | dict[str, Any]] = []
    roots = _roots(cfg)
    for name in names:
        path = TASKS_DIR / f"{name}.yaml"
        if not path.is_file():
            out.append(name)
            continue
        used: set[str] = set()
        spec = _substitute(load_yaml(path, resolve_func=True, recursive=True), roots, used)
        _check_files(name, spec, used, cfg)
        out.append(spec)
    return out
