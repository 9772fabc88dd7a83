"""Every family's pruned student is servable: it loads in vLLM, and vLLM's greedy tokens and their log-probs are
HF's.

One student per supported family, pruned by the prune stage (``prune_to_dir``) to a shape that cuts every axis at
once (depth, query heads, hidden channels, MLP neurons) and repaired (``prune.repair``: every family's o_proj and
down_proj refitted), plus a student of another family and vocabulary distilled across tokenizers, all loaded by
one vLLM subprocess (tests/scripts/vllm_greedy.py: one import, one in-process engine per model).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compactlm.arch import SUPPORTED_ARCHS
from compactlm.artifacts import read_manifest
from compactlm.config import PruneConfig, RepairConfig, ScoreConfig
from compactlm.distillation import distill
from compactlm.importance import score_model
from compactlm.models import count_params
from compactlm.pruning import prune_to_dir
from compactlm.pruning.repair import PROJECTIONS
from tests.helpers import PRUNING_TEXT, kd_cfg, vllm_greedy

#: The tiny teachers (hidden 128, 2 query heads x 64 in 1 KV group, 4 layers, MLP 256, tied) cut on every axis.
MIXED = PruneConfig(num_hidden_layers=3, hidden_size=96, intermediate_size=192, num_attention_heads=1,
                    repair=RepairConfig(num_samples=4, seq_len=32))
PROMPT = "The capital of France is"  # tests/scripts/vllm_greedy.py's prompt
MAX_TOKENS = 8


def _hf_greedy(model) -> tuple[list[int], torch.Tensor]:
    """HF's greedy tokens, and the log-prob HF gives each of them."""
    tok = AutoTokenizer.from_pretrained(model.name_or_path)
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ids = model.generate(prompt, max_new_tokens=MAX_TOKENS, do_sample=False)
        logp = torch.log_softmax(model(ids).logits[0, prompt.shape[1] - 1:-1].float(), dim=-1)
    new = ids[0, prompt.shape[1]:]
    return new.tolist(), logp.gather(-1, new[:, None])[:, 0]


@pytest.mark.long(67)
@pytest.mark.integration
def test_every_familys_pruned_student_loads_in_vllm(tiny_factory, teacher_dir, other_student_dir, data_dir,
                                                     tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(PRUNING_TEXT)
    students = {}
    for arch in SUPPORTED_ARCHS:
        teacher = tiny_factory(arch=arch)
        scores, out = tmp_path / arch / "scores", tmp_path / arch / "student"
        score_model(teacher, calib, ScoreConfig(num_samples=2, seq_len=16, layer_loss=False), scores)
        rec = prune_to_dir(teacher, scores, MIXED, out, calibration=calib)
        rows = rec["repair"]["projections"]  # both projections of the 3 kept layers, each closer to the teacher
        assert sorted((r["layer"], r["projection"]) for r in rows) == sorted((s, p) for s in range(3)
                                                                            for p in PROJECTIONS), arch
        assert all(r["error_after"] <= r["error_before"] for r in rows), (arch, rows)
        assert rec["repair"]["mean_error_after"] < rec["repair"]["mean_error_before"], arch
        assert rec["student"] == {"num_hidden_layers": 3, "hidden_size": 96, "intermediate_size": 192,
                                  "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64}, arch
        # vLLM's Qwen2 derives head_dim = hidden / heads (96 here, not 64): that student is written as Llama
        written = "llama" if arch == "qwen2" else arch
        assert rec["architecture"] == arch and rec["written_as"] == written, rec
        assert json.loads((out / "config.json").read_text())["model_type"] == written
        students[arch] = (out, rec)
    # and a student of another family and vocabulary (Qwen2, its own BPE) distilled across tokenizers (ULD + CE):
    # what the distill stage publishes for `student: <model>` loads in vLLM too
    other = tmp_path / "other-family"
    distill(teacher_dir, other_student_dir, data_dir, kd_cfg(kd_weight=0.5, steps=2, seq_len=64), other, seed=0)
    assert read_manifest(other)["cross_tokenizer_kd"] == "uld"

    vllm = vllm_greedy([*(out for out, _ in students.values()), other], MAX_TOKENS)
    model = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).eval()
    assert model.config.model_type == "qwen2" and model.config.vocab_size == 1024
    hf, hf_logp = _hf_greedy(model)
    assert vllm[len(students)]["ids"] == hf, (vllm[len(students)], hf)
    torch.testing.assert_close(torch.tensor(vllm[len(students)]["logprobs"]), hf_logp, rtol=0, atol=1e-4)
    for i, (arch, (out, rec)) in enumerate(students.items()):
        # the student loads unchanged in transformers, with the parameters the record counted
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert count_params(model) == rec["params_after"], arch
        # vLLM's greedy tokens match HF's on the same pruned checkpoint, and so do their log-probs (random tiny
        # models often repeat one token, so the log-probs are what shows the two compute the same function)
        hf, hf_logp = _hf_greedy(model)
        assert len(vllm[i]["ids"]) >= 1 and vllm[i]["ids"] == hf, (arch, vllm[i], hf)
        torch.testing.assert_close(torch.tensor(vllm[i]["logprobs"]), hf_logp, rtol=0, atol=1e-4, msg=arch)
