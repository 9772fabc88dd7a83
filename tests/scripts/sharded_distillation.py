"""A distillation with ``distill.strategy`` from the config, started as a user's process would start it (the ranks
are launched by compactlm); prints ``RESULT {json}`` with the summary.

    python tests/scripts/sharded_distillation.py TEACHER STUDENT DATA OUT CONFIG_JSON
"""

import json
import sys

from compactlm.config import DistillConfig
from compactlm.distillation import distill

teacher, student, data, out = sys.argv[1:5]
summary = distill(teacher, student, data, DistillConfig.model_validate_json(sys.argv[5]), out, seed=4)
print("RESULT " + json.dumps(summary), flush=True)
