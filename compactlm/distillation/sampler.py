"""The student's on-policy samples from a vLLM engine in the training process (``distill.on_policy.engine: vllm``).

The engine starts on the student's directory with its engine core in this process, so :meth:`VLLMSampler.load`
copies the live student's weights into it from memory (vLLM's in-place ``reload_weights``;
benchmarks/onpolicy_sampler.py checks that its greedy tokens are then HF's). When to load is onpolicy.py's
:func:`~compactlm.distillation.onpolicy.refresh`; every request is seeded from the step's seed.
"""

from __future__ import annotations

import os
import time

from compactlm.config import OnPolicyConfig
from compactlm.models import cut_at_eos

#: The share of the GPU the engine takes (training keeps the rest).
GPU_SHARE = 0.3


class VLLMSampler:
    """A vLLM engine on `model_dir` (fp32 on CPU, bf16 with 30 % of the GPU on CUDA, where training keeps the rest),
    ``max_model_len`` = the training sequence length."""

    def __init__(self, model_dir: str | os.PathLike, *, cuda: bool, seq_len: int, seed: int):
        from compactlm.runtime import start_vllm

        t0 = time.perf_counter()
        self.llm = start_vllm(model_dir, dtype="bfloat16" if cuda else "float32", max_model_len=seq_len, seed=seed,
                              in_process=True, gpu_memory_utilization=GPU_SHARE)
        self.start_seconds = time.perf_counter() - t0
        self.loads = 0

    def load(self, student) -> None:
        """Copy `student`'s weights (HF names) into the engine."""
        weights = [(name, t.detach()) for name, t in student.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.loads += 1

    def sample(self, prompts: list[list[int]], op: OnPolicyConfig, eos_ids: set[int], seed: int) -> list[list[int]]:
        """Each prompt's sampled continuation (token ids, through the first of `eos_ids`); request i is seeded by
        (seed, i)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=1, temperature=op.temperature, top_p=op.top_p, max_tokens=op.max_new_tokens,
                                 seed=(seed * 1_009 + i) % 2**63, stop_token_ids=sorted(eos_ids), detokenize=False)
                  for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [cut_at_eos(list(o.outputs[0].token_ids), eos_ids) for o in outs]

    def close(self) -> None:
        from compactlm.runtime import stop_vllm

        llm, self.llm = self.llm, None
        stop_vllm(llm)
