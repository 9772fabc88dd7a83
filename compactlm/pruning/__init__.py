"""Structured (Minitron) pruning: depth, attention heads, MLP neurons and embedding channels.

Explicit shapes (``PruneConfig`` shape fields) or a parameter budget (``PruneConfig.budget``), whose candidate
shapes :func:`rank_candidates` ranks by a proxy measured right after pruning. Modules, bottom up: ``shapes``
(arithmetic on configs), ``slicing`` (the weights), ``repair`` (the least-squares refit after slicing,
``PruneConfig.repair``), ``budget`` (ranking candidates), ``prune`` (the stage).
Importing this package is cheap: torch and transformers load inside the functions.
"""

from compactlm.pruning.budget import candidate_shapes, rank_candidates, score_candidates
from compactlm.pruning.prune import prune_to_dir
from compactlm.pruning.shapes import param_count, shape_kind, target_shape
from compactlm.pruning.slicing import plan_pruning, prune_model

__all__ = ["candidate_shapes", "param_count", "plan_pruning", "prune_model", "prune_to_dir", "rank_candidates",
           "score_candidates", "shape_kind", "target_shape"]
