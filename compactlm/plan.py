"""The memory plan of a recipe (``compactlm plan``): per stage, where it runs, the strategy it will use and the
memory one process needs, from the teacher's (and a given student's) ``config.json`` only: no weights are read.

A run refuses before any compute when a stage cannot fit the machine, with the plan's numbers and the setting that
makes it fit (:func:`check_fits`). The part sizes come from :mod:`compactlm.footprint`; every stage adds the
runtime of a process (Python, torch, transformers: ``RUNTIME_CPU``; the CUDA context: ``RUNTIME_GPU``).
The measured peaks these predictions are checked against are in docs/benchmarks.md ("memory plan").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compactlm import footprint as fp
from compactlm import stage_plans as stages
from compactlm.config import Recipe
from compactlm.footprint import GiB, StageNeed
from compactlm.runtime import affinity_cores


@dataclass(frozen=True)
class Machine:
    """What a run may use: GPUs with their memory each, the host's memory and CPUs."""

    gpus: int = 0
    gpu_mem_gib: float = 0.0
    cpu_mem_gib: float = 0.0
    cpus: int = 1

    @classmethod
    def detect(cls, gpus: int | None = None, gpu_mem_gib: float | None = None, cpu_mem_gib: float | None = None,
               cpus: int | None = None) -> Machine:
        """This machine, any value given overriding what is found (nvidia-smi, /proc/meminfo, a cgroup limit)."""
        found = _nvidia_smi() if gpus is None or gpu_mem_gib is None else []
        return cls(gpus=len(found) if gpus is None else gpus,
                   gpu_mem_gib=(min(found) if found else 0.0) if gpu_mem_gib is None else gpu_mem_gib,
                   cpu_mem_gib=host_memory_gib() if cpu_mem_gib is None else cpu_mem_gib,
                   cpus=cpus or len(affinity_cores()))

    def uses_gpu(self, device: str) -> bool:
        """Whether a run with this `device` setting (auto, cpu, cuda) computes on this machine's GPUs."""
        return self.gpus > 0 and device != "cpu"


@dataclass
class Plan:
    machine: Machine
    needs: list[StageNeed] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def misfits(self) -> list[tuple[StageNeed, float]]:
        """(stage, GiB available) for each stage that does not fit."""
        out = []
        for n in self.needs:
            have = self.machine.gpu_mem_gib if n.device == "gpu" else self.machine.cpu_mem_gib
            if have and n.need_gib() > have:
                out.append((n, have))
        return out

    def table(self) -> str:
        m = self.machine
        head = (f"machine: {m.gpus} GPU(s) x {m.gpu_mem_gib:.1f} GiB, host {m.cpu_mem_gib:.1f} GiB\n"
                "| stage | device | strategy | GiB per process | processes | needs GiB | fits | largest parts |\n"
                "|---|---|---|---:|---:|---:|---|---|")
        bad = {id(n) for n, _ in self.misfits()}
        rows = []
        for n in self.needs:
            parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in n.largest())
            rows.append(f"| {n.stage} | {n.device} | {n.strategy} | {n.per_process / GiB:.2f} | {n.ranks} | "
                        f"{n.need_gib():.2f} | {'NO' if id(n) in bad else 'yes'} | {parts} |")
        return "\n".join([head, *rows, *(f"note: {x}" for x in self.notes)])

    def to_dict(self) -> dict[str, Any]:
        bad = {id(n) for n, _ in self.misfits()}
        return {"machine": vars(self.machine), "notes": self.notes, "stages": [
            {"stage": n.stage, "device": n.device, "strategy": n.strategy, "ranks": n.ranks,
             "per_process_gib": round(n.per_process / GiB, 3), "need_gib": round(n.need_gib(), 3),
             "parts_mib": {k: round(v / fp.MiB, 1) for k, v in n.parts.items()},
             "transient_mib": {k: round(v / fp.MiB, 1) for k, v in n.transient.items()}, "fix": n.fix,
             "fits": id(n) not in bad} for n in self.needs]}


#: Host memory (GiB) to plan for instead of this machine's (e.g. to leave room for other jobs).
HOST_MEM_ENV = "COMPACTLM_HOST_MEM_GIB"


def host_memory_gib() -> float:
    """The host memory a run may use: $COMPACTLM_HOST_MEM_GIB, else MemTotal, or this process's memory cgroup
    limit when lower (v1 or v2, read from /proc/self/cgroup)."""
    if os.environ.get(HOST_MEM_ENV):
        try:
            return float(os.environ[HOST_MEM_ENV])
        except ValueError:
            raise ValueError(f"{HOST_MEM_ENV}={os.environ[HOST_MEM_ENV]!r} is not a number of GiB (e.g. 64)") from None
    try:
        total = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                     if ln.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return 0.0
    limit = _cgroup_limit()
    return (min(total, limit) if limit else total) / GiB


def _cgroup_limit() -> int | None:
    """This process's memory cgroup limit in bytes (None when unlimited or unknown)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            file = Path("/sys/fs/cgroup", path.lstrip("/"), "memory.max")
        elif "memory" in controllers.split(","):  # v1
            file = Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.limit_in_bytes")
        else:
            continue
        try:
            value = file.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:
            return int(value)
    return None


def _nvidia_smi() -> list[float]:
    """Memory (GiB) of each visible GPU, from nvidia-smi; [] without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [float(x) / 1024 for x in out.split() if x.strip().replace(".", "", 1).isdigit()]


def stage_needs(stage: str, cfg: Any, t: fp.Dims, s: fp.Dims | None, machine: Machine, gpu: bool) -> list[StageNeed]:
    """The memory of one stage (a recipe section's name: generate, correct, score, prune, distill or
    distill_then.N, evaluate, export) with config `cfg`, teacher `t` and student `s`; a distillation on GPUs with
    several processes adds their host side."""
    if stage == "generate":
        return [stages.generate(cfg, t, gpu, machine.gpu_mem_gib)]
    if stage in ("correct", "score"):
        return [getattr(stages, stage)(cfg, t, gpu)]
    if stage == "prune":
        return [stages.prune(cfg, t, s, gpu, machine.cpus)]
    if stage == "distill" or stage.startswith("distill_then."):
        host = stages.distill_host(cfg, stage, t, s) if gpu else None
        return [stages.distill(cfg, stage, t, s, gpu, machine.gpus, machine.gpu_mem_gib), *([host] if host else [])]
    if stage == "evaluate":
        return [stages.evaluate(cfg, t, s, gpu, machine.gpu_mem_gib)]
    if stage == "export":  # the models are exported one after another: the larger sets the peak
        return [stages.export(cfg, t if cfg.teacher and t.params > s.params else s)]
    raise ValueError(f"no memory plan for a stage named {stage!r}")


def plan_recipe(recipe: Recipe, teacher_config: Any, machine: Machine, *, student_config: Any = None,
                student_shape: dict[str, int] | None = None) -> Plan:
    """Every stage of `recipe` on `machine`. `student_shape` is the pruned student's (the prune target);
    `student_config` a given student's config (None: its stages are planned once it is resolved, with a note)."""
    gpu = machine.uses_gpu(recipe.device)
    t = fp.dims(teacher_config)
    plan = Plan(machine)
    s = fp.dims(teacher_config, student_shape) if recipe.pruned_student else (
        fp.dims(student_config) if student_config is not None else None)
    sections = [("generate", recipe.generate), *([("correct", recipe.correct)] if recipe.correct else [])]
    if recipe.pruned_student:
        sections += [("score", recipe.score), ("prune", recipe.prune)]
    if s is not None:
        sections += [("distill" if i == 0 else f"distill_then.{i - 1}", cfg)
                     for i, cfg in enumerate(recipe.distill_stages)]
        sections += [("evaluate", recipe.eval), *([("export", recipe.export)] if recipe.export.enabled else [])]
    for stage, cfg in sections:
        plan.needs += stage_needs(stage, cfg, t, s, machine, gpu)
    if s is None:
        plan.notes.append(f"student {recipe.student!r}: no local config.json yet, so distill, evaluate and export "
                          "are planned once it is resolved")
    elif recipe.schedule is not None:
        plan.notes.append(f"schedule: the {recipe.schedule.rounds} rounds score, prune and distill students between "
                          "the teacher's shape and the final one: none needs more than the teacher's rows above")
    return plan


def plan_stage(stage: str, cfg: Any, machine: Machine, models: dict[str, str | os.PathLike], *,
               device: str = "auto") -> Plan:
    """One stage run on its own (a stage flow), from its models' folders or config.json files: ``teacher``
    (generate, score, prune: its student is prune's target), ``teacher`` and ``student`` (distill), or any labels
    (evaluate and export run the models one after another: planned for the largest)."""
    gpu = machine.uses_gpu(device)
    configs = {label: read_config(ref) for label, ref in models.items()}
    dims = {label: fp.dims(c) for label, c in configs.items()}
    if stage in ("evaluate", "export"):
        t = s = max(dims.values(), key=lambda d: d.params)
    else:
        t, s = dims["teacher"], dims.get("student")
        if stage == "prune":
            s = fp.dims(configs["teacher"], _prune_shape(configs["teacher"], cfg))
    plan = Plan(machine)
    plan.needs += stage_needs(stage, cfg, t, s, machine, gpu)
    return plan


def _prune_shape(config: Any, cfg: Any) -> dict[str, int]:
    """The student shape prune cuts: its target (a budget's first candidate, about the budget's size)."""
    from compactlm.config import SHAPE_FIELDS
    from compactlm.pruning.shapes import target_shape

    target = target_shape(config, cfg)
    return {k: target[k] for k in SHAPE_FIELDS}


def read_config(path: str | os.PathLike) -> Any:
    """A model's config from its folder or a config.json file (no weights); ValueError when there is none."""
    from transformers import AutoConfig

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ValueError(f"no config.json at {str(path)!r}: give a model folder or a config.json file")
    d = json.loads(p.read_text())
    if "model_type" not in d:
        raise ValueError(f"{p} has no model_type: is it a transformers config.json?")
    return AutoConfig.for_model(**d)


def plan_run(recipe: Recipe, teacher: str | os.PathLike, machine: Machine,
             student: str | os.PathLike | None = None) -> Plan:
    """:func:`plan_recipe` from the teacher's (and a given student's) folder or config.json file; the pruned
    student's shape is prune's target (a budget's: its first candidate, about the budget's size)."""
    config = read_config(teacher)
    shape = _prune_shape(config, recipe.prune) if recipe.pruned_student else None
    s_config = read_config(student) if student is not None else None
    return plan_recipe(recipe, config, machine, student_config=s_config, student_shape=shape)


def check_fits(plan: Plan, headline: str | None = None) -> None:
    """ValueError, `headline` (default: the run's) then each stage that does not fit with its numbers and the fix;
    nothing when all fit."""
    bad = plan.misfits()
    if not bad:
        return
    lines = []
    for n, have in bad:
        where = "per GPU" if n.device == "gpu" else "of host memory" + (
            f" ({n.ranks} processes x {n.per_process / GiB:.1f})" if n.ranks > 1 else "")
        lines.append(f"{n.stage} ({n.strategy}): needs {n.need_gib():.1f} GiB {where}, has {have:.1f} GiB; "
                     f"fix: {n.fix or 'a machine with more memory'}")
    headline = headline or "the run does not fit this machine (compactlm plan RECIPE shows every stage)"
    raise ValueError(f"{headline}:\n  " + "\n  ".join(lines))


__all__ = ["Machine", "Plan", "StageNeed", "check_fits", "host_memory_gib", "plan_recipe", "plan_run",
           "plan_stage", "read_config", "stage_needs"]
