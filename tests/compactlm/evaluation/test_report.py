"""The comparison table and the quality gate, on hand-made results."""

from __future__ import annotations

import pytest

from compactlm.evaluation import (
    RecoveryError,
    check_recovery,
    compare_rows,
    compare_table,
    flat_metrics,
    kept_fraction,
)
from tests.helpers import fake_result, with_speed


def test_compare_table_on_hand_made_results():
    results = {
        "teacher": fake_result(0.60, 0.80, 10.0, params=134_515_008, size=538_090_408),
        "pruned": fake_result(0.30, 0.40, 40.0, params=50_000_000, size=200_000_000),
        "student": {**fake_result(0.45, 0.60, 20.0, params=50_000_000, size=200_000_000)},
    }
    table = compare_table(results)
    lines = table.strip().splitlines()
    assert lines[-1].startswith("size MB: weights on disk;") and "% kept = mean over the tasks" in lines[-1]
    assert lines[0] == "| model | params | size MB | compactlm_facts (acc_norm) | word ppl ↓ | % of teacher kept ↑ |"
    assert lines[2] == "| teacher | 134.5M | 538.1 | 0.800 | 10.00 | 100.0 |"
    # pruned: mean(0.40/0.80, 10/40) = 0.375 ; student: mean(0.60/0.80, 10/20) = 0.625
    assert lines[3] == "| pruned | 50.0M | 200.0 | 0.400 | 40.00 | 37.5 |"
    assert lines[4] == "| student | 50.0M | 200.0 | 0.600 | 20.00 | 62.5 |"
    assert kept_fraction(results["student"], results["teacher"]) == pytest.approx(0.625)

    # acc when acc_norm is absent; no perplexity column when nobody has one; unknown reference -> dashes.
    t2 = compare_table({"a": fake_result(0.5, None, None, task="boolq"),
                        "b": fake_result(0.25, None, None, task="boolq")}, reference="a").strip().splitlines()
    assert t2[0] == "| model | params | size MB | boolq (acc) | % of a kept ↑ |"
    assert t2[3].endswith("| 0.250 | 50.0 |")
    t3 = compare_table({"x": fake_result(0.5, 0.5, 5.0)}, reference="teacher").strip().splitlines()
    assert t3[2].endswith("| — |")
    with pytest.raises(ValueError, match="empty"):
        compare_table({})


def test_table_has_tok_s_column_when_measured():
    results = {"teacher": with_speed(fake_result(0.60, 0.80, 10.0, params=134_515_008, size=538_090_408), 120.0),
               "student": fake_result(0.45, 0.60, 20.0, params=50_000_000, size=200_000_000)}  # not measured
    lines = compare_table(results).strip().splitlines()
    assert lines[0] == ("| model | params | size MB | tok/s ↑ | compactlm_facts (acc_norm) | word ppl ↓ "
                        "| % of teacher kept ↑ |")
    assert lines[2] == "| teacher | 134.5M | 538.1 | 120.0 | 0.800 | 10.00 | 100.0 |"
    assert lines[3] == "| student | 50.0M | 200.0 | — | 0.600 | 20.00 | 62.5 |"
    header, rows = compare_rows(results)
    assert header[3] == "tok/s ↑" and rows[0][3] == "120.0" and len(rows) == 2
    assert flat_metrics(results["teacher"])["tok_s"] == 120.0 and "tok_s" not in flat_metrics(results["student"])


def test_kept_counts_only_what_is_above_chance():
    teacher, student = fake_result(0.60, 0.70, None), fake_result(0.40, 0.40, None)
    assert kept_fraction(student, teacher) == pytest.approx(0.40 / 0.70)  # chance unknown: plain ratio
    for r in (teacher, student):
        r["tasks"]["compactlm_facts"]["chance"] = 0.25  # 4 choices
    assert kept_fraction(student, teacher) == pytest.approx((0.40 - 0.25) / (0.70 - 0.25))
    guesser = fake_result(0.25, 0.25, None)
    assert kept_fraction(guesser, teacher) == pytest.approx(0.0)
    teacher["tasks"]["compactlm_facts"]["acc_norm"] = 0.25  # a teacher at chance has nothing to keep
    assert kept_fraction(student, teacher) is None


def test_side_by_side_speed_columns():
    results = {label: fake_result(0.6, 0.8, 10.0) for label in ("teacher", "student")}
    for label, (b1, b8) in {"teacher": (20.0, 90.0), "student": (35.5, 150.0)}.items():
        results[label]["speed"] = {"tok_s": b1, "tok_s_b1": b1, "tok_s_batch": b8, "batch_size": 8,
                                   "new_tokens": 16, "repeats": 3}
    lines = compare_table(results).strip().splitlines()
    assert lines[0].startswith("| model | params | size MB | decode tok/s b1 ↑ | decode tok/s b8 ↑ |")
    assert lines[3].startswith("| student | 1.0M | 4.0 | 35.5 | 150.0 |")
    assert "16 tokens per prompt at batch 1 and at batch 8" in lines[-1]
    assert "median of 3 rounds with the models interleaved" in lines[-1]


def test_check_recovery_gate():
    results = {"teacher": fake_result(0.60, 0.80, 10.0), "pruned": fake_result(0.30, 0.40, 40.0),
               "student": fake_result(0.45, 0.60, 20.0)}  # student keeps 0.625 (see the table test)
    assert check_recovery(results, None) is None
    assert check_recovery(results, 0.6) is None
    assert check_recovery(results, 0.625) is None  # the threshold itself passes
    with pytest.raises(RecoveryError, match=r"kept 62\.5% of teacher, below eval.min_recovery = 70\.0%") as e:
        check_recovery(results, 0.7)
    assert compare_table(results) in str(e.value)  # the whole table is in the message
    assert e.value.recovery == pytest.approx(0.625) and e.value.min_recovery == 0.7
    # Nothing comparable (different tasks, no perplexity): the gate cannot pass.
    odd = {"teacher": fake_result(0.5, None, None, task="a"), "student": fake_result(0.5, None, None, task="b")}
    with pytest.raises(RecoveryError, match="nothing|no task"):
        check_recovery(odd, 0.1)
    with pytest.raises(ValueError, match=r"min_recovery must be a fraction in \[0, 1\]"):
        check_recovery(results, 1.5)
    with pytest.raises(ValueError, match="lack.*student"):
        check_recovery({"teacher": results["teacher"]}, 0.5)
    # The gate is about the student row whatever the dict order.
    assert check_recovery({"student": results["student"], "teacher": results["teacher"]}, 0.6) is None
