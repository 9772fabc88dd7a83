"""Synthetic data generation: dataset format, determinism, crash-resume, bad input, the command line, a full disk."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from compactlm.artifacts import is_complete, read_manifest
from compactlm.config import GenerateConfig
from compactlm.formats.generated import iter_examples, read_rows
from compactlm.generation import generate_dataset
from compactlm.models import load_model, load_tokenizer
from tests.helpers import (
    DISK_MODES,
    FAST,
    GEN,
    REPO,
    SUB_ENV,
    generation_cli,
    grow_disk,
    hf_topk,
    pages,
    run_script,
    small_disk,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """One torch thread for the module (see conftest.one_thread)."""
    yield


def test_output_format_and_contract(sampled, tiny_model_dir):
    cfg, out, manifest = sampled
    assert is_complete(out)
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"shard-0000{i}.parquet" for i in range(3)]
    schema = pq.read_schema(out / "data" / "shard-00000.parquet")
    expect = {"id": pa.string(), "prompt_id": pa.int64(), "sample": pa.int64(), "prompt": pa.string(),
              "prompt_text": pa.string(), "completion": pa.string(),
              "prompt_token_ids": pa.list_(pa.int32()), "completion_token_ids": pa.list_(pa.int32()),
              "finish_reason": pa.string(), "topk_ids": pa.list_(pa.list_(pa.int32())),
              "topk_logprobs": pa.list_(pa.list_(pa.float16()))}
    assert {f.name: f.type for f in schema} == expect

    rows = read_rows(out)
    stats = manifest["stats"]
    assert stats["prompts"] == 5 and stats["requested_completions"] == 10
    assert stats["completions"] == len(rows) == 10 - sum(stats["dropped"].values())
    assert [s["rows"] for s in manifest["shards"]] == [
        pq.read_metadata(out / s["path"]).num_rows for s in manifest["shards"]]
    assert [s["prompt_range"] for s in manifest["shards"]] == [[0, 2], [2, 4], [4, 5]]
    assert stats["completion_tokens"] == sum(len(r["completion_token_ids"]) for r in rows)
    assert stats["prompt_tokens"] == sum(len(r["prompt_token_ids"]) for r in rows)
    assert stats["gen_seconds"] > 0 and stats["completion_tokens_per_s"] > 0
    assert manifest["engine"] == "hf" and manifest["config"] == cfg.model_dump(mode="json")

    tok = load_tokenizer(tiny_model_dir)
    builtin = [json.loads(line)["prompt"] for line in (REPO / "compactlm/data/seed_prompts.jsonl").open()]
    for r in rows:
        assert r["id"] == f"{r['prompt_id']}-{r['sample']}" and r["sample"] in (0, 1)
        assert r["prompt"] == builtin[r["prompt_id"]]
        assert r["prompt_text"].endswith("<|im_start|>assistant\n") and r["prompt"] in r["prompt_text"]
        assert r["prompt_token_ids"] == tok(r["prompt_text"], add_special_tokens=False)["input_ids"]
        assert r["completion"] == tok.decode(r["completion_token_ids"], skip_special_tokens=True)
        T = len(r["completion_token_ids"])
        assert r["finish_reason"] == ("stop" if r["completion_token_ids"][-1] == tok.eos_token_id else "length")
        assert 1 <= T <= cfg.max_tokens
        assert len(r["topk_ids"]) == len(r["topk_logprobs"]) == T
        assert all(len(x) == 4 for x in r["topk_ids"])
        for lp in r["topk_logprobs"]:
            assert lp == sorted(lp, reverse=True) and lp[0] <= 0.0

    # the later stages' reader and HF datasets both read it
    ex = list(iter_examples(out))
    assert len(ex) == len(rows) and all(len(ids) == len(m) for ids, m in ex)
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "shard-*.parquet"), split="train")
    assert ds.num_rows == len(rows) and set(ds.column_names) == set(expect)


def test_hf_engine_topk_matches_teacher_forward(sampled, tiny_model_dir):
    """The batched, left-padded, KV-cached decoding loop gives the same log-probs as one plain forward pass."""
    _, out, _ = sampled
    model = load_model(tiny_model_dir)
    rows = read_rows(out)
    for r in rows[:4]:
        logp = hf_topk(model, r["prompt_token_ids"], r["completion_token_ids"], 4)
        stored_ids = torch.tensor(r["topk_ids"])
        stored_lp = torch.tensor(r["topk_logprobs"], dtype=torch.float32)
        ref_lp, _ = logp.topk(4, dim=-1)
        torch.testing.assert_close(stored_lp, ref_lp, atol=2e-2, rtol=0)  # fp16 storage of values ~ -10
        torch.testing.assert_close(logp.gather(1, stored_ids), stored_lp, atol=2e-2, rtol=0)


def test_same_seed_same_data_other_seed_differs(sampled, tiny_model_dir, tmp_path):
    cfg, out, manifest = sampled
    again = generate_dataset(tiny_model_dir, cfg, tmp_path / "again", seed=7, progress=False)
    assert read_rows(tmp_path / "again") == read_rows(out)
    assert [s["sha256"] for s in again["shards"]] != [] and again["fingerprint"] == manifest["fingerprint"]
    other = cfg.model_copy(update={"max_prompts": 2, "shard_size": 5})  # also: different batching
    generate_dataset(tiny_model_dir, other, tmp_path / "seed8", seed=8, progress=False)
    seed7 = {r["id"]: r["completion_token_ids"] for r in read_rows(out)}
    seed8 = {r["id"]: r["completion_token_ids"] for r in read_rows(tmp_path / "seed8")}
    assert all(seed8[i] != seed7[i] for i in seed8)


def test_existing_manifest_is_returned_without_an_engine(sampled, tmp_path):
    cfg, out, manifest = sampled
    # a teacher path that does not exist: any attempt to load a tokenizer or engine would fail
    assert generate_dataset(tmp_path / "no-such-model", cfg, out, seed=7) == manifest


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    cfg = GenerateConfig(**{**FAST, "max_tokens": 16}, max_prompts=10, shard_size=1, n=2, topk_logprobs=2)
    ref = generate_dataset(tiny_model_dir, cfg, tmp_path / "ref", seed=3, progress=False)

    out = tmp_path / "killed"
    args = ["--model", str(tiny_model_dir), "--out", str(out), "--config", cfg.model_dump_json(), "--seed", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "compactlm.generation", *args], cwd=REPO, env=SUB_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "data" / "shard-00000.parquet"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted((out / "data").glob("shard-*.parquet"))
    assert first.exists() and not is_complete(out)
    assert 1 <= len(finished) < 10, "the run must be killed part-way through"

    manifest = generate_dataset(tiny_model_dir, cfg, out, seed=3, progress=False)
    assert manifest["stats"]["resumed_shards"] == len(finished)
    rows = read_rows(out)
    assert rows == read_rows(tmp_path / "ref")
    assert len({r["id"] for r in rows}) == len(rows)
    assert [s["rows"] for s in manifest["shards"]] == [s["rows"] for s in ref["shards"]]
    for key in ("completions", "completion_tokens", "prompt_tokens", "dropped", "finish_reasons"):
        assert manifest["stats"][key] == ref["stats"][key]
    assert not list((out / "data").glob(".*tmp*"))


@pytest.fixture
def no_template_model(tiny_model_dir, tmp_path) -> Path:
    """The tiny model with its chat template removed."""
    d = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


@pytest.mark.parametrize("case", ["missing_field", "empty", "too_long", "beyond_positions", "chat_on"])
def test_bad_input_raises_and_writes_nothing(case, tiny_model_dir, no_template_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    model, kw = tiny_model_dir, {}
    if case == "missing_field":
        prompts.write_text('{"prompt": "hi"}\n{"question": "no prompt here"}\n')
        kw, match = dict(prompts=str(prompts)), r"row 1 has no field 'prompt'.*prompt_field"
    elif case == "empty":
        prompts.write_text("\n")
        kw, match = dict(prompts=str(prompts)), "prompt set is empty"
    elif case == "too_long":
        kw, match = dict(max_model_len=64, max_tokens=40), r"max_tokens \(40\) \+ the longest prompt"
    elif case == "beyond_positions":
        kw, match = dict(max_model_len=4096), r"max_model_len \(4096\) exceeds .*max_position_embeddings \(2048\)"
    else:
        model, kw, match = no_template_model, dict(chat="on"), "no chat template"
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        generate_dataset(model, GenerateConfig(**{**FAST, **kw}), out, progress=False)
    assert not out.exists()


def test_chat_off_and_auto_without_template(no_template_model, tmp_path):
    cfg = GenerateConfig(**FAST, max_prompts=2, chat="auto")
    m = generate_dataset(no_template_model, cfg, tmp_path / "raw", progress=False)
    rows = read_rows(tmp_path / "raw")
    assert m["chat_template"] is False and rows[0]["prompt_text"] == rows[0]["prompt"]
    with pytest.raises(ValueError, match="system_prompt needs chat mode"):
        generate_dataset(no_template_model, cfg.model_copy(update={"system_prompt": "Be brief."}),
                         tmp_path / "sys", progress=False)


def test_cli_bad_input_exits_nonzero_with_one_line(tiny_model_dir, tmp_path):
    res = generation_cli("--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--config", '{"n": 0}')
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("error: invalid --config: n:")
    res = generation_cli("--model", str(tiny_model_dir), "--out", str(tmp_path / "o"),
               "--config", json.dumps({"engine": "hf", "max_model_len": 64, "max_tokens": 60}))
    assert res.returncode == 2 and "max_tokens (60)" in res.stderr and res.stderr.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()


def test_package_import_is_light():
    code = ("import sys, compactlm.generation, compactlm.generation.dataset, compactlm.generation.__main__; "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'pyarrow', 'prefect', 'mlflow') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


@pytest.mark.integration  # generation subprocess + a resume: ~15 s idle per mode
@pytest.mark.parametrize("mode", DISK_MODES)
@pytest.mark.long(8)
def test_disk_full_while_writing_a_shard_then_resume(mode, tiny_model_dir, gen_dir, tmp_path):
    import pyarrow.parquet as pq

    from compactlm.generation import generate_dataset

    shards = sorted((gen_dir / "data").glob("shard-*.parquet"))
    assert len(shards) == 4
    disk = tmp_path / "disk"
    out = disk / "gen"
    with small_disk(disk, pages(shards[0].stat().st_size) + pages(shards[1].stat().st_size)) \
            if mode == "tmpfs" else contextlib.nullcontext():
        proc = run_script("limit_generation.py", tiny_model_dir, out, GEN.model_dump_json(),
                          "2" if mode == "rlimit" else "-1")
        assert proc.returncode == 1, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        # the error names the shard and the cause, and says what survives
        assert "WriteError" in last and f"could not write {out / 'data' / 'shard-00002.parquet'}" in last, last
        assert ("no space left on device" if mode == "tmpfs" else "file too large") in last, last
        assert "finished shards are kept" in last
        assert not is_complete(out)
        assert sorted(p.name for p in (out / "data").iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]
        for p in shards[:2]:  # the finished shards are intact (same rows; their metadata holds timings)
            assert pq.read_table(out / "data" / p.name).to_pylist() == pq.read_table(p).to_pylist()

        if mode == "tmpfs":
            grow_disk(disk, 16 << 20)
        manifest = generate_dataset(tiny_model_dir, GEN, out, seed=0, progress=False)
        assert manifest["stats"]["resumed_shards"] == 2
        assert read_rows(out) == read_rows(gen_dir)
        ref = read_manifest(gen_dir)
        assert [s["rows"] for s in manifest["shards"]] == [s["rows"] for s in ref["shards"]]
        for key in ("completions", "completion_tokens", "prompt_tokens", "dropped", "finish_reasons"):
            assert manifest["stats"][key] == ref["stats"][key], key
