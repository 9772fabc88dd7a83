"""compactlm: turn a large causal LM into a small, fast one.

The library is Prefect-free: generation, importance, pruning, distillation, evaluation, models and
tracking are plain typed functions. ``tasks/`` and ``flows/`` wrap them for orchestration.
"""

__version__ = "0.1.0"
