"""The parent run's key metrics: named for MLflow's chart view, computed from the evaluation results."""

from __future__ import annotations

import pytest

from tasks.summary import key_metrics


def _result(acc: float, acc_norm: float, ppl: float, params: int, tok_s: float | None) -> dict:
    return {"tasks": {"compactlm_arc_easy": {"acc": acc, "acc_norm": acc_norm},
                      "compactlm_piqa": {"acc": acc + 0.1}},
            "perplexity": {"word_perplexity": ppl}, "params": params,
            **({"speed": {"tok_s": tok_s}} if tok_s else {})}


def test_key_metrics_average_the_headline_metrics_and_compare_to_the_teacher():
    results = {"teacher": _result(0.5, 0.6, 50.0, 1000, 10.0), "pruned": _result(0.3, 0.35, 900.0, 600, None),
               "student": _result(0.4, 0.45, 120.0, 600, 15.0)}
    m = key_metrics(results)
    assert m["teacher/avg_acc"] == pytest.approx((0.6 + 0.6) / 2)  # acc_norm where a task has it, else acc
    assert m["student/avg_acc"] == pytest.approx((0.45 + 0.5) / 2) and m["student/word_ppl"] == 120.0
    assert m["student_param_fraction"] == 0.6 and m["student/speedup"] == pytest.approx(1.5)
    assert "pruned/speedup" not in m and "teacher_param_fraction" not in m
    assert m["student/compactlm_arc_easy/acc_norm"] == 0.45  # the flat metrics are kept too
