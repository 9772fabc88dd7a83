"""A student with another tokenizer and another family: aligned positions, ULD training, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from compactlm.artifacts import is_complete, read_manifest
from compactlm.distillation import DistillError, distill
from compactlm.distillation.crosstok import aligned_positions, cross_tokenizer_rows, token_starts
from compactlm.formats.generated import read_rows
from compactlm.models import load_model, load_tokenizer
from tests.helpers import kd_cfg as cfg


def test_token_starts_ignore_leading_spaces_and_aligned_pairs_share_a_start(other_tokenizer_dir, student_dir):
    s_tok, t_tok = load_tokenizer(other_tokenizer_dir), load_tokenizer(student_dir)
    text = "The river flows quietly, and everyone agrees."
    s_ids, s_starts = token_starts(text, s_tok)
    t_ids, t_starts = token_starts(text, t_tok)
    assert s_ids != t_ids and s_starts[0] == t_starts[0] == 0
    for starts in (s_starts, t_starts):  # every word start is a token start in both
        assert {i + 1 for i, ch in enumerate(text) if ch == " "} <= set(starts)
    # hand case: student tokens start at 0, 4, 10; teacher at 0, 2, 4, 10; prompts of 3 and 5 tokens
    pairs = aligned_positions(3, [0, 4, 10], 5, [0, 2, 4, 10])
    assert pairs == [(2, 4), (3, 6), (4, 7)]  # position p predicts token p + 1
    assert aligned_positions(0, [0, 4], 0, [0, 4]) == [(0, 0)]  # no predictor for a first token without prompt


def test_cross_tokenizer_rows_pair_positions_that_predict_the_same_character(other_tokenizer_dir, teacher_dir,
                                                                           data_dir):
    s_tok, t_tok = load_tokenizer(other_tokenizer_dir), load_tokenizer(teacher_dir)
    rows = read_rows(data_dir)
    data = cross_tokenizer_rows(rows, s_tok, t_tok, 64, seed=0)
    assert data.rows == len(rows) and data.teacher_ids.shape == (len(rows), 128)
    by_completion = {r["completion"]: r for r in rows}
    checked = 0
    for i in range(data.rows):
        ids = data.ids[i][data.ids[i] != 0].tolist()
        text = s_tok.decode(ids)
        row = next(r for c, r in by_completion.items() if c[:20] in text)
        start = len(row["prompt_token_ids"])
        assert data.teacher_ids[i, :start].tolist() == row["prompt_token_ids"]  # the teacher's exact prompt
        for s, t in zip(data.align_s[i].tolist(), data.align_t[i].tolist()):
            if s < 0:
                continue
            a = s_tok.decode([data.ids[i, s + 1].item()]).lstrip()
            b = t_tok.decode([data.teacher_ids[i, t + 1].item()]).lstrip()
            assert a[:1] == b[:1] or {a, b} & {s_tok.eos_token, t_tok.eos_token}, (a, b)
            assert data.mask[i, s + 1] == 1  # a compared position predicts a completion token
            checked += 1
    assert checked > 10 * data.rows  # most word starts are shared


def test_logit_kd_across_tokenizers_trains_the_student(teacher_dir, other_student_dir, data_dir, tmp_path):
    """Online KD into a Qwen2 with a 1,024-token BPE from the SmolLM2-vocabulary teacher: ULD + CE."""
    logged: list[dict] = []
    out = tmp_path / "student"
    summary = distill(teacher_dir, other_student_dir, data_dir, cfg(kd_weight=0.5, steps=8, seq_len=64, lr=3e-3),
                      out, seed=0, log_fn=lambda m, s: logged.append(m))
    uld = [m["kd_loss"] for m in logged]
    assert all(math.isfinite(x) and 0 <= x <= 2 for x in uld) and uld[-1] < uld[0], uld
    assert logged[-1]["ce_loss"] < logged[0]["ce_loss"]
    assert summary["loss"] == pytest.approx(0.5 * summary["ce_loss"] + 0.5 * summary["kd_loss"], rel=1e-5)
    manifest = read_manifest(out)
    assert is_complete(out) and manifest["retokenized"] and manifest["cross_tokenizer_kd"] == "uld"
    student = load_model(out)
    assert student.config.model_type == "qwen2" and student.config.vocab_size == 1024
    assert (out / "tokenizer.json").is_file() and len(load_tokenizer(out)) == 1024
    with torch.no_grad():
        assert torch.isfinite(student(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("kw, words", [
    (dict(mode="offline"), r"offline KD stores the teacher's top-k ids.*mode: online"),
    (dict(hidden_weight=1.0, kd_weight=0.5), r"hidden-state KD compares the two models token by token"),
    (dict(kd_weight=1.0), r"ULD.*kd_weight below 1"),
])
def test_what_cannot_work_across_tokenizers_fails_before_training(kw, words, teacher_dir, other_student_dir,
                                                                  data_dir, tmp_path):
    with pytest.raises(DistillError, match=words):
        distill(teacher_dir, other_student_dir, data_dir, cfg(**kw), tmp_path / "x")
    assert not (tmp_path / "x").exists()
