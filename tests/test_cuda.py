"""The CUDA code paths against the CPU ones, on tiny random models: generation, scoring, distillation, evaluation.

The sharp-headed GQA teacher, the 2-layer student and their dataset are the conftest fixtures the CPU
distillation tests use. Marked ``gpu`` and skipped where torch sees no CUDA device (CI, the 2-core dev machines);
run them on a GPU machine with ``pytest -m gpu``. The CPU results are the reference: fp32 on CUDA must match them
to float tolerance, the bf16 paths (the CUDA defaults) to bf16 tolerance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from compactlm.config import EvalConfig, GenerateConfig, ScoreConfig
from compactlm.distillation import distill
from compactlm.evaluation import evaluate_model
from compactlm.formats.generated import read_rows
from compactlm.generation import generate_dataset
from compactlm.importance import load_scores, score_model
from compactlm.models import load_model
from tests.helpers import hf_topk, texts
from tests.helpers import kd_cfg as cfg

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pytest -m gpu)")]


@pytest.mark.parametrize("dtype,atol", [("float32", 2e-2), ("bfloat16", 1.5e-1)])
def test_hf_engine_on_cuda_matches_a_cpu_forward(teacher_dir, tmp_path, dtype, atol):
    """Batched, left-padded, KV-cached decoding on CUDA stores the log-probs a plain fp32 CPU forward gives
    (fp16 storage: 2e-2 at values near -10; bf16 weights and activations: 0.15), and is seeded."""
    gen = GenerateConfig(engine="hf", dtype=dtype, max_tokens=12, max_model_len=512, max_prompts=6, n=2,
                         shard_size=3, topk_logprobs=4, batch_size=4)
    generate_dataset(teacher_dir, gen, tmp_path / "a", seed=3, progress=False)
    generate_dataset(teacher_dir, gen, tmp_path / "b", seed=3, progress=False)
    rows, again = read_rows(tmp_path / "a"), read_rows(tmp_path / "b")
    assert len(rows) == 12
    assert [r["completion_token_ids"] for r in rows] == [r["completion_token_ids"] for r in again]
    model = load_model(teacher_dir)
    for r in rows:
        logp = hf_topk(model, r["prompt_token_ids"], r["completion_token_ids"], 4)  # fp32 CPU forward
        stored_ids = torch.tensor(r["topk_ids"])
        stored_lp = torch.tensor(r["topk_logprobs"], dtype=torch.float32)
        torch.testing.assert_close(logp.gather(1, stored_ids), stored_lp, atol=atol, rtol=0)
        if dtype == "float32":  # same top-k set as the CPU reference, too
            torch.testing.assert_close(logp.topk(4, dim=-1).values, stored_lp, atol=atol, rtol=0)


def test_scores_on_cuda_equal_cpu_scores(tiny_gqa_model_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(p + " " + c for p, c in texts(24)))
    score_cfg = ScoreConfig(num_samples=6, seq_len=32, batch_size=4, layer_loss=True)
    score_model(tiny_gqa_model_dir, calib, score_cfg, tmp_path / "cpu", device="cpu", seed=0)
    score_model(tiny_gqa_model_dir, calib, score_cfg, tmp_path / "cuda", device="cuda", seed=0)
    cpu, cuda = load_scores(tmp_path / "cpu"), load_scores(tmp_path / "cuda")
    for name in ("heads", "neurons", "channels", "layer_block_influence", "layer_loss_increase"):
        torch.testing.assert_close(getattr(cuda, name).cpu(), getattr(cpu, name), rtol=1e-3, atol=1e-5)
    assert cuda.base_loss == pytest.approx(cpu.base_loss, rel=1e-4)


def _train(teacher_dir, student_dir, data_dir, out: Path, device: str, **kw) -> list[dict]:
    logged: list[dict] = []
    distill(teacher_dir, student_dir, data_dir, cfg(**{"steps": 8, "log_every": 1, **kw}), out, seed=1,
            device=device, log_fn=lambda m, s: logged.append(m))
    return logged


def test_online_kd_on_cuda_matches_cpu_and_trains(teacher_dir, student_dir, data_dir, tmp_path):
    """Step 1 sees the same batch and weights on both devices: its losses agree to bf16 autocast tolerance;
    training lowers the KD loss, MFU is logged on a known GPU, and the published fp32 model loads on the CPU."""
    cpu = _train(teacher_dir, student_dir, data_dir, tmp_path / "cpu", "cpu")
    cuda = _train(teacher_dir, student_dir, data_dir, tmp_path / "cuda", "cuda")
    assert cuda[0]["kd_loss"] == pytest.approx(cpu[0]["kd_loss"], rel=3e-2)
    assert cuda[0]["ce_loss"] == pytest.approx(cpu[0]["ce_loss"], rel=3e-2)
    assert cuda[-1]["kd_loss"] < 0.9 * cuda[0]["kd_loss"]
    assert all(math.isfinite(m["loss"]) for m in cuda)
    name = torch.cuda.get_device_name()
    if any(k in name for k in ("H100", "H200", "A100", "L4", "L40")):
        assert all(0 < m["mfu"] < 1 for m in cuda)
    model = load_model(tmp_path / "cuda")
    assert next(model.parameters()).dtype == torch.float32
    manifest = json.loads((tmp_path / "cuda" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 8 and manifest["metrics"]["peak_gpu_mib"] > 0


@pytest.mark.parametrize("nproc", [1, 2])
def test_fsdp_on_cuda_in_bf16_matches_one_process(teacher_dir, student_dir, data_dir, tmp_path, nproc):
    """``strategy: fsdp`` on CUDA (bf16 parameters, fp32 gradient reduction; one GPU, then two when there are two):
    step 1's losses agree with the unsharded CUDA run to bf16 tolerance, training lowers the KD loss, and the
    gathered student is a normal fp32 directory."""
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} CUDA devices")
    single = _train(teacher_dir, student_dir, data_dir, tmp_path / "single", "cuda")
    sharded = _train(teacher_dir, student_dir, data_dir, tmp_path / "fsdp", "cuda", strategy="fsdp", nproc=nproc)
    assert sharded[0]["kd_loss"] == pytest.approx(single[0]["kd_loss"], rel=3e-2)
    assert sharded[-1]["kd_loss"] < 0.9 * sharded[0]["kd_loss"]
    manifest = json.loads((tmp_path / "fsdp" / "manifest.json").read_text())
    assert manifest["metrics"]["strategy"] == "fsdp" and manifest["metrics"]["world_size"] == nproc
    assert manifest["metrics"]["peak_gpu_mib"] > 0  # rank 0's, from the rank process
    assert next(load_model(tmp_path / "fsdp").parameters()).dtype == torch.float32


def test_offline_and_hidden_kd_on_cuda(teacher_dir, student_dir, tmp_path):
    """Top-k data written on CUDA trains a student offline on CUDA; hidden-state KD runs on CUDA too."""
    gen = GenerateConfig(engine="hf", max_tokens=24, max_model_len=512, max_prompts=8, n=2, shard_size=4,
                         topk_logprobs=8, batch_size=8)
    generate_dataset(teacher_dir, gen, tmp_path / "topk", seed=0, progress=False)
    offline = _train(teacher_dir, student_dir, tmp_path / "topk", tmp_path / "off", "cuda", mode="offline")
    assert offline[-1]["kd_loss"] < offline[0]["kd_loss"]
    hidden = _train(teacher_dir, student_dir, tmp_path / "topk", tmp_path / "hid", "cuda", hidden_weight=1.0)
    assert all(math.isfinite(m["hidden_loss"]) for m in hidden) and hidden[-1]["loss"] < hidden[0]["loss"]


def test_evaluation_on_cuda_matches_cpu(tiny_model_dir):
    """fp32 on CUDA gives the CPU's accuracies and perplexity; bf16 (the CUDA default) stays close."""
    eval_cfg = EvalConfig(limit=20, batch_size=8, speed=False)
    cpu = evaluate_model(tiny_model_dir, eval_cfg, device="cpu", seed=0)
    fp32 = evaluate_model(tiny_model_dir, eval_cfg.model_copy(update={"dtype": "float32"}), device="cuda", seed=0)
    bf16 = evaluate_model(tiny_model_dir, eval_cfg, device="cuda", seed=0)
    for key in ("acc", "acc_norm"):
        assert fp32["tasks"]["compactlm_facts"][key] == pytest.approx(cpu["tasks"]["compactlm_facts"][key], abs=0.051)
    ppl = cpu["perplexity"]["word_perplexity"]
    assert fp32["perplexity"]["word_perplexity"] == pytest.approx(ppl, rel=1e-3)
    assert bf16["perplexity"]["word_perplexity"] == pytest.approx(ppl, rel=5e-2)
