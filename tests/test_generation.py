"""Synthetic data generation: dataset format, determinism, crash-resume, filters, validation, vLLM parity."""

from __future__ import annotations

import json
import os
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

from compactlm.artifacts import is_complete
from compactlm.config import GenerateConfig
from compactlm.datasets import iter_examples, read_generated
from compactlm.generation import generate_dataset
from compactlm.models import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
# Small and fast: the HF engine on the tiny random model.
FAST = dict(engine="hf", max_tokens=8, max_model_len=512)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the test machine's 2 cores are shared, and oversubscribed OpenMP barriers make
    tiny matmuls ~100x slower. Subprocesses get OMP_NUM_THREADS=1 for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _rows(out: Path) -> list[dict]:
    return read_generated(out)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compactlm.generation", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, **{"env": SUB_ENV, **kw})


def _hf_topk(model, prompt_ids: list[int], completion_ids: list[int], k: int):
    """Raw top-k log-probs of a teacher forward pass over prompt + completion, at each completion position."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return logp[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(completion_ids)]  # [T, V]


@pytest.fixture(scope="module")
def sampled(tiny_model_dir, tmp_path_factory):
    """One sampled dataset with top-k log-probs: 5 prompts x 2 samples in shards of 2 prompts."""
    cfg = GenerateConfig(**FAST, max_prompts=5, n=2, shard_size=2, topk_logprobs=4)
    out = tmp_path_factory.mktemp("gen") / "sampled"
    manifest = generate_dataset(tiny_model_dir, cfg, out, seed=7, progress=False)
    return cfg, out, manifest


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

    rows = _rows(out)
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
    rows = _rows(out)
    for r in rows[:4]:
        logp = _hf_topk(model, r["prompt_token_ids"], r["completion_token_ids"], 4)
        stored_ids = torch.tensor(r["topk_ids"])
        stored_lp = torch.tensor(r["topk_logprobs"], dtype=torch.float32)
        ref_lp, _ = logp.topk(4, dim=-1)
        torch.testing.assert_close(stored_lp, ref_lp, atol=2e-2, rtol=0)  # fp16 storage of values ~ -10
        torch.testing.assert_close(logp.gather(1, stored_ids), stored_lp, atol=2e-2, rtol=0)


def test_same_seed_same_data_other_seed_differs(sampled, tiny_model_dir, tmp_path):
    cfg, out, manifest = sampled
    again = generate_dataset(tiny_model_dir, cfg, tmp_path / "again", seed=7, progress=False)
    assert _rows(tmp_path / "again") == _rows(out)
    assert [s["sha256"] for s in again["shards"]] != [] and again["fingerprint"] == manifest["fingerprint"]
    other = cfg.model_copy(update={"max_prompts": 2, "shard_size": 5})  # also: different batching
    generate_dataset(tiny_model_dir, other, tmp_path / "seed8", seed=8, progress=False)
    seed7 = {r["id"]: r["completion_token_ids"] for r in _rows(out)}
    seed8 = {r["id"]: r["completion_token_ids"] for r in _rows(tmp_path / "seed8")}
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
    rows = _rows(out)
    assert rows == _rows(tmp_path / "ref")
    assert len({r["id"] for r in rows}) == len(rows)
    assert [s["rows"] for s in manifest["shards"]] == [s["rows"] for s in ref["shards"]]
    for key in ("completions", "completion_tokens", "prompt_tokens", "dropped", "finish_reasons"):
        assert manifest["stats"][key] == ref["stats"][key]
    assert not list((out / "data").glob(".*tmp*"))


def test_dedup_drops_planted_duplicates(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    texts = ["Name a color", "Name a fruit", "Name a color", "Count to three", "Name a color", "Name a fruit"]
    prompts.write_text("".join(json.dumps({"text": t, "other": 1}) + "\n" for t in texts))
    # raw prompts: greedy decoding of the random model after the chat template is only newlines ("empty")
    # (exact dedup only here: the near-dup and repetition filters have their own tests)
    base = dict(FAST, prompts=str(prompts), prompt_field="text", temperature=0.0, shard_size=2, chat="off",
                near_dup_threshold=None, max_repetition=None)

    m = generate_dataset(tiny_model_dir, GenerateConfig(**base), tmp_path / "dedup", progress=False)
    rows = _rows(tmp_path / "dedup")
    assert m["stats"]["dropped"] == {"empty": 0, "truncated": 0, "min_tokens": 0, "max_tokens": 0,
                                     "repetition": 0, "duplicate": 3, "near_duplicate": 0}
    assert [r["prompt_id"] for r in rows] == [0, 1, 3]  # first occurrence kept, across shard boundaries
    assert len({r["completion"] for r in rows}) == 3

    m = generate_dataset(tiny_model_dir, GenerateConfig(**base, dedup=False), tmp_path / "all", progress=False)
    assert m["stats"]["completions"] == 6 and m["stats"]["dropped"]["duplicate"] == 0
    all_rows = _rows(tmp_path / "all")
    assert all_rows[0]["completion"] == all_rows[2]["completion"] == all_rows[4]["completion"]

    m = generate_dataset(tiny_model_dir, GenerateConfig(**base, min_tokens=9), tmp_path / "short", progress=False)
    assert m["stats"]["completions"] == 0 and m["stats"]["dropped"]["min_tokens"] == 6
    assert len(m["shards"]) == 3 and all(s["rows"] == 0 for s in m["shards"])


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
    rows = _rows(tmp_path / "raw")
    assert m["chat_template"] is False and rows[0]["prompt_text"] == rows[0]["prompt"]
    with pytest.raises(ValueError, match="system_prompt needs chat mode"):
        generate_dataset(no_template_model, cfg.model_copy(update={"system_prompt": "Be brief."}),
                         tmp_path / "sys", progress=False)


def test_cli_bad_input_exits_nonzero_with_one_line(tiny_model_dir, tmp_path):
    res = _cli("--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--config", '{"n": 0}')
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("error: invalid --config: n:")
    res = _cli("--model", str(tiny_model_dir), "--out", str(tmp_path / "o"),
               "--config", json.dumps({"engine": "hf", "max_model_len": 64, "max_tokens": 60}))
    assert res.returncode == 2 and "max_tokens (60)" in res.stderr and res.stderr.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_vllm_subprocess_topk_matches_hf_forward(tiny_model_dir, tmp_path):
    """Real vLLM through the CLI entry: format, and its raw top-k log-probs agree with an HF forward pass."""
    out = tmp_path / "vllm"
    # 64 long prompts x 2 samples x 128 tokens in one shard: more prompt tokens than vLLM-CPU's per-step budget
    # (4096); with chunked prefill that crashed seeded requests ("CPU Generator does not use offset", VLLMEngine)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    prompts = tmp_path / "long.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(words[(i + j) % 10] for j in range(60 + i))}) + "\n"
                               for i in range(64)))
    cfg = GenerateConfig(engine="vllm", dtype="float32", prompts=str(prompts), chat="off", max_tokens=128,
                         max_model_len=512, topk_logprobs=5, n=2, shard_size=64)
    res = _cli("--model", str(tiny_model_dir), "--out", str(out), "--config", cfg.model_dump_json(),
               "--seed", "1", "--no-progress", env={**SUB_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"] == "vllm" and manifest["stats"]["engine_start_seconds"] > 0
    rows = _rows(out)
    assert len(rows) == manifest["stats"]["completions"] > 0
    model = load_model(tiny_model_dir)
    for r in rows[::8]:  # 16 of the 128 rows, from every part of the batch
        assert len(r["topk_ids"]) == len(r["completion_token_ids"]) and len(r["topk_ids"][0]) == 5
        logp = _hf_topk(model, r["prompt_token_ids"], r["completion_token_ids"], 5)
        stored = torch.tensor(r["topk_logprobs"], dtype=torch.float32)
        torch.testing.assert_close(logp.gather(1, torch.tensor(r["topk_ids"])), stored, atol=3e-2, rtol=0)
        torch.testing.assert_close(logp.topk(5, dim=-1).values, stored, atol=3e-2, rtol=0)


def test_package_import_is_light():
    code = ("import sys, compactlm.generation, compactlm.generation.dataset, compactlm.generation.__main__; "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'pyarrow', 'prefect', 'mlflow') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_vllm_cpu_env_is_scoped_and_respects_the_user(monkeypatch):
    from compactlm.generation.engines import vllm_cpu_env

    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    with vllm_cpu_env():
        assert os.environ["TORCH_COMPILE_DISABLE"] == "1" and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert "TORCH_COMPILE_DISABLE" not in os.environ and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"


# ------------------------------------------------------------------------------------- inputs and templates


def test_prompt_sources_and_template(tmp_path):
    """jsonl / csv / parquet / save_to_disk dir give the same prompts; a template builds them from fields."""
    import datasets

    from compactlm.generation.prompts import load_prompts

    rows = [{"instruction": "Translate to French", "input": "good morning"},
            {"instruction": "Name three colors.", "input": ""},
            {"instruction": "Summarize", "input": None}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text("instruction,input\nTranslate to French,good morning\nName three colors.,\n"
                                    "Summarize,\n")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    tpl = "{instruction}\n\n{input}"
    expect = ["Translate to French\n\ngood morning", "Name three colors.", "Summarize"]
    for src in ("p.jsonl", "p.parquet", "p.csv", "saved"):
        assert load_prompts(str(tmp_path / src), template=tpl) == expect, src
        assert load_prompts(str(tmp_path / src), "instruction", max_prompts=2) == [r["instruction"] for r in rows[:2]]
    with pytest.raises(ValueError, match=r"row 0 has no field 'question' used by generate.template.*'input'"):
        load_prompts(str(tmp_path / "p.jsonl"), template="{question}")
    with pytest.raises(ValueError, match="row 1: the prompt is empty"):
        load_prompts(str(tmp_path / "p.jsonl"), "input")
    # a template may only read fields: no attribute / index access, caught when the recipe is validated
    with pytest.raises(ValueError, match="not allowed"):
        GenerateConfig(template="{instruction.__class__}")


def test_hf_dataset_offline_names_the_alternatives(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    cfg = GenerateConfig(**FAST, prompts="hf:compactlm-test/does-not-exist")
    with pytest.raises(ValueError, match=r"cannot load dataset 'hf:compactlm-test/does-not-exist'.*offline.*"
                                         r"\.jsonl/\.json/\.csv/\.parquet file.*save_to_disk.*'builtin'"):
        generate_dataset(tiny_model_dir, cfg, out, progress=False)
    assert not out.exists()


def test_config_bad_values_name_the_field():
    from pydantic import ValidationError

    for kw, field in [({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"prompts": "x.txt"}, "prompts"),
                      ({"prompts": "hf:"}, "prompts"), ({"near_dup_threshold": 0}, "near_dup_threshold"),
                      ({"self_instruct": {"num_instructions": 0}}, "self_instruct.num_instructions"),
                      ({"self_instruct": {"min_words": 5, "max_words": 2}}, "self_instruct"),
                      ({"min_tokens": 5, "max_completion_tokens": 2}, "")]:
        with pytest.raises(ValidationError) as e:
            GenerateConfig(**kw)
        assert ".".join(map(str, e.value.errors()[0]["loc"])) == field, kw


# ------------------------------------------------------------------------------------------------- filters


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
    m = generate_dataset(tiny_model_dir, GenerateConfig(**planted, near_dup_threshold=0.7), tmp_path / "f",
                         progress=False)
    kept = {r["prompt_id"] for r in _rows(tmp_path / "f")}
    # 1: last word changed (near-dup of 0: Jaccard 16/18); 3: degenerate loop; 4: case/punctuation of 0 (exact dedup
    # normalizes case+whitespace only, so MinHash catches it); 6: empty. 5 paraphrases 0 loosely: kept.
    assert kept == {0, 2, 5, 7}
    assert m["stats"]["dropped"] == {"empty": 1, "truncated": 0, "min_tokens": 0, "max_tokens": 0,
                                     "repetition": 1, "duplicate": 0, "near_duplicate": 2}
    m = generate_dataset(tiny_model_dir, GenerateConfig(**planted, near_dup_threshold=None, max_repetition=None,
                                                        max_completion_tokens=20, drop_truncated=True),
                         tmp_path / "g", progress=False)
    d = m["stats"]["dropped"]
    tok = load_tokenizer(tiny_model_dir)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in PLANTED if t]
    assert max(lengths) < 40  # nothing truncated
    assert d == {"empty": 1, "truncated": 0, "min_tokens": 0, "max_tokens": sum(n > 20 for n in lengths),
                 "repetition": 0, "duplicate": 0, "near_duplicate": 0}
    assert 0 < d["max_tokens"] < len(lengths)
    m = generate_dataset(tiny_model_dir, GenerateConfig(**{**planted, "max_tokens": 20}, drop_truncated=True),
                         tmp_path / "t", progress=False)
    assert m["stats"]["dropped"]["truncated"] == sum(n >= 20 for n in lengths)


def test_filtering_is_deterministic_under_resume(planted, tiny_model_dir, tmp_path):
    """Near-dup state is rebuilt from finished shards: dropping the later shards and resuming = one run."""
    cfg = GenerateConfig(**{**planted, "shard_size": 2, "max_tokens": 20}, near_dup_threshold=0.7)
    ref = generate_dataset(tiny_model_dir, cfg, tmp_path / "ref", progress=False)
    assert ref["stats"]["dropped"]["truncated"] == 0 and ref["stats"]["finish_reasons"]["length"] > 0
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", out)
    (out / "manifest.json").unlink()
    for s in ("shard-00002.parquet", "shard-00003.parquet"):
        (out / "data" / s).unlink()
    m = generate_dataset(tiny_model_dir, cfg, out, progress=False)
    assert m["stats"]["resumed_shards"] == 2 and m["stats"]["dropped"] == ref["stats"]["dropped"]
    assert _rows(out) == _rows(tmp_path / "ref")


# --------------------------------------------------------------------------------------------- self-instruct

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
    rows = _rows(out)
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
    assert _rows(part) == _rows(out)
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


# ------------------------------------------------------------------------------------------------- MLflow


def test_mlflow_dataset_input_sample_table_and_stats(sampled, tmp_path):
    from compactlm.tracking import Tracker
    from tasks.generate import SAMPLE_ROWS, log_generated

    _, out, manifest = sampled
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "gen-test")
    run_id = tracker.start_run("generate")
    log_generated(tracker, run_id, out, manifest)
    tracker.end_run(run_id)
    run = tracker.client.get_run(run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == f"generated-{out.name}" and inp.tags[0].value == "training"
    assert json.loads(inp.dataset.profile)["num_rows"] == manifest["stats"]["completions"]
    metrics = run.data.metrics
    assert metrics["completions"] == manifest["stats"]["completions"] and "dropped.near_duplicate" in metrics
    assert metrics["completion_tokens_per_s"] > 0 and "dropped_total" in metrics
    # logged as an MLflow table (what the UI's artifact view renders); read back with the run's own client
    # (MlflowClient.load_table goes through the process-global tracking URI, which compactlm never sets)
    assert {"path": "samples.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    table = json.loads(Path(tracker.client.download_artifacts(run_id, "samples.json", str(tmp_path))).read_text())
    assert len(table["data"]) == min(SAMPLE_ROWS, manifest["stats"]["completions"])
    assert {"prompt", "completion", "finish_reason", "completion_tokens"} <= set(table["columns"])
