"""Evaluate a model through the evaluate task's per-model cache, pausing after lm-eval scored the benchmark task,
just before it scores perplexity.

    python tests/scripts/pause_evaluation.py MODEL WORKDIR EVAL_CONFIG_JSON
"""

import sys
import time

from lm_eval.models.huggingface import HFLM

from compactlm.config import EvalConfig
from tasks.common import RunContext
from tasks.evaluate import _evaluate_cached

real = HFLM.loglikelihood_rolling


def pause_before(self, *a, **kw):
    print("IN-EVAL", flush=True)
    time.sleep(600)
    return real(self, *a, **kw)


HFLM.loglikelihood_rolling = pause_before
model, workdir, cfg = sys.argv[1:4]
ctx = RunContext(workdir=workdir, tracking_uri="unused", experiment="unused", parent_run_id="unused")
_evaluate_cached(ctx, model, EvalConfig.model_validate_json(cfg))
