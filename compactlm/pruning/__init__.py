"""Structured (Minitron) pruning: depth, attention heads, MLP neurons and embedding channels.

Importing this package is cheap: torch and transformers load inside the functions.
"""

from compactlm.pruning.budget import candidate_shapes, param_count
from compactlm.pruning.prune import plan_pruning, prune_model, prune_to_dir, target_shape

__all__ = ["candidate_shapes", "param_count", "plan_pruning", "prune_model", "prune_to_dir", "target_shape"]
