"""Completion filters: duplicates, near-duplicates, length, truncation, repetition; deterministic under resume."""

from __future__ import annotations

import json
import shutil

import pytest

from compactlm.config import GenerateConfig
from compactlm.formats.generated import read_rows
from compactlm.generation import generate_dataset
from compactlm.models import load_tokenizer
from tests.helpers import FAST


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """One torch thread for the module (see conftest.one_thread)."""
    yield


def test_dedup_drops_planted_duplicates(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    texts = ["Name a color", "Name a fruit", "Name a color", "Count to three", "Name a color", "Name a fruit"]
    prompts.write_text("".join(json.dumps({"text": t, "other": 1}) + "\n" for t in texts))
    # raw prompts: greedy decoding of the random model after the chat template is only newlines ("empty")
    # (exact dedup only here: the near-dup and repetition filters have their own tests)
    base = dict(FAST, prompts=str(prompts), prompt_field="text", temperature=0.0, shard_size=2, chat="off")
    filters = dict(near_dup_threshold=None, max_repetition=None)

    m = generate_dataset(tiny_model_dir, GenerateConfig(**base, filters=filters), tmp_path / "dedup", progress=False)
    rows = read_rows(tmp_path / "dedup")
    assert m["stats"]["dropped"] == {"empty": 0, "truncated": 0, "min_tokens": 0, "max_tokens": 0,
                                     "repetition": 0, "duplicate": 3, "near_duplicate": 0}
    assert [r["prompt_id"] for r in rows] == [0, 1, 3]  # first occurrence kept, across shard boundaries
    assert len({r["completion"] for r in rows}) == 3

    m = generate_dataset(tiny_model_dir, GenerateConfig(**base, filters=dict(filters, dedup=False)), tmp_path / "all",
                         progress=False)
    assert m["stats"]["completions"] == 6 and m["stats"]["dropped"]["duplicate"] == 0
    all_rows = read_rows(tmp_path / "all")
    assert all_rows[0]["completion"] == all_rows[2]["completion"] == all_rows[4]["completion"]

    m = generate_dataset(tiny_model_dir, GenerateConfig(**base, filters=dict(filters, min_tokens=9)),
                         tmp_path / "short", progress=False)
    assert m["stats"]["completions"] == 0 and m["stats"]["dropped"]["min_tokens"] == 6
    assert len(m["shards"]) == 3 and all(s["rows"] == 0 for s in m["shards"])


def test_filter_primitives():
    from compactlm.generation.filters import NearDupIndex, repetition_ratio, shingles

    assert repetition_ratio([1, 2, 3] * 10, 4) > 0.8 and repetition_ratio(range(30), 4) == 0.0
    assert repetition_ratio([1, 1], 4) == 0.0 and shingles("") == set() and shingles("Hi there") == {"hi there"}
    base = ("The quick brown fox jumps over the lazy dog near the old river bank on a sunny afternoon in late "
            "spring while the children play football in the park")
    idx = NearDupIndex(0.7)
    assert not idx.is_duplicate(base)
    assert idx.is_duplicate(base.upper() + "!!")  # case / punctuation only
    assert idx.is_duplicate(base.replace("football", "soccer"))  # 3 of 26 shingles change: Jaccard 23/29
    assert not idx.is_duplicate("A recipe: boil the pasta, fry garlic in olive oil, toss with parsley and serve.")
    assert not idx.is_duplicate("   ") and len(idx) == 2


class PlantedEngine:
    """A fake engine answering prompt i with a planted text, to test the filters through generate_dataset."""

    name, start_seconds, dtype = "planted", 0.0, "float32"

    def __init__(self, tokenizer, texts: list[str], eos: int):
        self.tok, self.texts, self.eos = tokenizer, texts, eos

    def generate(self, requests, sampling, *, progress=False):
        from compactlm.generation.engines import Completion

        out = []
        for r in requests:
            text = self.texts[r.prompt_id]
            ids = self.tok(text, add_special_tokens=False)["input_ids"][:sampling.max_tokens]
            full = len(ids) < sampling.max_tokens
            out.append(Completion(ids + [self.eos] if full else ids, "stop" if full else "length"))
        return out

    def close(self):
        pass


PLANTED = [
    "Paris is the capital of France and its largest city, known for the Eiffel Tower and the Louvre museum.",
    "Paris is the capital of France and its largest city, known for the Eiffel Tower and the Louvre gallery.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the leaves of plants.",
    "yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes",
    "PARIS is the capital of France and its largest city, known for the Eiffel Tower and the Louvre museum!",
    "The French capital, Paris, is known for the Eiffel Tower, the Louvre museum and its cafes by the Seine.",
    "",
    "Water boils at one hundred degrees Celsius at sea level, and at lower temperatures on high mountains.",
]


@pytest.fixture
def planted(tiny_model_dir, tmp_path, monkeypatch):
    import compactlm.generation.dataset as ds

    tok = load_tokenizer(tiny_model_dir)
    monkeypatch.setattr(ds, "_make_engine", lambda *a, **k: PlantedEngine(tok, PLANTED, tok.eos_token_id))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(len(PLANTED))))
    return dict(engine="hf", prompts=str(prompts), max_tokens=40, max_model_len=512, shard_size=3)


def test_near_dup_and_quality_filters_drop_planted_rows(planted, tiny_model_dir, tmp_path):
    m = generate_dataset(tiny_model_dir, GenerateConfig(**planted, filters=dict(near_dup_threshold=0.7)),
                         tmp_path / "f", progress=False)
    kept = {r["prompt_id"] for r in read_rows(tmp_path / "f")}
    # 1: last word changed (near-dup of 0: Jaccard 16/18); 3: degenerate loop; 4: case/punctuation of 0 (exact dedup
    # normalizes case+whitespace only, so MinHash catches it); 6: empty. 5 paraphrases 0 loosely: kept.
    assert kept == {0, 2, 5, 7}
    assert m["stats"]["dropped"] == {"empty": 1, "truncated": 0, "min_tokens": 0, "max_tokens": 0,
                                     "repetition": 1, "duplicate": 0, "near_duplicate": 2}
    m = generate_dataset(tiny_model_dir, GenerateConfig(**planted, filters=dict(
                             near_dup_threshold=None, max_repetition=None, max_completion_tokens=20,
                             drop_truncated=True)),
                         tmp_path / "g", progress=False)
    d = m["stats"]["dropped"]
    tok = load_tokenizer(tiny_model_dir)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in PLANTED if t]
    assert max(lengths) < 40  # nothing truncated
    assert d == {"empty": 1, "truncated": 0, "min_tokens": 0, "max_tokens": sum(n > 20 for n in lengths),
                 "repetition": 0, "duplicate": 0, "near_duplicate": 0}
    assert 0 < d["max_tokens"] < len(lengths)
    m = generate_dataset(tiny_model_dir,
                         GenerateConfig(**{**planted, "max_tokens": 20}, filters=dict(drop_truncated=True)),
                         tmp_path / "t", progress=False)
    assert m["stats"]["dropped"]["truncated"] == sum(n >= 20 for n in lengths)


def test_filtering_is_deterministic_under_resume(planted, tiny_model_dir, tmp_path):
    """Near-dup state is rebuilt from finished shards: dropping the later shards and resuming = one run."""
    cfg = GenerateConfig(**{**planted, "shard_size": 2, "max_tokens": 20}, filters=dict(near_dup_threshold=0.7))
    ref = generate_dataset(tiny_model_dir, cfg, tmp_path / "ref", progress=False)
    assert ref["stats"]["dropped"]["truncated"] == 0 and ref["stats"]["finish_reasons"]["length"] > 0
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", out)
    (out / "manifest.json").unlink()
    for s in ("shard-00002.parquet", "shard-00003.parquet"):
        (out / "data" / s).unlink()
    m = generate_dataset(tiny_model_dir, cfg, out, progress=False)
    assert m["stats"]["resumed_shards"] == 2 and m["stats"]["dropped"] == ref["stats"]["dropped"]
    assert read_rows(out) == read_rows(tmp_path / "ref")
