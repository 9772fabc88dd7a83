"""A whole pipeline: the recipe, its run settings and MLflow tracking."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from compactlm.choices import Device, Runner
from compactlm.config.base import _Strict
from compactlm.config.data import DataConfig
from compactlm.config.export import ExportConfig
from compactlm.config.generate import GenerateConfig
from compactlm.config.stages import CorrectConfig, DistillConfig, EvalConfig, PruneConfig, ScoreConfig
from compactlm.models import KNOWN_ALIASES, check_model_ref


class ScheduleConfig(_Strict):
    """Prune in rounds (Minitron, Nemotron): cut part of the way, distill, score the healed model, cut again, until
    prune's shape; the total distillation steps stay distill.steps."""

    rounds: int = Field(2, ge=2, le=8, description="Prune-then-distill rounds; the last one reaches prune's shape "
                        "(each cut dimension shrinks by the same factor every round)")
    share: float = Field(
        0.5, gt=0.0, lt=1.0,
        description="Share of distill.steps that heals the intermediate students (split equally between the rounds "
        "before the last); the final student distills the rest",
    )


class TrackingConfig(_Strict):
    """Where the runs are recorded (MLflow)."""

    tracking_uri: str | None = Field(None, description="MLflow URI; empty = $MLFLOW_TRACKING_URI or SQLite in workdir")
    experiment: str = Field("compactlm", min_length=1, description="MLflow experiment name")
    log_model: bool = Field(True, description="Upload the distilled student's files to MLflow")


# Run-level settings, shared by the recipe and every stage flow (one definition each).
Workdir = Annotated[str, Field(description="Folder for stage outputs (keyed by their inputs, so reruns reuse "
                                           "them) and the default MLflow store")]
Seed = Annotated[int, Field(ge=0, description="Seed for sampling, data order and training")]
DeviceSetting = Annotated[Device, Field(description="Where scoring, pruning, distillation and evaluation run; "
                                                    "auto = CUDA when available")]
RunnerSetting = Annotated[Runner, Field(
    description="Where parallel candidates run (a parameter budget's shapes): thread = this process, process = a "
    "local process pool, ray = a Ray cluster ($RAY_ADDRESS, else a local one; needs the ray extra)")]
TrackingSetting = Annotated[TrackingConfig, Field(default_factory=TrackingConfig,
                                                  description="Where the runs are recorded (MLflow)")]


class RunSettings(_Strict):
    """Where and how a run works: the recipe's workdir, seed, device, runner and tracking (every stage flow
    takes them as one parameter)."""

    workdir: Workdir = "runs"
    seed: Seed = 0
    device: DeviceSetting = "auto"
    runner: RunnerSetting = "thread"
    tracking: TrackingSetting


class Recipe(_Strict):
    """A whole compress pipeline: teacher -> generate -> [mix the training data] -> [correct the teacher] -> score
    -> prune (or a student of your own) -> distill [-> distill_then ...] -> evaluate -> [export]."""

    name: str = Field("compress", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name (letters, digits, _ . -)")
    teacher: str = Field(
        ...,
        description="The model to compress: a local Hugging Face folder, a .gguf file, a hub id (online only) or "
        "an alias: " + ", ".join(KNOWN_ALIASES),
    )
    student: str = Field(
        "pruned",
        description="pruned = the teacher cut to prune's shape (score + prune); or a model of your own to distill "
        "into, any family and tokenizer: a local folder, a .gguf file, a hub id or an alias",
    )
    workdir: Workdir = "runs"
    seed: Seed = 0
    device: DeviceSetting = "auto"
    runner: RunnerSetting = "thread"
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Synthetic data")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data: sources mixed by tokens")
    correct: CorrectConfig | None = Field(
        None, description="Teacher correction: fine-tune the teacher lightly on the training data first; scoring, "
        "pruning and distillation then use the corrected teacher (empty = off)",
    )
    score: ScoreConfig = Field(default_factory=ScoreConfig, description="Importance scoring")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="The student's shape")
    schedule: ScheduleConfig | None = Field(
        None, description="Prune in rounds, distilling in between, instead of one cut (needs student: pruned); "
        "empty = one cut",
    )
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Distillation")
    distill_then: list[DistillConfig] = Field(
        default_factory=list,
        description="More distillation stages, run in order on the same teacher and data, each from the student "
        "the one before made (e.g. off-policy KD, then on-policy KD with on_policy set); each is keyed, cached and "
        "resumable like distill. Empty = one stage",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Benchmarks")
    export: ExportConfig = Field(default_factory=ExportConfig,
                                 description="Deployable exports: GGUF for llama.cpp, quantized vLLM directories")
    tracking: TrackingSetting

    @field_validator("teacher")
    @classmethod
    def _teacher_ref(cls, v: str) -> str:
        check_model_ref(v)
        return v

    @field_validator("student")
    @classmethod
    def _student_ref(cls, v: str) -> str:
        if v != "pruned":
            check_model_ref(v)
        return v

    @model_validator(mode="after")
    def _offline_needs_the_original_teacher(self) -> Recipe:
        if self.correct is not None:
            for where, d in zip(["distill", *(f"distill_then.{i}" for i in range(len(self.distill_then)))],
                                self.distill_stages):
                if d.mode == "offline" and d.kd_weight > 0:
                    raise ValueError(f"{where}.mode: offline learns the targets the original teacher stored at "
                                     "generation, not the corrected teacher's: use mode: online, or drop correct")
        return self

    @model_validator(mode="after")
    def _schedule_fits(self) -> Recipe:
        if self.schedule is None:
            return self
        if not self.pruned_student:
            raise ValueError("schedule prunes the teacher in rounds: it needs student: pruned (a student of your own "
                             "is not pruned); drop schedule, or set student: pruned")
        if self.distill.steps < self.schedule.rounds:
            raise ValueError(f"distill.steps ({self.distill.steps}) cannot be split between schedule.rounds "
                             f"({self.schedule.rounds}): each round distills at least one step; raise distill.steps "
                             "or lower schedule.rounds")
        if self.prune.streaming:
            raise ValueError("schedule scores and prunes the distilled intermediate students, which streaming does not "
                             "do (it slices the teacher's files once): set prune.streaming: false, or drop schedule")
        return self

    @property
    def distill_stages(self) -> list[DistillConfig]:
        """Every distillation stage in order: distill, then distill_then's."""
        return [self.distill, *self.distill_then]

    @property
    def pruned_student(self) -> bool:
        return self.student == "pruned"

    def settings(self) -> RunSettings:
        """This recipe's run settings (what a stage flow takes as ``settings``)."""
        return RunSettings(**{k: getattr(self, k) for k in RunSettings.model_fields})
