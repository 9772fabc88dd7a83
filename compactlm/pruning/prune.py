"""The prune stage: the teacher sliced to the student's shape (an explicit shape, or the best candidate of a
parameter budget) and published as a normal HF model directory with its pruning record.

How the weights are sliced is :mod:`compactlm.pruning.slicing`; shapes and their parameter counts are
:mod:`compactlm.pruning.shapes`; ranking a budget's candidates is :mod:`compactlm.pruning.budget`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactlm.config import SHAPE_FIELDS, PruneConfig
from compactlm.formats import pruning as record_format
from compactlm.formats.scores import ImportanceScores
from compactlm.models import copy_model_side_files, stored_dtype
from compactlm.pruning.budget import (
    calibration_tensor,
    candidate_pool,
    rank_measured,
    repair_ids,
    score_candidates,
)
from compactlm.pruning.shapes import shape_kind
from compactlm.pruning.slicing import plan_pruning, prune_model

if TYPE_CHECKING:
    import torch

RECORD_FILE = record_format.RECORD_FILE


def with_shape(cfg: PruneConfig, shape: dict[str, Any]) -> PruneConfig:
    """`cfg` with its shape replaced by `shape` (a dict of SHAPE_FIELDS; missing = keep) and no budget."""
    if not isinstance(shape, dict):
        raise ValueError(f"shape must be a dict of {', '.join(SHAPE_FIELDS)}, got {type(shape).__name__}")
    unknown = sorted(set(shape) - set(SHAPE_FIELDS))
    if unknown:
        raise ValueError(f"shape has unknown keys {unknown}; allowed: {', '.join(SHAPE_FIELDS)} "
                         "(e.g. a candidate's 'shape' from rank_candidates)")
    return PruneConfig(**shape, layer_metric=cfg.layer_metric, rescale_norms=cfg.rescale_norms, repair=cfg.repair)


def shape_key(candidate: dict[str, Any]) -> tuple:
    shape = candidate.get("shape") if isinstance(candidate, dict) else None
    if not isinstance(shape, dict):
        raise ValueError(f"ranking items need a 'shape' dict (items of rank_measured / rank_candidates), got "
                         f"{candidate!r}")
    return tuple(sorted(shape.items()))


def _selection(config: Any, scores: ImportanceScores, cfg: PruneConfig, shape: dict[str, int] | None,
               calibration, ranking: list[dict[str, Any]] | None) -> tuple[str, PruneConfig | None, list]:
    """(selection, explicit shape config or None for a budget, the budget's candidate pool); validates every
    target before any weight is loaded."""
    pool: list[dict[str, Any]] = []
    missing = calibration is None or isinstance(calibration, (str, os.PathLike)) and not Path(calibration).exists()
    if cfg.repair is not None and missing:
        raise ValueError(f"prune.repair refits the pruned projections on calibration data, got calibration="
                         f"{None if calibration is None else str(calibration)!r}: pass token ids, an existing "
                         "generated dataset dir or text file, or leave prune.repair empty for plain slicing")
    if cfg.repair is not None and cfg.repair.hidden == "pca":
        from compactlm.pruning.rotation import check_rotatable

        check_rotatable(config)
    if shape is not None:
        selection, explicit = "shape", with_shape(cfg, shape)
    elif cfg.budget is not None:
        params = cfg.budget.params
        if calibration is None and ranking is None:
            raise ValueError(f"prune.budget.params={params} ranks candidate shapes on calibration data: pass "
                             "calibration= (token ids, a generated dataset dir or a text file), or an explicit "
                             "shape= / shape fields instead of a budget")
        selection, explicit = "params", None
        pool = candidate_pool(config, scores, cfg)  # fail fast: budget reachable, scores match
        if ranking is not None and sorted(map(shape_key, ranking)) != sorted(map(shape_key, pool)):
            raise ValueError(f"ranking= does not measure this config's candidate pool ({len(ranking)} ranked vs "
                             f"{len(pool)} in the pool for prune.budget.params={params}); rank the pool of the "
                             "same teacher, scores and prune config (budget.plan_candidates)")
    else:
        selection, explicit = "config", cfg
    if explicit is not None:
        plan_pruning(config, scores, explicit)  # fail fast, before loading weights
    return selection, explicit, pool


def _choose(model_dir: Path, scores: ImportanceScores, cfg: PruneConfig, pool: list, calibration,
            ranking: list | None, *, device: str, seed: int, stored: str):
    """Load the teacher and rank the budget's pool (or take the given ranking): (teacher model, ranking)."""
    from compactlm.models import load_model
    if ranking is not None:  # measured elsewhere (a fan-out): prune its best, exactly as below
        ranking = rank_measured([{k: v for k, v in c.items() if k != "rank"} for c in ranking])
        return load_model(model_dir, dtype="float32", device="cpu"), ranking
    if cfg.budget.short_distill is not None:
        raise ValueError("prune.budget.short_distill ranks the candidates with distillation, which the pruning "
                         "library does not run: rank them with compactlm.candidates.rank_with_short_distill(...) "
                         "and pass ranking= (the prune stage does), or drop short_distill")
    ids = calibration_tensor(calibration, model_dir, cfg, seed=seed)
    model = load_model(model_dir, dtype="float32", device=device)  # fp32: bf16 matmuls are slow on CPU
    return model, score_candidates(model, scores, pool, ids, proxy=cfg.budget.proxy, base=cfg,
                                   repair_calibration=repair_ids(calibration, model_dir, cfg, seed=seed + 1),
                                   stored=stored)


def short_distill_dir(out_dir: str | os.PathLike) -> Path:
    """Where a prune stage publishing to `out_dir` keeps its finished short distillations
    (:mod:`compactlm.candidates`) until it publishes; removed by :func:`prune_to_dir` once it has."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.short"


def prune_to_dir(model_dir: str | os.PathLike, scores_dir: str | os.PathLike, cfg: PruneConfig,
                 out_dir: str | os.PathLike, *, calibration: torch.Tensor | str | os.PathLike | None = None,
                 shape: dict[str, int] | None = None, device: str = "cpu", seed: int = 0,
                 ranking: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Prune the HF model in `model_dir` with the scores in `scores_dir` and publish the student to `out_dir`.

    The student's shape comes from, in order:

    1. `shape` (a dict of ``num_hidden_layers`` / ``hidden_size`` / ``intermediate_size`` /
       ``num_attention_heads``; missing keys keep the teacher's value), e.g. one candidate's ``"shape"`` from
       :func:`compactlm.pruning.rank_candidates` in a fan-out over the top-k; ``cfg``'s shape fields and
       ``cfg.budget`` are then ignored (``layer_metric`` and ``rescale_norms`` still apply);
    2. ``cfg.budget``: the candidates that fit the budget are ranked by ``cfg.budget.proxy`` on `calibration`
       (ids [N, T], or a generated dataset dir / text file; required) with the teacher in fp32 on `device`, and
       the best is pruned; with `ranking` (the same pool already measured elsewhere, e.g. by a fan-out of
       :func:`compactlm.pruning.budget.measure_candidate` tasks ordered by ``rank_measured``) nothing is
       measured again and ``ranking[0]`` is pruned (`calibration` is then not needed); its shapes must be
       exactly the pool's. ``cfg.budget.short_distill`` needs such a ranking
       (:func:`compactlm.candidates.rank_with_short_distill`: the pruning library runs no distillation);
    3. ``cfg``'s explicit shape fields.

    With ``cfg.repair`` the chosen student's output projections are then refitted to the teacher's outputs on
    `calibration` (:mod:`compactlm.pruning.repair`; required then), with the teacher in fp32 on `device`; the
    record's ``repair`` holds the per-projection errors. Budget candidates are then repaired before their proxy
    is measured (:func:`compactlm.pruning.budget.repair_ids`), so the ranking is of repaired students.

    `out_dir` becomes a normal HF directory (config.json, model.safetensors in the teacher's dtype, tokenizer
    files and chat template copied from `model_dir`) plus ``pruning.json`` (the record, with ``selection``
    ("shape" | "params" | "config"), ``budget``, the chosen ``candidate`` and, for a budget, the full
    ``ranking``) and ``manifest.json`` last. Every target is validated before any model loads; on bad input
    nothing is written.
    """
    import torch
    from transformers import AutoConfig

    from compactlm.formats.scores import load_scores
    from compactlm.models import load_model

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    scores = load_scores(scores_dir)
    selection, explicit, pool = _selection(config, scores, cfg, shape, calibration, ranking)
    dtype = stored_dtype(config)
    if cfg.streaming:  # the config refuses a budget and repair with it; a shape= argument still applies
        from compactlm.pruning.streaming import write_student

        return _publish(lambda tmp: write_student(model_dir, config, scores, explicit, dtype, tmp), cfg, model_dir,
                        scores_dir, out_dir, dtype, selection, None)
    if selection != "params":
        ranking = None  # a given ranking only applies to a budget
        model = (load_model(model_dir, dtype="float32", device=device) if cfg.repair is not None
                 else load_model(model_dir, dtype=dtype, device="cpu"))
    else:
        model, ranking = _choose(model_dir, scores, cfg, pool, calibration, ranking, device=device, seed=seed,
                                 stored=dtype)
        explicit = with_shape(cfg, ranking[0]["shape"])
    ids = repair_ids(calibration, model_dir, explicit, seed=seed)  # None without a repair; drawn once for both
    scores, rotation = _rotate(model, scores, explicit, ids)
    student, record = prune_model(model, scores, explicit)
    if rotation is not None:  # student channel c is principal direction c, not a teacher channel
        record.update(kept_channels=None, hidden_basis=rotation)
    if cfg.repair is not None:
        record["repair"] = _repair(model, student, scores, explicit, ids)
    # slicing is exact, so fp32 -> teacher dtype is too; repaired weights are rounded once to the teacher's dtype
    student.to(device="cpu", dtype=getattr(torch, dtype))
    del model

    def write(tmp: Path) -> dict[str, Any]:
        student.save_pretrained(tmp, safe_serialization=True)
        return record

    record = _publish(write, cfg, model_dir, scores_dir, out_dir, dtype, selection, ranking)
    shutil.rmtree(short_distill_dir(out_dir), ignore_errors=True)  # published: the short runs' results are in it
    return record


def _rotate(model, scores: ImportanceScores, cfg: PruneConfig,
            ids: torch.Tensor | None) -> tuple[ImportanceScores, dict[str, Any] | None]:
    """With ``repair.hidden: pca`` and a smaller hidden size: rotate the fp32 teacher's residual stream onto its
    principal components on the repair's calibration `ids` (:mod:`compactlm.pruning.rotation`); the channel scores
    become the principal order, so that slicing keeps the leading components. Returns (the scores to slice with,
    the record's ``hidden_basis`` or None when nothing was rotated)."""
    import dataclasses

    import torch

    from compactlm.pruning.rotation import principal_basis, rotate_residual, stream_moment

    dim = model.config.hidden_size
    if cfg.repair is None or cfg.repair.hidden != "pca" or cfg.hidden_size in (None, dim):
        return scores, None
    basis, share = principal_basis(stream_moment(model, ids))
    rotate_residual(model, basis)
    order = torch.arange(dim, 0, -1, dtype=scores.channels.dtype)  # the first component ranks highest
    return dataclasses.replace(scores, channels=order), {
        "method": "pca", "tokens": int(ids.numel()), "energy_kept": round(float(share[:cfg.hidden_size].sum()), 6)}


def _repair(model, student, scores: ImportanceScores, cfg: PruneConfig, ids: torch.Tensor) -> dict[str, Any]:
    """Refit the student's output projections on calibration `ids` (:mod:`compactlm.pruning.repair`)."""
    from compactlm.pruning.repair import reconstruct

    return reconstruct(model, student, plan_pruning(model.config, scores, cfg), ids, damping=cfg.repair.damping,
                       max_memory_gb=cfg.repair.max_memory_gb)


def _publish(write, cfg: PruneConfig, model_dir: Path, scores_dir, out_dir: Path, dtype: str, selection: str,
             ranking: list | None) -> dict[str, Any]:
    """Publish the student to `out_dir` atomically: ``write(tmp)`` writes its weights and configs and returns the
    pruning record; then its tokenizer, the full record and the manifest. Returns the record."""
    from compactlm.artifacts import publish_dir

    manifest = {"stage": "prune", "model_dir": str(model_dir), "scores_dir": str(scores_dir),
                "config": cfg.model_dump(mode="json"), "selection": selection}
    with publish_dir(out_dir, manifest) as tmp:
        record = write(tmp)
        if ranking is not None:
            candidate = ranking[0]
        else:
            s = {k: record["student"][k] for k in SHAPE_FIELDS}
            candidate = {"kind": shape_kind(s, record["teacher"]), "shape": s, "params": record["params_after"],
                         "param_ratio": record["param_ratio"]}
        record = {**record, "teacher_dir": str(model_dir), "scores_dir": str(scores_dir), "dtype": dtype,
                  "config": cfg.model_dump(mode="json"), "selection": selection,
                  "budget": cfg.budget.params if cfg.budget is not None else None, "candidate": candidate,
                  "ranking": ranking}
        root = record_format.compose_root(record_format.read_record(model_dir), record)
        if root is not None:  # pruned from a compactlm student: its maps to the original teacher
            record["root"] = root
        manifest.update({"student": record["student"], "params_before": record["params_before"],
                         "params_after": record["params_after"]})
        copy_model_side_files(model_dir, tmp, extra=("generation_config.json",))
        record_format.write_record(tmp, record)
    return record
