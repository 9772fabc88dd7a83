"""The generated-dataset format: the one module that knows how a dataset directory is laid out on disk.

Generation writes it, distillation / scoring / pruning read it, corpora are converted into it; all of them call
this module (nothing else builds a shard path or a parquet schema)::

    <dataset>/
      manifest.json                written last (the directory is complete only once it exists)
      data/shard-00000.parquet     one row per kept completion, prompts [0, shard_size) of the run
      data/shard-00001.parquet     ...
      self_instruct/shard-*.parquet      only with self-instruct: pass 1, the written instruction candidates
      self_instruct/instructions.jsonl   the kept instructions ({"prompt_id", "instruction"})

Columns (:func:`schema`): ``id`` str "<prompt_id>-<sample>", ``prompt_id`` int64, ``sample`` int64, ``prompt`` str
(raw user prompt), ``prompt_text`` str (exact formatted prompt, chat template applied), ``completion`` str,
``prompt_token_ids`` list<int32> (what the engine saw), ``completion_token_ids`` list<int32> (EOS included when
generation stopped on it), ``finish_reason`` "stop"|"length"; with top-k log-probs also ``topk_ids``
list<list<int32>> [T][k] and ``topk_logprobs`` list<list<float16>> [T][k], aligned with completion_token_ids (the
teacher's k most likely ids, or with the manifest's ``"logit_targets": "sampled"`` k ids drawn from its
distribution, sorted by id, repeats kept: :func:`logit_targets`); a mixed dataset (:mod:`compactlm.mixture`)
also has ``source`` str, the source each row came from.
float16 is written natively (parquet's FLOAT16 logical type; ``datasets`` reads it back as float16), so
``datasets.load_dataset("parquet", data_dir=".../data")`` loads a dataset as is.

Each shard's parquet key-value metadata (:data:`META_KEY`) holds its writer's fingerprint and the shard's stats,
which is what lets generation resume at the first missing shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactlm.artifacts import atomic_file, publish_dir

if TYPE_CHECKING:
    import pyarrow as pa

FORMAT = "compactlm.generated/v1"
META_KEY = b"compactlm"
DATA_DIR = "data"
SHARD_NAME = "shard-{:05d}.parquet"
SHARD_GLOB = "shard-*.parquet"
TOPK_LOGPROB_DTYPE = "float16"
SELF_INSTRUCT_DIR = "self_instruct"
INSTRUCTIONS_FILE = "instructions.jsonl"
TOPK_COLUMNS = ("topk_ids", "topk_logprobs")


def schema(topk: int = 0, source: bool = False) -> pa.Schema:
    """The parquet schema of a shard; with ``topk > 0`` the two top-k columns are added, with `source` the column
    naming each row's source (mixed datasets)."""
    import pyarrow as pa

    fields = [
        ("id", pa.string()), ("prompt_id", pa.int64()), ("sample", pa.int64()), ("prompt", pa.string()),
        ("prompt_text", pa.string()), ("completion", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int32())), ("completion_token_ids", pa.list_(pa.int32())),
        ("finish_reason", pa.string()),
    ]
    if topk:
        fields += [("topk_ids", pa.list_(pa.list_(pa.int32()))),
                   ("topk_logprobs", pa.list_(pa.list_(getattr(pa, TOPK_LOGPROB_DTYPE)())))]
    if source:
        fields.append(("source", pa.string()))
    return pa.schema(fields)


def columns(topk: int = 0, source: bool = False) -> list[str]:
    return schema(topk, source).names


def shard_path(folder: str | os.PathLike, index: int) -> Path:
    """Shard `index` inside `folder` (a dataset's ``data/`` or ``self_instruct/``)."""
    return Path(folder) / SHARD_NAME.format(index)


def shard_paths(dataset_dir: str | os.PathLike, folder: str = DATA_DIR) -> list[Path]:
    """The finished shards of a dataset (``data/`` by default), in order."""
    return sorted((Path(dataset_dir) / folder).glob(SHARD_GLOB))


def remove_partial_shards(folder: str | os.PathLike) -> None:
    """Delete temp files a crash left while writing a shard (never a finished shard)."""
    for stale in Path(folder).glob(".shard-*.tmp-*"):
        stale.unlink(missing_ok=True)


def write_shard(path: str | os.PathLike, rows: list[dict], topk: int = 0, meta: dict[str, Any] | None = None,
                *, keeps: str = "finished shards are kept and a rerun resumes after them",
                source: bool = False) -> None:
    """Write one shard atomically (temp name, fsync, rename). `meta` goes into the parquet metadata.

    A full disk raises :class:`compactlm.artifacts.WriteError` naming `path`; `keeps` says what survives.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    sch = schema(topk, source)
    if meta is not None:
        sch = sch.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    table = pa.Table.from_pylist(rows, schema=sch)
    with atomic_file(path, "wb", keeps=keeps) as f:
        pq.write_table(table, f)


def shard_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata dict :func:`write_shard` stored (empty for a shard written without one)."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def read_column(path: str | os.PathLike, column: str) -> list:
    """One column of one shard as a Python list."""
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[column]).column(column).to_pylist()


def _shards_or_error(dataset_dir: str | os.PathLike) -> list[Path]:
    shards = shard_paths(dataset_dir)
    if not shards:
        raise FileNotFoundError(f"no shards under {dataset_dir}/{DATA_DIR}: is it a generated dataset directory?")
    return shards


def iter_tables(dataset_dir: str | os.PathLike, cols: list[str] | None = None) -> Iterator[tuple[Path, pa.Table]]:
    """(shard path, pyarrow table of `cols`) for every shard, in order."""
    import pyarrow.parquet as pq

    for shard in _shards_or_error(dataset_dir):
        yield shard, pq.read_table(shard, columns=cols)


def read_rows(dataset_dir: str | os.PathLike, cols: list[str] | None = None) -> list[dict]:
    """All rows of a generated dataset (the `cols` columns, default all), in shard order."""
    rows: list[dict] = []
    for _, table in iter_tables(dataset_dir, cols):
        rows.extend(table.to_pylist())
    return rows


def iter_examples(dataset_dir: str | os.PathLike) -> Iterator[tuple[list[int], list[int]]]:
    """(input_ids, loss_mask) per row: prompt tokens masked out (0), completion tokens counted (1)."""
    for row in read_rows(dataset_dir, ["prompt_token_ids", "completion_token_ids"]):
        p, c = list(row["prompt_token_ids"]), list(row["completion_token_ids"])
        yield p + c, [0] * len(p) + [1] * len(c)


def topk_width(dataset_dir: str | os.PathLike) -> int:
    """k of the stored top-k log-probs (0 when the dataset has none)."""
    import pyarrow.parquet as pq

    shards = _shards_or_error(dataset_dir)
    if not set(TOPK_COLUMNS) <= set(pq.read_schema(shards[0]).names):
        return 0
    for shard in shards:
        col = pq.read_table(shard, columns=["topk_ids"]).column("topk_ids").combine_chunks()
        for row in col:
            for tok in row.values:
                return len(tok)
    return 0


def logit_targets(dataset_dir: str | os.PathLike) -> str:
    """What the stored ``topk_*`` columns hold: "topk" (the k most likely ids; also datasets written before the
    manifest said) or "sampled" (k draws from the teacher's distribution)."""
    manifest = Path(dataset_dir) / "manifest.json"
    found = json.loads(manifest.read_text()).get("logit_targets") if manifest.is_file() else None
    return found or "topk"


def write_dataset(out_dir: str | os.PathLike, rows: list[dict], manifest: dict[str, Any], *, topk: int = 0,
                  shard_rows: int | None = None, source: bool = False) -> dict[str, Any]:
    """Publish `rows` as a complete dataset in one go (shards of `shard_rows`, default one shard, then the
    manifest; atomic via :func:`compactlm.artifacts.publish_dir`). For converted corpora and hand-made data;
    generation writes shard by shard instead. Returns the manifest."""
    manifest = {"format": FORMAT, "columns": columns(topk, source), **manifest}
    step = shard_rows or max(1, len(rows))
    with publish_dir(out_dir, manifest) as tmp:
        (tmp / DATA_DIR).mkdir()
        for i, start in enumerate(range(0, max(1, len(rows)), step)):
            write_shard(shard_path(tmp / DATA_DIR, i), rows[start:start + step], topk, source=source)
    return manifest
