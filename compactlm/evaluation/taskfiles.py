"""Reading lm-eval task YAMLs without lm-eval: safe parsing, ``include:`` merging, path placeholders, data files.

Shared by the shipped tasks (:mod:`compactlm.evaluation.registry`) and the user's own
(:mod:`compactlm.evaluation.custom`); imports nothing heavier than PyYAML.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

#: ``${tasks}``, ``${data_dir}``, ``${heldout}`` in a task YAML -> absolute paths at run time.
PLACEHOLDER = re.compile(r"\$\{(tasks|data_dir|heldout)\}")

#: ``datasets`` builders that read local files (``dataset_path: json`` + ``data_files``), not a hub dataset.
FILE_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})


def safe_yaml(path: Path) -> Any:
    """Parse a task YAML with PyYAML's safe loader; ``!function`` tags are kept as strings."""

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass


def merged_yaml(path: Path, depth: int = 0) -> dict[str, Any]:
    """A task YAML with its ``include:`` chain merged in (the including file wins), as lm-eval merges it."""
    spec = safe_yaml(path)
    if not isinstance(spec, dict):
        raise ValueError(f"{path} is not a mapping of task fields")
    base = spec.pop("include", None)
    if isinstance(base, str) and depth < 10:
        inc = Path(base) if Path(base).is_absolute() else path.parent / base
        if not inc.is_file():
            raise ValueError(f"{path} includes {base}, which is not at {inc}")
        spec = {**merged_yaml(inc, depth + 1), **spec}
    return spec


def substitute(obj: Any, roots: dict[str, Path], used: set[str]) -> Any:
    """`obj` with every placeholder replaced by its root; the names replaced are added to `used`."""
    if isinstance(obj, str):
        def repl(m: re.Match) -> str:
            used.add(m.group(1))
            return str(roots[m.group(1)])

        return PLACEHOLDER.sub(repl, obj)
    if isinstance(obj, dict):
        return {k: substitute(v, roots, used) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, roots, used) for v in obj]
    return obj


def data_files(kwargs: dict[str, Any]) -> list[str]:
    """The file paths in a task's ``dataset_kwargs`` (``data_files`` as str / list / dict, ``*_file`` keys)."""
    files: list[str] = []
    for key, value in kwargs.items():
        if key == "data_files":
            values = value.values() if isinstance(value, dict) else [value] if isinstance(value, str) else value
            for v in values:
                files += [v] if isinstance(v, str) else list(v)
        elif key.endswith("_file") and isinstance(value, str):
            files.append(value)
    return files


def map_data_files(kwargs: dict[str, Any], fn) -> dict[str, Any]:
    """``dataset_kwargs`` with `fn` applied to every path that :func:`data_files` lists."""
    def one(v):
        return fn(v) if isinstance(v, str) else [fn(x) for x in v]

    out = dict(kwargs)
    for key, value in kwargs.items():
        if key == "data_files":
            out[key] = {k: one(v) for k, v in value.items()} if isinstance(value, dict) else one(value)
        elif key.endswith("_file") and isinstance(value, str):
            out[key] = fn(value)
    return out
