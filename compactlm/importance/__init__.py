"""Minitron-style activation importance: heads, MLP neurons, embedding channels and layers.

Importing this package is cheap: torch and transformers load inside the functions.
"""

from compactlm.importance.compute import calibration_loss, compute_importance
from compactlm.importance.score import score_model
from compactlm.importance.scores import ImportanceScores, load_scores

__all__ = ["ImportanceScores", "calibration_loss", "compute_importance", "load_scores", "score_model"]
