"""Structured (Minitron) pruning: depth, attention heads, MLP neurons and embedding channels.

Explicit shapes (``PruneConfig`` shape fields) or a parameter budget (``PruneConfig.params``), whose candidate
shapes :func:`rank_candidates` ranks by a proxy measured right after pruning.
Importing this package is cheap: torch and transformers load inside the functions.
"""

from compactlm.pruning.budget import candidate_shapes, param_count, rank_candidates, score_candidates
from compactlm.pruning.prune import plan_pruning, prune_model, prune_to_dir, shape_kind, target_shape

__all__ = ["candidate_shapes", "param_count", "plan_pruning", "prune_model", "prune_to_dir", "rank_candidates",
           "score_candidates", "shape_kind", "target_shape"]
