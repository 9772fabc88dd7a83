"""The data section: what the student is trained on, a mixture of sources weighted by tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from compactlm.config.base import _Strict

#: File types a text or instruction source reads.
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


class DataSource(_Strict):
    """One source of training text and its share of the tokens."""

    kind: Literal["generated", "text", "instructions"] = Field(
        "generated",
        description="generated = the teacher's answers (the generate stage); text = plain documents (a corpus); "
        "instructions = prompt / response pairs",
    )
    weight: float = Field(1.0, ge=0.0, description="Share of the tokens, relative to the other sources' weights")
    path: str | None = Field(
        None,
        description="text / instructions: a .txt (documents separated by blank lines), .jsonl, .json, .csv or "
        ".parquet file, or 'hf:<dataset id>' (needs network or a cached copy)",
    )
    text_field: str = Field("text", description="text: the column holding a document (not for .txt files)")
    prompt_field: str = Field("prompt", description="instructions: the column holding the prompt")
    input_field: str | None = Field(None, description="instructions: a column appended to the prompt (e.g. input)")
    response_field: str = Field("response", description="instructions: the column holding the answer")
    split: str = Field("train", description="hf: the dataset split")
    subset: str | None = Field(None, description="hf: the dataset configuration")

    @model_validator(mode="after")
    def _path_fits_kind(self) -> DataSource:
        if self.kind == "generated":
            if self.path is not None:
                raise ValueError("a generated source reads the generate stage's output: drop path (or use kind: "
                                 "text / instructions for a file)")
            return self
        if not self.path:
            raise ValueError(f"a {self.kind} source needs a path (a file or 'hf:<dataset id>')")
        if self.path.startswith("hf:"):
            if not self.path[3:].strip():
                raise ValueError("path 'hf:' needs a dataset id, e.g. 'hf:wikitext'")
            return self
        p = Path(self.path).expanduser()
        if p.suffix.lower() not in DATA_SUFFIXES:
            raise ValueError(f"path must be a {' / '.join(DATA_SUFFIXES)} file or 'hf:<dataset id>', got {self.path!r}")
        if not p.is_file():
            raise ValueError(f"path: file not found: {self.path!r} (give an existing file)")
        return self


class DataConfig(_Strict):
    """The distillation data: sources mixed by tokens (deterministic for the seed); default: the generated set."""

    sources: list[DataSource] = Field(
        default_factory=lambda: [DataSource()], description="The sources and their weights (by tokens)"
    )
    tokens: int | None = Field(
        None, ge=1, description="Tokens to draw in all; empty = what distillation reads (steps x batch x seq_len)"
    )
    doc_tokens: int = Field(1024, ge=8, description="Longest piece a text document is cut into (tokens)")

    @model_validator(mode="after")
    def _some_weight(self) -> DataConfig:
        if not self.sources:
            raise ValueError("give at least one source (e.g. {kind: generated})")
        if sum(s.weight for s in self.sources) <= 0:
            raise ValueError("every source has weight 0: give at least one source a positive weight")
        return self

    @property
    def generated_only(self) -> bool:
        """The default: the generated set as it is (no mixing stage needed)."""
        return [s.kind for s in self.sources] == ["generated"] and self.tokens is None
