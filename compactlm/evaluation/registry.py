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

from compactlm.evaluation.taskfiles import data_files, safe_yaml, substitute

if TYPE_CHECKING:
    from compactlm.config import EvalConfig

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_HELDOUT = REPO_ROOT / "compactlm" / "data" / "heldout.txt"
PERPLEXITY_TASK = "compactlm_heldout"


def local_task_names() -> list[str]:
    """Names of the shipped benchmark tasks (the perplexity task is not listed: it is `perplexity: true`)."""
    return sorted(p.stem for p in TASKS_DIR.glob("compactlm_*.yaml") if p.stem != PERPLEXITY_TASK)


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


def _check_files(name: str, spec: dict[str, Any], used: set[str], cfg: EvalConfig) -> None:
    for f in data_files(spec.get("dataset_kwargs") or {}):
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
    spec = substitute(safe_yaml(TASKS_DIR / f"{name}.yaml"), _roots(cfg), used)
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


def _user_tasks(cfg: EvalConfig, local: list[str]) -> tuple[dict[str, Any], dict[str, tuple[str, Path]]]:
    """({name: (index, JsonlTask)}, {name: (kind, yaml)}) of the user's tasks; a listed name that clashes fails."""
    from compactlm.evaluation.custom import include_index

    jsonl = {t.name: (i, t) for i, t in enumerate(cfg.jsonl_tasks)}
    include = include_index(cfg.include_path) if cfg.include_path else {}
    for name in cfg.tasks:
        if name in jsonl and (name in local or name in include):
            where = "a shipped task" if name in local else f"a task in eval.include_path ({include[name][1].name})"
            raise ValueError(f"eval.jsonl_tasks.{jsonl[name][0]}.name: {name!r} is also {where}; rename it")
        if name in include and name in local:
            raise ValueError(f"eval.include_path: {include[name][1]} defines {name!r}, the name of a shipped "
                             "task; rename it in the YAML")
    return jsonl, include


def _check_standard(name: str, local: list[str]) -> None:
    """A name that is neither shipped nor the user's: lm-eval's standard task set, with its data in the HF cache."""
    from compactlm.evaluation.custom import standard_task_problem

    if (name.startswith("compactlm_") or not re.fullmatch(r"[A-Za-z0-9_.\-*]+", name)
            or name not in standard_task_manager().all_tasks):
        raise ValueError(
            f"eval.tasks: unknown task {name!r}. Shipped local tasks (offline): {', '.join(local)}. Your own tasks: "
            "name them in eval.jsonl_tasks or in task YAMLs under eval.include_path. Any other name must be in "
            "lm-eval's standard task set (e.g. arc_easy), with its dataset in the local HF cache"
        )
    problem = standard_task_problem(standard_task_manager(), name)
    if problem:
        copy = f"compactlm_{name}"
        hint = f"use the shipped offline copy {copy!r} (with eval.data_dir), " if copy in local else "use "
        raise ValueError(f"eval.tasks: {name!r} is a standard lm-eval task and its {problem}: {hint}a local copy "
                         "(eval.jsonl_tasks or eval.include_path), or allow downloads with HF_HUB_OFFLINE=0 "
                         "HF_DATASETS_OFFLINE=0")


def check_tasks(cfg: EvalConfig) -> list[str]:
    """Validate `cfg` without loading a model; return the task names.

    Raises ValueError naming the field for: an empty task list, duplicates, `limit` < 1, an unknown name, a
    shipped task whose data files are missing (naming `eval.data_dir`), a jsonl task whose file lacks a mapped
    field or holds a bad row, an include-path task whose data files are missing, a standard task whose hub
    dataset is not in the local cache (compactlm runs offline), a missing perplexity text. Shipped and user tasks
    are checked by reading YAML / JSON only (milliseconds for the shipped ones); only a name that is none of
    them makes it index lm-eval's standard task set (~15 s, once per process).
    """
    from compactlm.evaluation.custom import check_jsonl, include_spec

    local = local_task_names()
    if not cfg.tasks:
        raise ValueError("eval.tasks: give at least one task, e.g. " + ", ".join(local))
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"eval.limit must be >= 1 (examples per task) or None for all, got {cfg.limit}")
    jsonl, include = _user_tasks(cfg, local)
    seen: set[str] = set()
    for name in cfg.tasks:
        if name in seen:
            raise ValueError(f"eval.tasks: {name!r} is listed twice")
        seen.add(name)
        if name in local:
            _local_spec(name, cfg)
        elif name in jsonl:
            check_jsonl(jsonl[name][1], jsonl[name][0])
        elif name in include:
            include_spec(name, include[name], _roots(cfg))
        elif name == PERPLEXITY_TASK:
            raise ValueError(f"eval.tasks: {PERPLEXITY_TASK!r} is the perplexity task; set eval.perplexity: true "
                             "instead of listing it")
        else:
            _check_standard(name, local)
    if cfg.perplexity:
        _local_spec(PERPLEXITY_TASK, cfg)
    return list(cfg.tasks)


def build_task_configs(cfg: EvalConfig, names: list[str]) -> list[str | dict[str, Any]]:
    """lm-eval task specs for `names`: a config dict (functions resolved, absolute paths) for each shipped, jsonl
    and include-path task, the plain name for any other (looked up in lm-eval's standard task set)."""
    offline_env()
    from lm_eval.tasks._yaml_loader import load_yaml

    from compactlm.evaluation.custom import include_spec, jsonl_spec

    out: list[str | dict[str, Any]] = []
    roots = _roots(cfg)
    jsonl = {t.name: t for t in cfg.jsonl_tasks}
    include = _user_tasks(cfg, local_task_names())[1] if cfg.include_path else {}
    for name in names:
        path = TASKS_DIR / f"{name}.yaml"
        if path.is_file():
            used: set[str] = set()
            spec = substitute(load_yaml(path, resolve_func=True, recursive=True), roots, used)
            _check_files(name, spec, used, cfg)
            out.append(spec)
        elif name in jsonl:
            out.append(jsonl_spec(jsonl[name]))
        elif name in include:
            out.append(include_spec(name, include[name], roots,
                                    load=lambda p: load_yaml(p, resolve_func=True, recursive=True)))
        else:
            out.append(name)
    return out


def task_inputs(cfg: EvalConfig) -> list[str]:
    """The user's files that `cfg`'s listed tasks read (jsonl files; include-path YAMLs and their data files), for
    keying cached results: editing one of them re-evaluates."""
    from compactlm.evaluation.custom import include_spec

    files = [str(Path(t.path).expanduser().resolve()) for t in cfg.jsonl_tasks if t.name in cfg.tasks]
    if cfg.include_path:
        include = _user_tasks(cfg, local_task_names())[1]
        for name in cfg.tasks:
            if name in include and name not in local_task_names():
                spec = include_spec(name, include[name], _roots(cfg))
                files += [str(include[name][1])] + [f for f in data_files(spec["dataset_kwargs"]) if "://" not in f]
    return sorted(set(files))
