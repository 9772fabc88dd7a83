"""Self-instruct generation whose writes start failing just before the instruction list is written.

    python tests/scripts/limit_self_instruct.py MODEL OUT GENERATE_CONFIG_JSON
"""

import sys

import compactlm.generation.dataset as D
from compactlm.config import GenerateConfig
from tests.scripts.faults import limit_writes

model, out, cfg = sys.argv[1:4]
real = D._write_jsonl_atomic


def write_jsonl(path, *a, **kw):
    limit_writes(16)  # the instruction list is the next file written, and longer than this
    return real(path, *a, **kw)


D._write_jsonl_atomic = write_jsonl
D.generate_dataset(model, GenerateConfig.model_validate_json(cfg), out, seed=5, progress=False)
