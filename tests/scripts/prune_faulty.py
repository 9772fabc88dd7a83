"""Prune a model with a fault: ``pause`` once the weights are in the publish temp directory (before the manifest),
or ``limit`` file writes to 1 MiB so the weights cannot be written.

    python tests/scripts/prune_faulty.py pause|limit MODEL SCORES OUT PRUNE_CONFIG_JSON
"""

import sys

import compactlm.pruning.prune as P
from compactlm.config import PruneConfig
from tests.scripts.faults import limit_writes, pause_after

fault, model, scores, out, cfg = sys.argv[1:6]
if fault == "pause":
    P.copy_model_side_files = pause_after(P.copy_model_side_files)
else:
    limit_writes(1 << 20)
P.prune_to_dir(model, scores, PruneConfig.model_validate_json(cfg), out, seed=0)
