"""Evaluation stage: lm-eval parity, scripted LMs, perplexity, validation, metrics and the comparison table."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

from compactlm.config import EvalConfig
from compactlm.evaluation import (
    RecoveryError,
    check_recovery,
    check_tasks,
    compare_rows,
    compare_table,
    evaluate_lm,
    evaluate_model,
    flat_metrics,
    kept_fraction,
    local_task_names,
)
from compactlm.evaluation.registry import BUILTIN_HELDOUT, TASKS_DIR, build_task_configs

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

FACTS = TASKS_DIR / "compactlm_facts.jsonl"
MLFLOW_NAME = re.compile(r"^[A-Za-z0-9_\-./: ]+$")


def _facts() -> list[dict]:
    return [json.loads(line) for line in FACTS.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- validation (no model, no lm-eval)


def test_check_tasks_shipped_names_fast_and_listed():
    t0 = time.perf_counter()
    assert check_tasks(EvalConfig()) == ["compactlm_facts"]
    assert time.perf_counter() - t0 < 1.0
    assert {"compactlm_facts", "compactlm_arc_easy", "compactlm_piqa"} <= set(local_task_names())


@pytest.mark.parametrize("name", ["compactlm_nope", "bad name!"])
def test_unknown_task_lists_shipped_tasks(name):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"unknown task .*compactlm_facts"):
        check_tasks(EvalConfig(tasks=[name]))
    assert time.perf_counter() - t0 < 1.0  # never indexes lm-eval's default task folders


def test_bad_input_fails_before_model_load(tmp_path):
    missing_model = tmp_path / "no-model-here"  # would fail differently if the model were loaded first
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_model(missing_model, EvalConfig(tasks=["compactlm_nope"]))
    with pytest.raises(ValueError, match="limit"):
        EvalConfig(limit=0)
    with pytest.raises(ValueError, match="eval.limit must be >= 1"):  # bypassing pydantic still fails early
        evaluate_model(missing_model, EvalConfig.model_construct(**{**EvalConfig().model_dump(), "limit": 0}))
    with pytest.raises(ValueError, match="eval.data_dir"):
        evaluate_model(missing_model, EvalConfig(tasks=["compactlm_arc_easy"], data_dir=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="listed twice"):
        check_tasks(EvalConfig(tasks=["compactlm_facts", "compactlm_facts"]))
    with pytest.raises(ValueError, match="not an HF model directory"):
        evaluate_model(missing_model, EvalConfig(perplexity=False))


# ---------------------------------------------------------------- scripted LMs through the shipped task


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


# ---------------------------------------------------------------- real model: parity with lm-eval itself


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
    assert set(r) == {"tasks", "perplexity", "speed", "backend", "params", "size_bytes", "seconds", "lm_eval"}
    assert r["backend"] == "hf"
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


# ---------------------------------------------------------------- metrics and table (pure)


def _result(acc, acc_norm, ppl, params=1_000_000, size=4_000_000, task="compactlm_facts"):
    metrics = {"acc": acc, "acc_stderr": None}
    if acc_norm is not None:
        metrics["acc_norm"] = acc_norm
    return {"tasks": {task: metrics},
            "perplexity": {"word_perplexity": ppl, "byte_perplexity": 2.0, "bits_per_byte": 1.0} if ppl else None,
            "params": params, "size_bytes": size, "seconds": 1.5, "lm_eval": {}}


def test_flat_metrics_names_are_stable_and_mlflow_safe(tiny_result):
    flat = flat_metrics(tiny_result)
    assert {"compactlm_facts/acc", "compactlm_facts/acc_norm", "perplexity/word_perplexity",
            "perplexity/token_perplexity", "params", "size_bytes", "size_mb", "tok_s", "eval_seconds"} <= set(flat)
    assert "compactlm_facts/acc_stderr" not in flat  # None ("N/A") is dropped
    assert all(MLFLOW_NAME.match(k) and isinstance(v, float) for k, v in flat.items())
    other = flat_metrics(_result(0.5, 0.6, 12.0))
    assert set(other) <= set(flat)  # a different run yields the same names
    assert flat_metrics({"tasks": {"grp,x": {"acc": float("nan"), "f1": 1.0}}}) == {"grp_x/f1": 1.0}


def test_compare_table_on_hand_made_results():
    results = {
        "teacher": _result(0.60, 0.80, 10.0, params=134_515_008, size=538_090_408),
        "pruned": _result(0.30, 0.40, 40.0, params=50_000_000, size=200_000_000),
        "student": {**_result(0.45, 0.60, 20.0, params=50_000_000, size=200_000_000)},
    }
    table = compare_table(results)
    lines = table.strip().splitlines()
    assert lines[0] == "| model | params | size MB | compactlm_facts (acc_norm) | word ppl ↓ | % of teacher kept |"
    assert lines[2] == "| teacher | 134.5M | 538.1 | 0.800 | 10.00 | 100.0 |"
    # pruned: mean(0.40/0.80, 10/40) = 0.375 ; student: mean(0.60/0.80, 10/20) = 0.625
    assert lines[3] == "| pruned | 50.0M | 200.0 | 0.400 | 40.00 | 37.5 |"
    assert lines[4] == "| student | 50.0M | 200.0 | 0.600 | 20.00 | 62.5 |"
    assert kept_fraction(results["student"], results["teacher"]) == pytest.approx(0.625)

    # acc when acc_norm is absent; no perplexity column when nobody has one; unknown reference -> dashes.
    t2 = compare_table({"a": _result(0.5, None, None, task="boolq"), "b": _result(0.25, None, None, task="boolq")},
                       reference="a").strip().splitlines()
    assert t2[0] == "| model | params | size MB | boolq (acc) | % of a kept |"
    assert t2[3].endswith("| 0.250 | 50.0 |")
    t3 = compare_table({"x": _result(0.5, 0.5, 5.0)}, reference="teacher").strip().splitlines()
    assert t3[2].endswith("| — |")
    with pytest.raises(ValueError, match="empty"):
        compare_table({})


# ---------------------------------------------------------------- real benchmark copies (data_dir)

_EXPECTED_DOCS = {"compactlm_arc_easy": 2376, "compactlm_arc_challenge": 1172, "compactlm_piqa": 1838,
                  "compactlm_hellaswag": 10042, "compactlm_winogrande": 1267, "compactlm_boolq": 3270,
                  "compactlm_openbookqa": 500, "compactlm_lambada_openai": 5153}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="benchmark copies (shared/data) not present")
def test_benchmark_tasks_load_and_render_like_lm_eval():
    from lm_eval.tasks import TaskManager

    cfg = EvalConfig(tasks=list(_EXPECTED_DOCS), data_dir=str(SHARED_DATA), perplexity=False)
    assert check_tasks(cfg) == list(_EXPECTED_DOCS)
    loaded = TaskManager(include_defaults=False).load(build_task_configs(cfg, list(_EXPECTED_DOCS)))["tasks"]
    for name, n in _EXPECTED_DOCS.items():
        task = loaded[name]
        docs = list(task.eval_docs)
        assert len(docs) == n, name
        doc = docs[0]
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            target = task.doc_to_target(doc)
            assert len(choices) >= 2
            if name == "compactlm_winogrande":  # partial scoring: target is the continuation text
                assert isinstance(task.doc_to_text(doc), int) and isinstance(target, str)
            else:
                assert 0 <= int(target) < len(choices), name
    arc = list(loaded["compactlm_arc_easy"].eval_docs)[0]
    assert loaded["compactlm_arc_easy"].doc_to_text(arc) == f"Question: {arc['question']}\nAnswer:"
    piqa = list(loaded["compactlm_piqa"].eval_docs)[1]
    assert piqa["goal"] == "dresser" and piqa["label"] == 1  # labels joined line by line
    assert loaded["compactlm_piqa"].doc_to_choice(piqa) == [piqa["sol1"], piqa["sol2"]]
    boolq = list(loaded["compactlm_boolq"].eval_docs)[0]
    text = loaded["compactlm_boolq"].doc_to_text(boolq)
    assert not text.startswith("Passage:") and text.endswith("?\nAnswer:") and "\nQuestion: " in text


# ---------------------------------------------------------------- speed column, quality gate, config, CLI


def _with_speed(result, tok_s):
    return {**result, "speed": {"tok_s": tok_s, "seconds": 256 / tok_s, "tokens": 256}}


def test_table_has_tok_s_column_when_measured():
    results = {"teacher": _with_speed(_result(0.60, 0.80, 10.0, params=134_515_008, size=538_090_408), 120.0),
               "student": _result(0.45, 0.60, 20.0, params=50_000_000, size=200_000_000)}  # not measured
    lines = compare_table(results).strip().splitlines()
    assert lines[0] == ("| model | params | size MB | tok/s ↑ | compactlm_facts (acc_norm) | word ppl ↓ "
                        "| % of teacher kept |")
    assert lines[2] == "| teacher | 134.5M | 538.1 | 120.0 | 0.800 | 10.00 | 100.0 |"
    assert lines[3] == "| student | 50.0M | 200.0 | — | 0.600 | 20.00 | 62.5 |"
    header, rows = compare_rows(results)
    assert header[3] == "tok/s ↑" and rows[0][3] == "120.0" and len(rows) == 2
    assert flat_metrics(results["teacher"])["tok_s"] == 120.0 and "tok_s" not in flat_metrics(results["student"])


def test_check_recovery_gate():
    results = {"teacher": _result(0.60, 0.80, 10.0), "pruned": _result(0.30, 0.40, 40.0),
               "student": _result(0.45, 0.60, 20.0)}  # student keeps 0.625 (see the table test)
    assert check_recovery(results, None) is None
    assert check_recovery(results, 0.6) is None
    assert check_recovery(results, 0.625) is None  # the threshold itself passes
    with pytest.raises(RecoveryError, match=r"kept 62\.5% of teacher, below eval.min_recovery = 70\.0%") as e:
        check_recovery(results, 0.7)
    assert compare_table(results) in str(e.value)  # the whole table is in the message
    assert e.value.recovery == pytest.approx(0.625) and e.value.min_recovery == 0.7
    # Nothing comparable (different tasks, no perplexity): the gate cannot pass.
    odd = {"teacher": _result(0.5, None, None, task="a"), "student": _result(0.5, None, None, task="b")}
    with pytest.raises(RecoveryError, match="nothing|no task"):
        check_recovery(odd, 0.1)
    with pytest.raises(ValueError, match=r"min_recovery must be a fraction in \[0, 1\]"):
        check_recovery(results, 1.5)
    with pytest.raises(ValueError, match="lack.*student"):
        check_recovery({"teacher": results["teacher"]}, 0.5)
    # The gate is about the student row whatever the dict order.
    assert check_recovery({"student": results["student"], "teacher": results["teacher"]}, 0.6) is None


def test_eval_config_new_fields():
    cfg = EvalConfig()
    assert (cfg.backend, cfg.speed, cfg.min_recovery) == ("hf", True, None)
    assert EvalConfig(backend="vllm", min_recovery=0.8).min_recovery == 0.8
    for bad in ({"backend": "tgi"}, {"min_recovery": 1.2}, {"min_recovery": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EvalConfig(**bad)


def test_generation_speed_is_fixed_work_and_rejects_bad_input(tiny_model_dir):
    from compactlm.evaluation.speed import generation_speed
    from compactlm.models import load_model, load_tokenizer

    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    s = generation_speed(model, tok, prompts=3, new_tokens=5, batch_size=2, repeats=1)
    assert s["tokens"] == 15 and s["tok_s"] > 0  # exactly new_tokens per prompt, even across an EOS
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        generation_speed(model, tok, new_tokens=0)


def test_evaluation_cli_bad_input_exits_2(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------- vLLM backend (real engine, slow)


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


# ---------------------------------------------------------------- the evaluate task: artifacts and gate (Prefect)


@pytest.mark.integration
def test_evaluate_task_gate_logs_then_fails_without_retry(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    import tasks.evaluate as te
    from compactlm.tracking import Tracker
    from tasks.common import RunContext

    dirs = {}
    for label in ("teacher", "pruned", "student"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "config.json").write_text("{}")
        dirs[label] = str(tmp_path / label)
    fake = {dirs["teacher"]: _with_speed(_result(0.60, 0.80, 10.0), 100.0),
            dirs["pruned"]: _with_speed(_result(0.30, 0.40, 40.0), 150.0),
            dirs["student"]: _with_speed(_result(0.45, 0.60, 20.0), 150.0)}  # keeps 62.5%
    monkeypatch.setattr(te, "_evaluate_cached", lambda ctx, d, cfg: fake[d])
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "gate-test", artifact_root=str(tmp_path / "art"))
    parent = tracker.start_run("pipeline")
    ctx = RunContext(workdir=str(tmp_path / "work"), tracking_uri=tracker.tracking_uri, experiment="gate-test",
                     parent_run_id=parent)

    @flow
    def run_eval(cfg: EvalConfig) -> str:
        return te.evaluate(ctx, dirs, cfg)

    with prefect_test_harness(server_startup_timeout=300):  # a loaded 2-core CI box starts it slowly
        with pytest.raises(RecoveryError) as err:
            run_eval(EvalConfig(min_recovery=0.7))
        out = run_eval(EvalConfig(min_recovery=0.6))  # passes; same per-model results

    expected = compare_table({label: fake[d] for label, d in dirs.items()})
    assert expected in str(err.value)
    assert (Path(out) / "comparison.md").read_text().strip() == expected.strip()
    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("gate-test").experiment_id],
                              filter_string="tags.`compactlm.stage` = 'evaluate'",
                              order_by=["attributes.start_time ASC"])
    assert len(runs) == 2  # one per flow run: the failed gate was not retried
    failed, passed = runs
    assert failed.info.status == "FINISHED" and failed.data.tags["compactlm.quality_gate"] == "failed"
    assert passed.data.tags["compactlm.quality_gate"] == "passed"
    assert failed.data.metrics["student_recovery"] == pytest.approx(0.625)
    assert failed.data.metrics["teacher/tok_s"] == 100.0
    assert {a.path for a in client.list_artifacts(failed.info.run_id)} >= {"results.json", "comparison.md"}
