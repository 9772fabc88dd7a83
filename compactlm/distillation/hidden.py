"""Hidden-state distillation: which teacher layer each student layer imitates, and the width projection.

Layer map. A pruned student carries ``pruning.json`` whose ``kept_layers[i]`` is the teacher index of student
layer i: that is the map. A student without it gets a uniform map, student layer i -> teacher layer
``round((i + 1) * Lt / Ls) - 1`` (the last layer maps to the last layer).

Which states. Both models run with ``output_hidden_states=True``; HF returns ``L + 1`` states: the embeddings,
then the output of each decoder layer, except that the *last* entry is the output of the final norm (what
``lm_head`` reads). So student layer i < Ls - 1 is paired with teacher state ``map[i] + 1`` (raw residual
stream of both), and the student's last state is always paired with the teacher's last state (both post-norm),
whatever ``map[-1]`` is: pairing a post-norm state with a raw one would compare different quantities. A
non-final student layer mapped to the teacher's last layer cannot occur for a sorted map; if it does, that pair
uses the teacher's last state as well.

Projection. When the widths differ (width pruning) one linear map ``W: d_student -> d_teacher`` (no bias),
shared by all layers, is learned together with the student. It starts as the channel-selection matrix from
``pruning.json``'s ``kept_channels`` when available (student channel c = teacher channel kept_channels[c], so
the initial projection puts every student channel back where it came from), else PyTorch's default init. It is
trained with the student's optimizer, saved in checkpoints, and never saved into the student model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.formats import pruning as record

if TYPE_CHECKING:
    import torch


def layer_map(student_dir: str | Path, n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer index for each student layer (``pruning.json`` ``kept_layers``, else uniform).

    Raises ValueError when ``kept_layers`` does not fit the two models.
    """
    kept = record.kept_layers(student_dir)
    if kept is not None:
        if len(kept) != n_student or not all(isinstance(i, int) and 0 <= i < n_teacher for i in kept):
            raise ValueError(f"{Path(student_dir) / record.RECORD_FILE}: kept_layers {kept} must list one teacher "
                             f"layer in [0, {n_teacher}) per student layer ({n_student}); was the student pruned "
                             "from this teacher?")
        return list(kept)
    return [max(0, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]


def state_pairs(mapping: list[int], n_teacher: int) -> list[tuple[int, int]]:
    """(student state index, teacher state index) into ``output_hidden_states`` tuples (see module docstring)."""
    n_student = len(mapping)
    pairs = []
    for i, t in enumerate(mapping):
        if i == n_student - 1 or t == n_teacher - 1:
            pairs.append((i + 1, n_teacher))  # post-norm final states
        else:
            pairs.append((i + 1, t + 1))
    return pairs


def kept_channels(student_dir: str | Path) -> list[int] | None:
    return record.kept_channels(student_dir)


def make_projection(d_student: int, d_teacher: int, channels: list[int] | None = None) -> torch.nn.Linear | None:
    """The learned ``d_student -> d_teacher`` map (None when the widths match)."""
    import torch

    if d_student == d_teacher:
        return None
    proj = torch.nn.Linear(d_student, d_teacher, bias=False)
    if channels is not None and len(channels) == d_student and all(0 <= c < d_teacher for c in channels):
        with torch.no_grad():
            proj.weight.zero_()
            proj.weight[torch.tensor(channels), torch.arange(d_student)] = 1.0
    return proj
