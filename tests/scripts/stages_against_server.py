"""Two stages through the real task code (tasks/*.py, run_stage) against an MLflow server: score, then distill.
Prints SCORED after the first and DONE at the end.

    python tests/scripts/stages_against_server.py URI WORKDIR TEACHER STUDENT DATA SCORE_JSON DISTILL_JSON
"""

import sys

from compactlm.config import DistillConfig, ScoreConfig
from compactlm.tracking import Tracker
from tasks.common import RunContext
from tasks.distill import distill
from tasks.score import score

uri, workdir, teacher, student, data, score_cfg, distill_cfg = sys.argv[1:8]
tracker = Tracker(uri, "faults")
parent = tracker.start_run("pipeline")
ctx = RunContext(workdir=workdir, tracking_uri=uri, experiment="faults", parent_run_id=parent)
try:
    score.fn(ctx, teacher, data, ScoreConfig.model_validate_json(score_cfg))
    print("SCORED", flush=True)
    distill.fn(ctx, teacher, student, data, DistillConfig.model_validate_json(distill_cfg), log_model=False)
    tracker.end_run(parent)
except BaseException:
    tracker.end_run(parent, "FAILED")
    raise
print("DONE", flush=True)
