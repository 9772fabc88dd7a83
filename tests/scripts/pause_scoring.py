"""Score a model, pausing once the plots are written into the publish temp directory (before the manifest).

    python tests/scripts/pause_scoring.py MODEL CALIBRATION OUT SCORE_CONFIG_JSON
"""

import sys

import compactlm.importance.plots as PL
import compactlm.importance.score as S
from compactlm.config import ScoreConfig
from tests.scripts.faults import pause_after

PL.write_plots = pause_after(PL.write_plots)
model, calib, out, cfg = sys.argv[1:5]
S.score_model(model, calib, ScoreConfig.model_validate_json(cfg), out, seed=0)
