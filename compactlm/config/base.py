"""What every config model shares: strict fields, a clear error for a key that moved into a section."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    #: Keys that moved into a section: old key -> section. A recipe that still uses one gets an error that names
    #: the new place instead of "unknown key".
    MOVED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [k for k in data if k in cls.MOVED]
            if moved:
                raise ValueError("; ".join(f"{k!r} moved into the {cls.MOVED[k]!r} section: write it as "
                                           f"{cls.MOVED[k]}: {{{k}: ...}}" for k in moved))
        return data


def _existing_file(value: str | None, what: str) -> str | None:
    if value is None or "://" in value:  # fsspec URLs are checked when read
        return value
    if not Path(value).expanduser().is_file():
        raise ValueError(f"{what} file not found: {value!r} (give an existing path)")
    return value


#: Words that mark an instruction a text-only model cannot carry out (from the Self-Instruct paper's filter).
