"""Packing and corpora: a plain-text corpus becomes a trainable dataset."""

from __future__ import annotations

import pytest

from compactlm.distillation import distill
from tests.helpers import kd_cfg as cfg


def test_corpus_dataset_makes_plain_text_trainable(teacher_dir, student_dir, tmp_path):
    """A plain-text corpus becomes a dataset in the generated format (empty prompts, every token in the loss)
    that distill fine-tunes on with CE; bad input fails early and writes nothing."""
    from compactlm.datasets import corpus_dataset
    from compactlm.formats.generated import iter_examples

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog number {i}."
                                for i in range(200)))
    out = tmp_path / "corpus"
    m = corpus_dataset(text, student_dir, out, max_tokens=700, seed=3, doc_tokens=8)
    ex = list(iter_examples(out))
    assert m["stats"]["tokens"] == 700 == sum(len(ids) for ids, _ in ex)
    assert all(len(ids) <= 8 and mask == [1] * len(ids) for ids, mask in ex)
    again = tmp_path / "again"
    corpus_dataset(text, student_dir, again, max_tokens=700, seed=3, doc_tokens=8)
    assert list(iter_examples(again)) == ex  # seeded
    res = distill(teacher_dir, student_dir, out, cfg(steps=4, kd_weight=0.0), tmp_path / "ft", seed=0)
    # every position but each row's first predicts a next token that counts in the loss
    assert res["loss_tokens"] == res["tokens"] - res["tokens"] // 32 and res["loss"] < res["initial_loss"]
    with pytest.raises(ValueError, match="max_tokens"):
        corpus_dataset(text, student_dir, tmp_path / "bad", max_tokens=0)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        corpus_dataset(tmp_path / "empty.txt", student_dir, tmp_path / "bad", max_tokens=10)
    assert not (tmp_path / "bad").exists()
