"""Offline KD: stored top-k log-probs match a teacher forward, survive packing, and train the student without loading
the teacher."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from compactlm.artifacts import is_complete
from compactlm.config import DistillConfig
from compactlm.distillation import DistillError, distill
from compactlm.distillation.losses import (
    kd_loss,
    topk_kd_loss,
)
from compactlm.formats.generated import read_rows
from compactlm.models import load_model, load_tokenizer
from tests.helpers import kd_cfg as cfg
from tests.helpers import texts, write_generated


@pytest.fixture(scope="module")
def topk_data_dir(teacher_dir, tmp_path_factory) -> Path:
    """The sharp tiny teacher answers 24 built-in prompts with HF generate, storing its top-20 log-probs."""
    from compactlm.config import GenerateConfig
    from compactlm.generation import generate_dataset

    out = tmp_path_factory.mktemp("gen-topk") / "ds"
    gc = GenerateConfig(engine="hf", topk_logprobs=20, max_prompts=24, max_tokens=24, n=1, shard_size=8,
                        filters=dict(min_tokens=1))
    generate_dataset(teacher_dir, gc, out, seed=0, progress=False)
    return out


def test_stored_topk_match_a_teacher_forward(topk_data_dir, teacher_dir):
    """Generation contract: topk row t is the teacher's distribution of completion token t (raw log-probs)."""

    teacher = load_model(teacher_dir)
    rows = read_rows(topk_data_dir)[:4]
    for r in rows:
        p, c = r["prompt_token_ids"], r["completion_token_ids"]
        with torch.no_grad():
            logp = F.log_softmax(teacher(torch.tensor([p + c])).logits[0].float(), -1)
        pred = logp[len(p) - 1:len(p) - 1 + len(c)]  # logits at t predict token t + 1
        ids, lps = torch.tensor(r["topk_ids"]), torch.tensor(r["topk_logprobs"], dtype=torch.float32)
        assert ids.shape == (len(c), 20)
        torch.testing.assert_close(pred.gather(-1, ids), lps, atol=3e-2, rtol=1e-2)


def test_packing_carries_topk_for_completion_positions(tmp_path, student_dir):
    """Synthetic top-k whose first id is the token itself: after packing, every completion position's target
    row must describe the token at that position; prompt positions carry filler and mask 0."""
    from compactlm.datasets import pack
    from compactlm.distillation.data import pack_with_topk
    from compactlm.formats.generated import iter_examples

    tok = load_tokenizer(student_dir)
    ds = write_generated(tmp_path / "ds", tok, texts(12), shard_rows=5)
    for shard in sorted((ds / "data").glob("*.parquet")):
        t = pq.read_table(shard)
        ids = [[[x, x + 1, x + 2] for x in row] for row in t.column("completion_token_ids").to_pylist()]
        lps = [[[-0.1, -2.5, -3.0] for _ in row] for row in ids]
        t = t.append_column("topk_ids", pa.array(ids, pa.list_(pa.list_(pa.int32()))))
        t = t.append_column("topk_logprobs", pa.array(lps, pa.list_(pa.list_(pa.float16()))))
        pq.write_table(t, shard)
    packed = pack_with_topk(ds, 16, seed=5)
    ref_ids, ref_mask = pack(list(iter_examples(ds)), 16, seed=5)
    assert torch.equal(packed.ids, ref_ids) and torch.equal(packed.mask, ref_mask)  # same rows as online
    on = packed.mask.bool()
    assert packed.topk_ids.shape == (*packed.ids.shape, 3) and packed.topk_logprobs.dtype == torch.float16
    assert torch.equal(packed.topk_ids[..., 0][on], packed.ids[on].int())
    assert torch.equal(packed.topk_ids[..., 2][on], packed.ids[on].int() + 2)
    assert (packed.topk_ids[~on] == 0).all()


def test_offline_loss_close_to_online_topk_loss_and_training_lowers_it(topk_data_dir, teacher_dir, student_dir,
                                                                        tmp_path):

    student, teacher = load_model(student_dir), load_model(teacher_dir)
    offline, online_topk, online_full = [], [], []
    for r in read_rows(topk_data_dir)[:6]:  # one example at a time: the context the teacher had
        p, c = r["prompt_token_ids"], r["completion_token_ids"]
        ids = torch.tensor([p + c])
        m = torch.tensor([[0] * (len(p) - 1) + [1] * len(c)], dtype=torch.bool)  # positions predicting c
        with torch.no_grad():
            s = student(ids).logits[:, :-1]
            t_logp = F.log_softmax(teacher(ids).logits[:, :-1].float(), -1)
        stored_ids = torch.zeros(1, len(p) + len(c) - 1, 20, dtype=torch.long)
        stored_lp = torch.zeros(1, len(p) + len(c) - 1, 20, dtype=torch.float16)
        stored_ids[0, len(p) - 1:] = torch.tensor(r["topk_ids"])
        stored_lp[0, len(p) - 1:] = torch.tensor(r["topk_logprobs"], dtype=torch.float16)
        lp, tk = t_logp.topk(20, dim=-1)
        offline.append(topk_kd_loss(s, stored_ids, stored_lp, m).item())
        online_topk.append(topk_kd_loss(s, tk, lp, m).item())
        online_full.append(kd_loss(s, t_logp, m).item())
    # differences: fp16 storage and batched (left-padded, cached) generation numerics only
    assert sum(offline) == pytest.approx(sum(online_topk), rel=0.02), (offline, online_topk)
    assert all(a <= b + 1e-5 for a, b in zip(online_topk, online_full))

    # a short offline run: the teacher is never loaded (its directory has no weights at all)
    stub = tmp_path / "teacher-stub"
    stub.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (stub / name).write_bytes((teacher_dir / name).read_bytes())
    logged: list[dict] = []
    summary = distill(stub, student_dir, topk_data_dir, cfg(mode="offline", steps=8, seq_len=64, temperature=1.0),
                      tmp_path / "off", seed=0, log_fn=lambda mm, st: logged.append(mm))
    assert logged[-1]["kd_loss"] < 0.9 * logged[0]["kd_loss"], [x["kd_loss"] for x in logged]
    assert summary["loss"] == pytest.approx(summary["kd_loss"]) and is_complete(tmp_path / "off")


def test_offline_mode_needs_topk_data_and_no_hidden(teacher_dir, student_dir, data_dir, tmp_path):
    with pytest.raises(DistillError, match="topk_logprobs"):
        distill(teacher_dir, student_dir, data_dir, cfg(mode="offline"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="hidden_weight"):
        DistillConfig(mode="offline", hidden_weight=1.0)


@pytest.fixture(scope="module")
def sampled_data_dir(teacher_dir, tmp_path_factory) -> Path:
    """The same generation as topk_data_dir, storing 20 ids drawn from the teacher's distribution instead."""
    from compactlm.config import GenerateConfig
    from compactlm.generation import generate_dataset

    out = tmp_path_factory.mktemp("gen-sampled") / "ds"
    gc = GenerateConfig(engine="hf", topk_logprobs=20, logit_targets="sampled", max_prompts=24, max_tokens=24, n=1,
                        shard_size=8, filters=dict(min_tokens=1))
    generate_dataset(teacher_dir, gc, out, seed=0, progress=False)
    return out


def test_sampled_targets_are_draws_from_the_teacher_and_leave_the_text_unchanged(sampled_data_dir, topk_data_dir,
                                                                                  teacher_dir):
    from compactlm.formats.generated import logit_targets

    assert (logit_targets(sampled_data_dir), logit_targets(topk_data_dir)) == ("sampled", "topk")
    rows, top_rows = read_rows(sampled_data_dir), read_rows(topk_data_dir)
    assert [r["completion_token_ids"] for r in rows] == [r["completion_token_ids"] for r in top_rows]
    teacher = load_model(teacher_dir)
    hits, mass = [], []
    for r in rows[:8]:
        p, c = r["prompt_token_ids"], r["completion_token_ids"]
        with torch.no_grad():
            logp = F.log_softmax(teacher(torch.tensor([p + c])).logits[0].float(), -1)[len(p) - 1:len(p) - 1 + len(c)]
        ids, lps = torch.tensor(r["topk_ids"]), torch.tensor(r["topk_logprobs"], dtype=torch.float32)
        assert ids.shape == (len(c), 20) and bool((ids.diff(dim=-1) >= 0).all())  # sorted by id, repeats kept
        torch.testing.assert_close(logp.gather(-1, ids), lps, atol=3e-2, rtol=1e-2)  # the teacher's raw log-probs
        top1 = logp.argmax(-1, keepdim=True)
        hits.append((ids == top1).float().mean(-1))  # share of draws that hit the teacher's top token ...
        mass.append(logp.gather(-1, top1)[:, 0].exp())  # ... is about its probability
    hits, mass = torch.cat(hits), torch.cat(mass)
    assert abs(hits.mean().item() - mass.mean().item()) < 0.03, (hits.mean(), mass.mean())


def test_offline_training_on_sampled_targets_lowers_the_full_kl(sampled_data_dir, teacher_dir, student_dir,
                                                               tmp_path):
    logged: list[dict] = []
    summary = distill(teacher_dir, student_dir, sampled_data_dir,
                      cfg(mode="offline", steps=8, seq_len=64, temperature=1.0), tmp_path / "off", seed=0,
                      log_fn=lambda mm, st: logged.append(mm))
    assert logged[-1]["kd_loss"] < 0.9 * logged[0]["kd_loss"], [x["kd_loss"] for x in logged]
    assert is_complete(tmp_path / "off") and summary["steps"] == 8
    # the student moved toward the teacher on the full distribution, not only on the drawn ids
    teacher, before, after = (load_model(d) for d in (teacher_dir, student_dir, tmp_path / "off"))
    r = read_rows(sampled_data_dir)[0]
    ids = torch.tensor([r["prompt_token_ids"] + r["completion_token_ids"]])
    with torch.no_grad():
        t = teacher(ids).logits
        kl = [kd_loss(m(ids).logits, t, None).item() for m in (before, after)]
    assert kl[1] < kl[0], kl
    # sampled targets estimate forward KL at T = 1 only; other choices fail before training, naming the fix
    with pytest.raises(DistillError, match="distill.loss: forward_kl"):
        distill(teacher_dir, student_dir, sampled_data_dir, cfg(mode="offline", loss="reverse_kl"), tmp_path / "r")
    with pytest.raises(DistillError, match="distill.temperature: 1"):
        distill(teacher_dir, student_dir, sampled_data_dir, cfg(mode="offline", temperature=2.0), tmp_path / "t")
    assert not (tmp_path / "r").exists() and not (tmp_path / "t").exists()


def test_sampled_targets_config_errors_name_the_fix(teacher_dir, tmp_path):
    from compactlm.config import GenerateConfig
    from compactlm.generation import generate_dataset

    with pytest.raises(ValueError, match="set topk_logprobs: k"):
        GenerateConfig(engine="hf", logit_targets="sampled")
    with pytest.raises(ValueError, match="set engine: hf"):
        GenerateConfig(engine="vllm", logit_targets="sampled", topk_logprobs=8)
    # k at least the vocabulary: a teacher with a 40-word vocabulary (word-level tokenizer), refused before any
    # prompt is loaded or anything written
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(39)} | {"<unk>": 39}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    small = tmp_path / "small-vocab"
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(small)
    (small / "config.json").write_bytes((teacher_dir / "config.json").read_bytes())
    for targets in ("topk", "sampled"):
        with pytest.raises(ValueError, match=r"topk_logprobs \(40\) must be smaller than the teacher's vocabulary "
                                             r"\(40 tokens\)"):
            generate_dataset(small, GenerateConfig(engine="hf", logit_targets=targets, topk_logprobs=40),
                             tmp_path / "g", seed=0, progress=False)
    assert not (tmp_path / "g").exists()
