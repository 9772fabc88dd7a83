"""Minitron-style activation importance: heads, MLP neurons, embedding channels and layers.

Importing this package is cheap: torch and transformers load inside the functions.
"""

from compactlm.calibration import calibration_loss
from compactlm.formats.scores import ImportanceScores, load_scores
from compactlm.importance.compute import compute_importance
from compactlm.importance.score import score_model

__all__ = ["ImportanceScores", "calibration_loss", "compute_importance", "load_scores", "score_model"]
