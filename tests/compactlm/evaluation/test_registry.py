"""Benchmark tasks: shipped names checked in milliseconds, bad input before any model loads, the benchmark copies
load like lm-eval's own tasks."""

from __future__ import annotations

import time

import pytest

from compactlm.config import EvalConfig
from compactlm.evaluation import (
    check_tasks,
    evaluate_model,
    local_task_names,
)
from compactlm.evaluation.registry import TASKS_DIR, build_task_configs
from tests.helpers import SHARED_DATA

FACTS = TASKS_DIR / "compactlm_facts.jsonl"


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
