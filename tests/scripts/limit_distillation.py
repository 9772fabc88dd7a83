"""Distill with file writes limited to 1 MiB from step LIMIT_AT on (-1 = never), so a checkpoint cannot be written.

    python tests/scripts/limit_distillation.py TEACHER STUDENT DATA OUT DISTILL_CONFIG_JSON LIMIT_AT
"""

import sys

from compactlm.config import DistillConfig
from compactlm.distillation import distill
from tests.scripts.faults import limit_writes

teacher, student, data, out, cfg, limit_at = sys.argv[1:7]


def log_fn(metrics, step):
    if step == int(limit_at):
        limit_writes(1 << 20)


distill(teacher, student, data, DistillConfig.model_validate_json(cfg), out, seed=0, log_fn=log_fn)
