"""Self-Instruct: the teacher writes new instructions, filtered, deterministic and resumable, including after a
failed write."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from compactlm.artifacts import is_complete
from compactlm.config import GenerateConfig
from compactlm.formats.generated import read_rows
from compactlm.generation import generate_dataset
from tests.helpers import FAST, run_script


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """One torch thread for the module (see conftest.one_thread)."""
    yield


SEEDS = [("Name three colors.", ""), ("Translate to French", "good morning"), ("Write a haiku about rain.", ""),
         ("Summarize the text", "The cat sat on the mat all day long."), ("Give an antonym", "happy")]


def test_selection_parses_and_filters_instructions():
    from compactlm.config import SelfInstructConfig
    from compactlm.generation.self_instruct import parse_instruction, select_instructions, writing_prompts

    assert parse_instruction("4. Task: Write a poem about the sea.\n5. Next one") == "Write a poem about the sea."
    assert parse_instruction(' "Explain tides."\n\nMore text') == "Explain tides."
    cfg = SelfInstructConfig(num_instructions=3)
    seeds = ["Tell me a joke.", "Name a color you like", "What is two plus two?"]
    cands = ["Write a poem about the sea.", "tell me a JOKE.", "### 12 34 56 !!", "Draw a picture of a cat now",
             "Hi", "Write a poem about the sea!", "Explain how rainbows form.", "Describe your ideal day.",
             "List prime numbers below twenty."]
    kept, stats = select_instructions(cands, seeds, cfg, fits=lambda t: "rainbows" not in t)
    assert kept == ["Write a poem about the sea.", "Describe your ideal day.", "List prime numbers below twenty."]
    assert stats["surplus"] == 0 and stats["kept"] == 3 and stats["candidates"] == 9
    assert {k: v for k, v in stats["rejected"].items() if v} == {
        "duplicate": 1, "not_instruction": 1, "blocked_word": 1, "too_short": 1, "near_duplicate": 1,
        "too_long_for_context": 1}
    p = writing_prompts(seeds, cfg.model_copy(update={"seeds_per_prompt": 2}), chat=False, seed=0)
    assert len(p) == 6 and p == writing_prompts(seeds, cfg.model_copy(update={"seeds_per_prompt": 2}),
                                                chat=False, seed=0)
    assert p[0].endswith("\n3.") and p != writing_prompts(seeds, cfg.model_copy(update={"seeds_per_prompt": 2}),
                                                          chat=False, seed=1)


@pytest.fixture(scope="module")
def self_instructed(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("si")
    (d / "seeds.jsonl").write_text("".join(json.dumps({"instruction": t, "input": i}) + "\n" for t, i in SEEDS))
    cfg = GenerateConfig(**FAST, prompts=str(d / "seeds.jsonl"), template="{instruction}\n\n{input}",
                         shard_size=4, n=2, self_instruct=dict(num_instructions=4, oversample=2.5, max_tokens=16,
                                                               min_words=1, blocked_words=[]))
    manifest = generate_dataset(tiny_model_dir, cfg, d / "out", seed=5, progress=False)
    return cfg, d / "out", manifest


def test_self_instruct_writes_and_answers_new_instructions(self_instructed):
    cfg, out, m = self_instructed
    si = m["self_instruct"]
    assert si["candidates"] == 10 and si["seeds"] == si["first_new_prompt_id"] == 5
    assert si["kept"] + si["surplus"] + sum(si["rejected"].values()) == 10 and si["kept"] >= 1
    new = [json.loads(line) for line in (out / "self_instruct" / "instructions.jsonl").read_text().splitlines()]
    assert len(new) == si["kept"] and [r["prompt_id"] for r in new] == list(range(5, 5 + len(new)))
    assert len(list((out / "self_instruct").glob("shard-*.parquet"))) == 3  # 10 writing prompts / 4
    rows = read_rows(out)
    prompts = {r["prompt_id"]: r["prompt"] for r in rows}
    assert m["stats"]["prompts"] == 5 + len(new) and m["stats"]["self_instruct"]["kept"] == len(new)
    assert prompts.get(1) in (None, "Translate to French\n\ngood morning")
    for r in new:  # every new instruction is answered (unless all its answers were filtered)
        assert prompts.get(r["prompt_id"], r["instruction"]) == r["instruction"]
    assert any(pid >= 5 for pid in prompts)
    # the writing prompts are stored with their few-shot seeds
    first = pq.read_table(out / "self_instruct" / "shard-00000.parquet").to_pylist()[0]
    assert "Here are some examples" in first["prompt"] and first["prompt_text"].endswith("assistant\n")


def test_self_instruct_is_deterministic_and_resumable(self_instructed, tiny_model_dir, tmp_path):
    cfg, out, m = self_instructed
    # a crash after pass 1's second shard: pass 2 and the instruction list are rebuilt, identically
    part = tmp_path / "part"
    shutil.copytree(out, part)
    (part / "manifest.json").unlink()
    (part / "self_instruct" / "shard-00002.parquet").unlink()
    (part / "self_instruct" / "instructions.jsonl").unlink()
    shutil.rmtree(part / "data")
    again = generate_dataset(tiny_model_dir, cfg, part, seed=5, progress=False)
    assert again["self_instruct"]["writing_pass"]["resumed_shards"] == 2
    assert read_rows(part) == read_rows(out)
    assert (part / "self_instruct" / "instructions.jsonl").read_text() == \
        (out / "self_instruct" / "instructions.jsonl").read_text()
    for key in ("candidates", "kept", "surplus", "rejected"):
        assert again["self_instruct"][key] == m["self_instruct"][key]


def test_self_instruct_bad_input_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    cfg = GenerateConfig(**{**FAST, "max_model_len": 160}, max_prompts=3,
                         self_instruct=dict(num_instructions=2, max_tokens=120))
    with pytest.raises(ValueError, match=r"generate.self_instruct.max_tokens \(120\) \+ the longest prompt"):
        generate_dataset(tiny_model_dir, cfg, out, progress=False)
    assert not out.exists()


@pytest.mark.integration  # three small self-instruct runs (one in a subprocess): ~30 s idle
@pytest.mark.long(10)
def test_file_size_limit_while_writing_self_instruct_instructions_then_rerun(tiny_model_dir, tmp_path):
    from compactlm.generation import generate_dataset

    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps({"instruction": t, "input": i}) + "\n"
                                                  for t, i in SEEDS))
    cfg = GenerateConfig(engine="hf", max_tokens=8, max_model_len=512, prompts=str(tmp_path / "seeds.jsonl"),
                         template="{instruction}\n\n{input}", shard_size=4, n=1,
                         self_instruct=dict(num_instructions=4, oversample=2.5, max_tokens=16, min_words=1,
                                            blocked_words=[]))
    ref = tmp_path / "ref"
    ref_manifest = generate_dataset(tiny_model_dir, cfg, ref, seed=5, progress=False)
    out = tmp_path / "out"
    proc = run_script("limit_self_instruct.py", tiny_model_dir, out, cfg.model_dump_json())
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    target = out / "self_instruct" / "instructions.jsonl"
    assert "WriteError" in last and f"could not write {target}" in last and "file too large" in last, last
    assert "instruction-writing shards are kept" in last
    # no partial instruction list, no temp file; the writing pass's shards are whole; nothing published
    assert sorted(p.name for p in target.parent.iterdir()) == [f"shard-0000{i}.parquet" for i in range(3)]
    assert not is_complete(out) and not (out / "data").exists()

    manifest = generate_dataset(tiny_model_dir, cfg, out, seed=5, progress=False)
    assert manifest["self_instruct"]["writing_pass"]["resumed_shards"] == 3
    assert target.read_text() == (ref / "self_instruct" / "instructions.jsonl").read_text()
    assert read_rows(out) == read_rows(ref)
    for key in ("candidates", "kept", "surplus", "rejected"):
        assert manifest["self_instruct"][key] == ref_manifest["self_instruct"][key], key
