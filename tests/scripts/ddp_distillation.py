"""One rank of a data-parallel distillation under torchrun; prints ``RESULT {json}`` with the rank's summary.

    torchrun --standalone --nproc_per_node 2 tests/scripts/ddp_distillation.py TEACHER STUDENT DATA OUT CONFIG_JSON
"""

import json
import os
import sys

from compactlm.config import DistillConfig
from compactlm.distillation import distill

teacher, student, data, out = sys.argv[1:5]
cfg = DistillConfig.model_validate_json(sys.argv[5])
summary = distill(teacher, student, data, cfg, out, seed=4)
# one write() per line: the two ranks share torchrun's stdout, and a line split over two writes could interleave
os.write(1, ("RESULT " + json.dumps({"rank": int(os.environ["RANK"]), **summary}) + "\n").encode())
