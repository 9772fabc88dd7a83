"""What the stage command lines (``python -m compactlm.generation``, ``python -m compactlm.evaluation``) share:
reading ``--config`` and turning bad input into one ``error: ...`` line and exit code 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def parse_stage_config(raw: str, cls: type[M]) -> M:
    """A stage config from a command line's ``--config``: a JSON object, or a path to a .json/.yaml file.

    Raises ValueError (bad JSON, missing file, not a mapping) or pydantic's ValidationError (bad fields).
    """
    text = raw.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config is not valid JSON: {e}") from None
    else:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise ValueError(f"--config: {raw!r} is neither a JSON object nor an existing .json/.yaml file")
        data = (yaml.safe_load(path.read_text()) or {}) if path.suffix.lower() in (".yaml", ".yml") \
            else json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"--config must be a JSON object of {cls.__name__} fields")
    return cls.model_validate(data)


def exit_code(run: Callable[[], None]) -> int:
    """Run `run`; bad input (a bad --config, a ValueError, a missing file) becomes one stderr line and 2."""
    try:
        run()
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        print(f"error: invalid --config: {msg}", file=sys.stderr, flush=True)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    return 0
