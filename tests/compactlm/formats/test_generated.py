"""The generated-dataset format module: what it writes, everything else reads back through it."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from compactlm.artifacts import is_complete, read_manifest
from compactlm.formats import generated as fmt


def _rows(n: int, topk: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"id": f"{i}-0", "prompt_id": i, "sample": 0, "prompt": f"p{i}", "prompt_text": f"<p{i}>",
               "completion": f"c{i}", "prompt_token_ids": [1, 2], "completion_token_ids": [3, 4 + i],
               "finish_reason": "stop"}
        if topk:
            row["topk_ids"] = [[3, 5], [4 + i, 6]]
            row["topk_logprobs"] = [[-0.5, -1.5], [-0.25, -2.0]]
        rows.append(row)
    return rows


def test_write_dataset_round_trips_through_the_readers(tmp_path):
    out = tmp_path / "ds"
    manifest = fmt.write_dataset(out, _rows(5, topk=2), {"stage": "test"}, topk=2, shard_rows=2)
    assert is_complete(out) and read_manifest(out)["format"] == fmt.FORMAT == manifest["format"]
    assert [p.name for p in fmt.shard_paths(out)] == ["shard-00000.parquet", "shard-00001.parquet",
                                                     "shard-00002.parquet"]
    assert pq.read_schema(fmt.shard_paths(out)[0]) == fmt.schema(2)
    assert manifest["columns"] == fmt.columns(2) and "topk_logprobs" in manifest["columns"]
    rows = fmt.read_rows(out)
    assert [r["prompt_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[1]["topk_logprobs"] == [[-0.5, -1.5], [-0.25, -2.0]]  # exact in float16
    assert fmt.read_rows(out, ["completion"]) == [{"completion": f"c{i}"} for i in range(5)]
    assert list(fmt.iter_examples(out))[2] == ([1, 2, 3, 6], [0, 0, 1, 1])
    assert fmt.topk_width(out) == 2
    fmt.write_dataset(tmp_path / "plain", _rows(1), {})
    assert fmt.topk_width(tmp_path / "plain") == 0
    assert [t.num_rows for _, t in fmt.iter_tables(out, ["id"])] == [2, 2, 1]


def test_shard_metadata_and_partial_shards(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    path = fmt.shard_path(folder, 3)
    fmt.write_shard(path, _rows(2), meta={"fingerprint": "abc", "rows": 2})
    assert path.name == "shard-00003.parquet" and fmt.shard_metadata(path) == {"fingerprint": "abc", "rows": 2}
    assert fmt.read_column(path, "completion") == ["c0", "c1"]
    (folder / ".shard-00004.parquet.tmp-deadbeef").write_bytes(b"partial")
    fmt.remove_partial_shards(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["shard-00003.parquet"]


def test_readers_name_a_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="is it a generated dataset directory"):
        fmt.read_rows(tmp_path)
    with pytest.raises(FileNotFoundError, match="is it a generated dataset directory"):
        fmt.topk_width(tmp_path)
