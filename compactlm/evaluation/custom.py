"""Evaluation tasks of your own, by configuration alone, and whether a standard lm-eval task can run offline.

* ``eval.include_path``: a folder of lm-eval task YAMLs (lm-eval's own format, searched recursively). A task
  named in ``eval.tasks`` is read from its YAML (``include:`` chains, ``!function`` helpers beside it) and handed to
  lm-eval as a config dict, with relative ``data_files`` taken from the YAML's folder (lm-eval alone would take
  them from the current directory, which differs between a shell and a Prefect worker) and ``${data_dir}`` /
  ``${tasks}`` / ``${heldout}`` replaced as in the shipped tasks.
* ``eval.jsonl_tasks``: a multiple-choice ``.jsonl`` file and the names of its question / choices / answer fields;
  prompted like the shipped tasks (``Question: ...\\nAnswer:``, each choice a continuation), acc and acc_norm.
* A standard lm-eval task reads a hub dataset; compactlm runs offline, so it is accepted only when that dataset is
  in the local Hugging Face cache (:func:`standard_task_problem`).

Checks here read YAML and JSON only (no lm-eval, no ``datasets``), and every error names the field to fix.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactlm.evaluation.taskfiles import (
    FILE_BUILDERS,
    data_files,
    map_data_files,
    merged_yaml,
    safe_yaml,
    substitute,
)

if TYPE_CHECKING:
    from compactlm.config import JsonlTask

_METRICS = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]


# ---------------------------------------------------------------------------------------------- jsonl tasks
def answer_index(answer: Any, choices: list[str]) -> int:
    """The correct choice's index: `answer` is that index (an int, or digits when no choice reads so) or its text."""
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    raise ValueError(f"answer {answer!r} is neither an index into the {len(choices)} choices nor one of them")


def _check_row(row: Any, task: JsonlTask, where: str, line: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}.path: {line} is not a JSON object")
    for attr, what in (("question", "question text"), ("choices", "list of choices"), ("answer", "answer")):
        if getattr(task, attr) not in row:
            raise ValueError(f"{where}.{attr}: field {getattr(task, attr)!r} is not in {line} (its fields: "
                             f"{', '.join(row)}); set {where}.{attr} to the field that holds the {what}")
    if not isinstance(row[task.question], str):
        raise ValueError(f"{where}.question: field {task.question!r} in {line} is not text")
    choices = row[task.choices]
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
        raise ValueError(f"{where}.choices: field {task.choices!r} in {line} is not a list of at least two strings")
    try:
        answer_index(row[task.answer], choices)
    except ValueError as e:
        raise ValueError(f"{where}.answer: field {task.answer!r} in {line}: {e}") from None


def check_jsonl(task: JsonlTask, index: int) -> int:
    """Every line of `task`'s file is a question with the mapped fields; return the number of questions."""
    where, path = f"eval.jsonl_tasks.{index}", Path(task.path).expanduser()
    if not path.is_file():
        raise ValueError(f"{where}.path: file not found: {task.path!r} (give an existing .jsonl file)")
    rows, answer_types = 0, set()
    with path.open(encoding="utf-8") as fh:
        for n, text in enumerate(fh, 1):
            if not text.strip():
                continue
            line = f"{path.name} line {n}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}.path: {line} is not JSON ({e.msg})") from None
            _check_row(row, task, where, line)
            answer_types.add(type(row[task.answer]).__name__)
            rows += 1
    if rows == 0:
        raise ValueError(f"{where}.path: {path} holds no questions (one JSON object per line)")
    if len(answer_types) > 1:  # datasets cannot load a column that mixes numbers and text
        raise ValueError(f"{where}.answer: field {task.answer!r} mixes {' and '.join(sorted(answer_types))} "
                         "values; use indices on every line or choice texts on every line")
    return rows


def _doc_text(doc: dict, *, field: str) -> str:
    return f"Question: {doc[field]}\nAnswer:"


def _doc_choices(doc: dict, *, field: str) -> list[str]:
    return list(doc[field])


def _doc_target(doc: dict, *, choices: str, answer: str) -> int:
    return answer_index(doc[answer], list(doc[choices]))


def jsonl_spec(task: JsonlTask) -> dict[str, Any]:
    """The lm-eval task config of a jsonl task (absolute data path; field names used as given)."""
    return {
        "task": task.name, "dataset_path": "json", "output_type": "multiple_choice", "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(Path(task.path).expanduser().resolve())}},
        "doc_to_text": functools.partial(_doc_text, field=task.question),
        "doc_to_choice": functools.partial(_doc_choices, field=task.choices),
        "doc_to_target": functools.partial(_doc_target, choices=task.choices, answer=task.answer),
        "metric_list": [dict(m) for m in _METRICS], "metadata": {"version": 1.0},
    }


# ---------------------------------------------------------------------------------------------- include_path
def include_index(folder: str) -> dict[str, tuple[str, Path]]:
    """{name: (kind, yaml file)} of the tasks, groups and tags that the YAMLs under `folder` define."""
    out: dict[str, tuple[str, Path]] = {}
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"eval.include_path: folder not found: {folder!r}")
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()):
        try:
            spec = safe_yaml(path)
        except Exception as e:  # yaml.YAMLError and undecodable files alike
            raise ValueError(f"eval.include_path: {path} is not valid YAML ({e})") from None
        if not isinstance(spec, dict):
            continue
        if isinstance(spec.get("group"), str):
            out.setdefault(spec["group"], ("group", path))
        elif isinstance(spec.get("task"), str):
            out.setdefault(spec["task"], ("task", path))
        tags = spec.get("tag")
        for tag in [tags] if isinstance(tags, str) else tags if isinstance(tags, list) else []:
            out.setdefault(str(tag), ("tag", path))
    return out


def include_spec(name: str, entry: tuple[str, Path], roots: dict[str, Path], *, load=merged_yaml) -> dict[str, Any]:
    """Task `name` of eval.include_path as an lm-eval config dict with absolute data paths, its files checked.
    `load` reads the YAML: :func:`merged_yaml` to check, lm-eval's loader (functions resolved) to run."""
    kind, path = entry
    if kind != "task":
        raise ValueError(f"eval.tasks: {name!r} is a {kind} in eval.include_path ({path}); compactlm runs tasks: "
                         f"list the tasks it holds instead")
    used: set[str] = set()
    spec = substitute(load(path), roots, used)
    folder = path.parent

    def absolute(f: str) -> str:
        return f if "://" in f or Path(f).expanduser().is_absolute() else str((folder / f).resolve())

    spec["dataset_kwargs"] = map_data_files(dict(spec.get("dataset_kwargs") or {}), absolute)
    local = spec.get("dataset_path")
    if isinstance(local, str) and local not in FILE_BUILDERS and (folder / local).exists():
        spec["dataset_path"] = str((folder / local).resolve())
    for f in data_files(spec["dataset_kwargs"]):
        if "://" not in f and not Path(f).is_file():
            raise ValueError(f"eval.include_path: task {name!r} ({path.name}) reads data file {f}, which does not "
                             "exist (relative data_files are taken from the YAML's folder; ${data_dir} is "
                             "eval.data_dir)")
    problem = hub_dataset_problem(spec)
    if problem:
        raise ValueError(f"eval.include_path: task {name!r} ({path.name}): {problem}; point dataset_path: json and "
                         "data_files at a local copy")
    return spec


# ---------------------------------------------------------------------------------------------- hub datasets
def _offline() -> bool:
    """Whether evaluation runs offline: compactlm sets both variables to 1 unless they are set (offline_env)."""
    return any(os.environ.get(v, "1").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hf_caches() -> list[Path]:
    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub"
    return [Path(hub).expanduser(), Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets").expanduser()]


def hub_dataset_problem(spec: dict[str, Any]) -> str | None:
    """Why `spec`'s dataset cannot load here, or None: a hub dataset while offline and absent from both HF caches
    (the hub's snapshot cache ``datasets--owner--name``, the datasets cache ``owner___name``)."""
    path = spec.get("dataset_path")
    if not isinstance(path, str) or path in FILE_BUILDERS or Path(path).expanduser().exists() or not _offline():
        return None
    hub, datasets_cache = _hf_caches()
    snapshot = hub / ("datasets--" + path.replace("/", "--"))
    if snapshot.is_dir() or (datasets_cache / path.replace("/", "___")).is_dir():
        return None
    return (f"its data ({path}) comes from the Hugging Face hub, which compactlm does not reach (offline), and is not "
            f"in the local cache ({hub.parent})")


def standard_task_problem(manager, name: str, depth: int = 0) -> str | None:
    """Why lm-eval's standard task / group / tag `name` cannot run offline (its first task that cannot), or None."""
    entry = manager.task_index.get(name)
    if entry is None or depth > 8:
        return None
    kind = getattr(entry.kind, "name", str(entry.kind)).lower()
    if kind == "group":
        children = (entry.cfg or {}).get("task") or []
    elif kind == "tag":
        children = sorted(entry.tags)
    else:
        problem = hub_dataset_problem(entry.cfg or {})
        return f"task {name!r}: {problem}" if problem else None
    for child in children if isinstance(children, list) else [children]:
        if isinstance(child, dict):
            problem = hub_dataset_problem(child) or standard_task_problem(manager, str(child.get("task")), depth + 1)
        else:
            problem = standard_task_problem(manager, str(child), depth + 1)
        if problem:
            return problem
    return None


__all__ = ["answer_index", "check_jsonl", "hub_dataset_problem", "include_index", "include_spec", "jsonl_spec",
           "standard_task_problem"]
