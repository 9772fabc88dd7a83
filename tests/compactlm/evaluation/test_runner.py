"""Scoring models: an oracle and a constant LM, lm-eval parity, perplexity by hand, speed, the command line and the
vLLM backend."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

from compactlm.config import EvalConfig
from compactlm.evaluation import (
    evaluate_lm,
    evaluate_model,
    flat_metrics,
)
from compactlm.evaluation.registry import BUILTIN_HELDOUT, TASKS_DIR
from tests.helpers import REPO, fake_result

FACTS = TASKS_DIR / "compactlm_facts.jsonl"


MLFLOW_NAME = re.compile(r"^[A-Za-z0-9_\-./: ]+$")


def _facts() -> list[dict]:
    return [json.loads(line) for line in FACTS.read_text().splitlines() if line.strip()]


def _scripted_lm(pick):
    """An lm-eval LM that scores the choice `pick(question_row)` 0.0 and every other choice -10.0."""
    from lm_eval.api.model import LM

    by_context = {f"Question: {r['question']}\nAnswer:": r for r in _facts()}

    class Scripted(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            out = []
            for req in requests:
                context, continuation = req.args
                row = by_context[context]  # KeyError = the task renders prompts differently than specified
                chosen = " " + row["choices"][pick(row)]
                out.append((0.0, True) if continuation == chosen else (-10.0, False))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return Scripted()


def test_oracle_lm_scores_one_and_constant_lm_scores_chance():
    cfg = EvalConfig(perplexity=False)
    rows = _facts()
    assert len(rows) == 100
    oracle = evaluate_lm(_scripted_lm(lambda r: r["answer"]), cfg)
    assert oracle["tasks"]["compactlm_facts"]["acc"] == 1.0
    assert oracle["tasks"]["compactlm_facts"]["acc_norm"] == 1.0
    assert oracle["perplexity"] is None
    assert oracle["lm_eval"]["n-samples"]["compactlm_facts"]["effective"] == 100

    first = evaluate_lm(_scripted_lm(lambda r: 0), cfg)["tasks"]["compactlm_facts"]["acc"]
    expected = sum(r["answer"] == 0 for r in rows) / len(rows)
    assert first == pytest.approx(expected)
    assert abs(first - 0.25) < 0.1  # answers are balanced: a constant guesser is at chance

    limited = evaluate_lm(_scripted_lm(lambda r: r["answer"]), EvalConfig(perplexity=False, limit=7))
    assert limited["lm_eval"]["n-samples"]["compactlm_facts"]["effective"] == 7


@pytest.fixture(scope="module")
def tiny_result(tiny_model_dir):
    return evaluate_model(tiny_model_dir, EvalConfig(limit=20, batch_size=8), seed=0)


def test_scores_equal_direct_simple_evaluate(tiny_model_dir, tiny_result):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from compactlm.models import load_model, load_tokenizer

    # The task as the brief specifies it, written independently of the shipped YAML.
    task = {
        "task": "facts_direct", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(FACTS)}},
        "output_type": "multiple_choice", "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }
    lm = HFLM(pretrained=load_model(tiny_model_dir), tokenizer=load_tokenizer(tiny_model_dir), batch_size=8,
              max_length=512)
    direct = simple_evaluate(model=lm, tasks=[task], limit=20, num_fewshot=0, bootstrap_iters=0, log_samples=False,
                             task_manager=TaskManager(include_defaults=False))["results"]["facts_direct"]
    ours = tiny_result["tasks"]["compactlm_facts"]
    assert ours["acc"] == pytest.approx(direct["acc,none"], abs=1e-12)
    assert ours["acc_norm"] == pytest.approx(direct["acc_norm,none"], abs=1e-12)
    assert ours["acc_stderr"] is None and direct["acc_stderr,none"] == "N/A"


def test_result_shape_and_perplexity_matches_manual(tiny_model_dir, tiny_result):
    import torch

    from compactlm.models import count_params, load_model, load_tokenizer

    r = tiny_result
    assert set(r) == {"tasks", "perplexity", "speed", "backend", "params", "size_bytes", "max_length", "seconds",
                      "lm_eval"}
    assert r["backend"] == "hf"
    # eval.max_length unset: the model's own context (the tiny model's 2048), so long contexts are not truncated
    assert r["max_length"] == 2048 == json.loads((Path(tiny_model_dir) / "config.json").read_text())[
        "max_position_embeddings"]
    assert r["speed"]["tokens"] == 8 * 32 and r["speed"]["batch_size"] == 8 and r["speed"]["tok_s"] > 0
    assert r["speed"]["tok_s"] == pytest.approx(r["speed"]["tokens"] / r["speed"]["seconds"])
    json.dumps(r)  # JSON-serialisable, including the raw lm-eval part
    assert set(r["lm_eval"]) >= {"results", "configs", "versions", "n-samples"}
    assert not any("," in k for m in r["tasks"].values() for k in m)
    model = load_model(tiny_model_dir)
    assert r["params"] == count_params(model)
    assert r["size_bytes"] == sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors")) > 0
    assert r["seconds"] > 0

    # Independent perplexity: each paragraph scored in one window after the BOS token (all fit in 512).
    tok = load_tokenizer(tiny_model_dir)
    docs = [p for p in BUILTIN_HELDOUT.read_text().split("\n\n") if p]
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    nll, n_tokens, n_words, n_bytes = 0.0, 0, 0, 0
    with torch.no_grad():
        for doc in docs:
            ids = tok(doc, add_special_tokens=False)["input_ids"]
            assert len(ids) < 512
            x = torch.tensor([[prefix] + ids])
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
            nll -= logp.gather(1, torch.tensor(ids)[:, None]).sum().item()
            n_tokens, n_words, n_bytes = n_tokens + len(ids), n_words + len(re.split(r"\s+", doc)), \
                n_bytes + len(doc.encode())
    ppl = r["perplexity"]
    assert ppl["word_perplexity"] == pytest.approx(math.exp(nll / n_words), rel=1e-3)
    assert ppl["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-3)
    assert ppl["token_perplexity"] == pytest.approx(math.exp(nll / n_tokens), rel=1e-3)
    # A random model is close to uniform over the 49,152-token vocabulary.
    assert 0.5 * len(tok) < ppl["token_perplexity"] < 2 * len(tok)
    assert r["lm_eval"]["n-samples"]["compactlm_heldout"]["effective"] == len(docs)  # never limited


def test_flat_metrics_names_are_stable_and_mlflow_safe(tiny_result):
    flat = flat_metrics(tiny_result)
    assert {"compactlm_facts/acc", "compactlm_facts/acc_norm", "perplexity/word_perplexity",
            "perplexity/token_perplexity", "params", "size_bytes", "size_mb", "tok_s", "eval_seconds"} <= set(flat)
    assert "compactlm_facts/acc_stderr" not in flat  # None ("N/A") is dropped
    assert all(MLFLOW_NAME.match(k) and isinstance(v, float) for k, v in flat.items())
    other = flat_metrics(fake_result(0.5, 0.6, 12.0))
    assert set(other) <= set(flat)  # a different run yields the same names
    assert flat_metrics({"tasks": {"grp,x": {"acc": float("nan"), "f1": 1.0}}}) == {"grp_x/f1": 1.0}


def test_generation_speed_is_fixed_work_and_rejects_bad_input(tiny_model_dir):
    from compactlm.evaluation.speed import generation_speed
    from compactlm.models import load_model, load_tokenizer

    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    s = generation_speed(model, tok, prompts=3, new_tokens=5, batch_size=2, repeats=1)
    assert s["tokens"] == 15 and s["tok_s"] > 0  # exactly new_tokens per prompt, even across an EOS
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        generation_speed(model, tok, new_tokens=0)


def test_compare_speeds_interleaves_rounds_and_reports_medians(tiny_model_dir, monkeypatch):
    import statistics

    from compactlm.evaluation import speed

    calls = []
    real = speed._decode_tok_s
    monkeypatch.setattr(speed, "_decode_tok_s", lambda m, t, b, n: calls.append((id(m), b, n)) or real(m, t, b, n))
    out = speed.compare_speeds({"a": tiny_model_dir, "b": tiny_model_dir}, repeats=3, batch=4, new_tokens=3)
    assert set(out) == {"a", "b"}
    for s in out.values():
        assert len(s["runs_b1"]) == len(s["runs_batch"]) == 3 and s["batch_size"] == 4
        assert s["tok_s"] == s["tok_s_b1"] == statistics.median(s["runs_b1"]) > 0
        assert s["tok_s_batch"] == statistics.median(s["runs_batch"]) > 0
    timed = [c for c in calls if c[2] == 3]  # warm-ups generate 2 tokens
    assert len(timed) == 12 and [b for _, b, _ in timed] == [1, 4] * 6
    models = [m for m, b, _ in timed if b == 1]  # round 0: a b; round 1: b a; round 2: a b
    assert models[0] == models[3] == models[4] != models[1] == models[2] == models[5]
    with pytest.raises(ValueError, match="repeats"):
        speed.compare_speeds({"a": tiny_model_dir}, repeats=0)


def test_multiple_choice_tasks_report_their_chance_level(tiny_result):
    assert tiny_result["tasks"]["compactlm_facts"]["chance"] == pytest.approx(0.25)  # every fact has 4 choices


def test_evaluation_cli_bad_input_exits_2(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    repo = REPO
    out = tmp_path / "r.json"
    for config, needle in (('{"limit": 0}', "limit"), ('{"tasks": ["compactlm_nope"]}', "unknown task")):
        proc = subprocess.run([sys.executable, "-m", "compactlm.evaluation", "--model", str(tiny_model_dir),
                               "--config", config, "--out", str(out)], capture_output=True, text=True, cwd=repo,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and needle in proc.stderr
        assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_vllm_backend_validates_before_spawning(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="not an HF model directory"):
        evaluate_model(tmp_path, EvalConfig(backend="vllm", perplexity=False))
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_model(tmp_path, EvalConfig(backend="vllm", tasks=["compactlm_nope"]))
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.long(20)
@pytest.mark.integration
def test_vllm_backend_matches_hf_on_facts(tiny_model_dir, tiny_result):
    cfg = EvalConfig(limit=20, batch_size=8, backend="vllm", dtype="float32")
    r = evaluate_model(tiny_model_dir, cfg, seed=0)
    assert r["backend"] == "vllm" and r["params"] == tiny_result["params"]
    assert r["size_bytes"] == tiny_result["size_bytes"] and r["speed"]["tokens"] == 256
    assert r["lm_eval"]["n-samples"]["compactlm_facts"]["effective"] == 20
    hf, vl = tiny_result["tasks"]["compactlm_facts"], r["tasks"]["compactlm_facts"]
    # Same choices up to float noise on a random model: at most 2 of 20 questions flip.
    assert abs(hf["acc"] - vl["acc"]) <= 0.1 and abs(hf["acc_norm"] - vl["acc_norm"]) <= 0.1
    hp, vp = tiny_result["perplexity"], r["perplexity"]
    assert vp["word_perplexity"] == pytest.approx(hp["word_perplexity"], rel=0.02)
    assert vp["token_perplexity"] == pytest.approx(hp["token_perplexity"], rel=0.02)
