"""Distill slowly (0.4 s pause per logged step) so a test can SIGKILL it between checkpoints.

    python tests/scripts/slow_distillation.py TEACHER STUDENT DATA OUT DISTILL_CONFIG_JSON
"""

import sys
import time

from compactlm.config import DistillConfig
from compactlm.distillation import distill

teacher, student, data, out = sys.argv[1:5]
cfg = DistillConfig.model_validate_json(sys.argv[5])
distill(teacher, student, data, cfg, out, seed=1, log_fn=lambda m, s: time.sleep(0.4))
