"""Reading records (one dict per row) from the files users point compactlm at: .jsonl, .json, .csv and .parquet
files, folders written by datasets' save_to_disk, and Hugging Face datasets ('hf:<id>', online or cached).

Errors name the recipe field the source came from and the alternatives. Shared by generation (prompts) and the
training-data mixture (corpora, instruction data).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_file_records(path: Path, field: str) -> list[dict]:
    """Rows of a .jsonl / .json (a list of objects) / .csv / .parquet file; ValueError naming `field` otherwise."""
    suffix, what = path.suffix.lower(), field.rsplit(".", 1)[-1]
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{what} file {path}:{n} is not valid JSON ({e})") from None
                    if not isinstance(obj, dict):
                        raise ValueError(f"{what} file {path}:{n} must hold a JSON object per line")
                    rows.append(obj)
        return rows
    if suffix == ".json":
        obj = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
            raise ValueError(f"{what} file {path} must hold a JSON list of objects like "
                             "[{\"prompt\": ...}]")
        return obj
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{field} must be 'builtin' or a .jsonl/.json/.csv/.parquet file, got {str(path)!r}")


def read_hf_records(source: str, split: str, subset: str | None, limit: int | None, *, field: str,
                    split_field: str, alternatives: str) -> list[dict]:
    """Rows of a hub dataset ('hf:<id>') or a save_to_disk directory; a clear ValueError when unavailable."""
    import datasets

    try:
        if source.startswith("hf:"):
            ds = datasets.load_dataset(source[3:].strip(), subset, split=split)
        else:
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"split {split!r} not in {sorted(ds)}; set {split_field}")
                ds = ds[split]
    except ValueError as e:
        if f"set {split_field}" in str(e):
            raise ValueError(f"{field} {source!r}: {e}") from None
        raise ValueError(_hf_unavailable(source, split, e, field, alternatives)) from None
    except Exception as e:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, offline mode ...
        raise ValueError(_hf_unavailable(source, split, e, field, alternatives)) from None
    if limit is not None and len(ds) > limit:
        ds = ds.select(range(limit))
    return ds.to_list()


def _hf_unavailable(source: str, split: str, err: BaseException, field: str, alternatives: str) -> str:
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    why = " ".join(str(err).split())[:300] or type(err).__name__
    return (f"{field}: cannot load dataset {source!r} (split {split!r})"
            + (" in offline mode (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set) and it is not in the local HF cache"
               if offline else "") + f": {why}. Alternatives: a local .jsonl/.json/.csv/.parquet file, {alternatives}")
