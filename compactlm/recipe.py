"""Loading recipes: YAML files, ``--set key=value`` overrides, and the one-line-per-field error every bad recipe
turns into (:class:`RecipeError`).

The schema itself is :mod:`compactlm.config`; checks that need the teacher are :mod:`compactlm.preflight`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from compactlm.config import Recipe

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class RecipeError(ValueError):
    """A recipe or stage config is invalid. The message names the field and the fix."""


def set_dotted(data: dict[str, Any], key: str, raw: str) -> None:
    """Apply one ``--set section.field=value`` (the value parsed as YAML; empty = null) to a recipe dict."""
    if not _DOTTED.fullmatch(key):
        raise RecipeError(f"--set key {key!r} is not a dotted field name like distill.steps")
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None


def _fields_at(loc: tuple) -> list[str]:
    """The field names of the (sub)model that holds `loc`'s last part, e.g. ("distill", "stepz") -> DistillConfig's."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # a list's index (distill_then.1.stepz): the list's item model holds the field
        field = model.model_fields.get(str(part))
        args = getattr(field.annotation, "__args__", None) or (field.annotation,) if field else ()
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _unknown_key(loc: tuple) -> str:
    close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}check the spelling; see `compactlm schema` for the fields)"


def format_validation_error(err: ValidationError, source: str) -> str:
    """pydantic's errors as one line per field: ``  distill.steps: Input should be ... (got -5)``."""
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = _unknown_key(e["loc"])
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = e.get("input")
        quiet = e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) or repr(got) in msg
        suffix = "" if quiet else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{suffix}")
    return "\n".join(lines)


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p, source = Path(path), str(path)
    if not p.is_file():
        raise RecipeError(f"recipe file not found: {source}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {source} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {source} must be a mapping of fields, got {type(data).__name__}")
    return data


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> Recipe:
    """Load and validate a recipe from YAML (or a dict), applying `key.sub=value` overrides."""
    source = str(path) if path is not None else "<dict>"
    if data is None:
        if path is None:
            raise RecipeError("give a recipe path or a dict")
        data = _read_yaml(path)
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        set_dotted(data, key, raw)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, source)) from None
