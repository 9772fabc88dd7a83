"""Load a model directory in vLLM and print ``VLLM_OK <token ids>`` of 5 greedy tokens after a fixed prompt.

    python tests/scripts/vllm_greedy.py MODEL_DIR
"""

import sys

from vllm import LLM, SamplingParams

if __name__ == "__main__":
    # the CPU backend reserves gpu_memory_utilization x RAM for the KV cache: keep it small on a shared box
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256,
              gpu_memory_utilization=0.1)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=5, temperature=0.0))
    print("VLLM_OK", " ".join(map(str, out[0].outputs[0].token_ids)))
