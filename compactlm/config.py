"""The recipe schema: one pydantic model per stage, and :class:`Recipe`, a whole pipeline.

These models are the Prefect UI's forms (field descriptions, defaults and bounds come from here) and the only
definition of what a recipe may say. Bad values fail here, before any compute, with pydantic's error naming the
field. Loading YAML, ``--set`` overrides and error formatting are :mod:`compactlm.recipe`; checks that need the
teacher's config are :mod:`compactlm.preflight`. Nothing here imports torch, transformers or prefect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compactlm.choices import BatchAgg, Device, Dtype, Engine, HiddenLoss, KDLoss, Proxy, Runner, SeqAgg
from compactlm.models import KNOWN_ALIASES, check_model_ref
from compactlm.templates import template_fields


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    #: Keys that moved into a section: old key -> section. A recipe that still uses one gets an error that names
    #: the new place instead of "unknown key".
    MOVED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [k for k in data if k in cls.MOVED]
            if moved:
                raise ValueError("; ".join(f"{k!r} moved into the {cls.MOVED[k]!r} section: write it as "
                                           f"{cls.MOVED[k]}: {{{k}: ...}}" for k in moved))
        return data


def _existing_file(value: str | None, what: str) -> str | None:
    if value is None or "://" in value:  # fsspec URLs are checked when read
        return value
    if not Path(value).expanduser().is_file():
        raise ValueError(f"{what} file not found: {value!r} (give an existing path)")
    return value


#: Words that mark an instruction a text-only model cannot carry out (from the Self-Instruct paper's filter).
SELF_INSTRUCT_BLOCKED_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
                               "map", "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart",
                               "diagram")


class SelfInstructConfig(_Strict):
    """Self-Instruct expansion: the teacher writes new instructions from random few-shot subsets of the seeds.

    Pass 1 asks ``ceil(num_instructions * oversample)`` times for one new instruction (each prompt shows
    `seeds_per_prompt` seeds drawn with the run seed); the candidates are parsed and filtered (length, text
    that is not an instruction, blocked words, near-duplicates of the seeds and of each other) and the first
    `num_instructions` survivors, in prompt order, are kept. Pass 2 answers them like any prompt set.
    """

    num_instructions: int = Field(1000, ge=1, le=1_000_000, description="New instructions to keep (at most)")
    oversample: float = Field(
        2.0, ge=1.0, le=50.0,
        description="Instruction-writing requests per wanted instruction (filters drop some candidates)",
    )
    seeds_per_prompt: int = Field(3, ge=1, le=16, description="Seed examples shown in each instruction-writing prompt")
    include_seeds: bool = Field(True, description="Also answer the seed prompts themselves (they come first)")
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="Sampling temperature for writing instructions")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus threshold for writing instructions")
    max_tokens: int = Field(64, ge=4, le=4096, description="Max new tokens per written instruction")
    min_words: int = Field(3, ge=1, description="Drop instructions with fewer words")
    max_words: int = Field(150, ge=1, description="Drop instructions with more words")
    near_dup_threshold: float = Field(
        0.7, gt=0.0, le=1.0,
        description="Drop an instruction whose MinHash Jaccard similarity to a seed or an earlier kept "
        "instruction is at least this",
    )
    blocked_words: list[str] = Field(
        list(SELF_INSTRUCT_BLOCKED_WORDS),
        description="Drop instructions containing any of these words (tasks a text model cannot do)",
    )

    @model_validator(mode="after")
    def _words_order(self) -> SelfInstructConfig:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        return self


class FilterConfig(_Strict):
    """Quality filters for the teacher's completions; each filter's drop count is in the dataset's manifest."""

    min_tokens: int = Field(1, ge=0, description="Drop completions shorter than this many tokens (EOS excluded)")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Drop completions longer than this many tokens (EOS excluded); empty = no limit"
    )
    drop_truncated: bool = Field(False, description="Drop completions cut off by max_tokens instead of ending")
    max_repetition: float | None = Field(
        0.5, gt=0.0, le=1.0,
        description="Drop degenerate completions whose share of repeated token n-grams (1 - unique / total) is "
        "above this; empty = off",
    )
    repetition_ngram: int = Field(4, ge=1, le=32, description="n of the n-grams max_repetition counts")
    dedup: bool = Field(True, description="Drop exact duplicate completions (ignoring case and whitespace)")
    near_dup_threshold: float | None = Field(
        0.9, gt=0.0, le=1.0,
        description="Drop a completion whose estimated Jaccard similarity (MinHash over word 3-grams) to an "
        "earlier kept one is at least this; empty = off",
    )
    minhash_num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (accuracy vs speed)")

    @model_validator(mode="after")
    def _lengths_order(self) -> FilterConfig:
        if self.max_completion_tokens is not None and self.max_completion_tokens < self.min_tokens:
            raise ValueError(f"max_completion_tokens ({self.max_completion_tokens}) must be >= min_tokens "
                             f"({self.min_tokens})")
        return self


class GenerateConfig(_Strict):
    """Synthetic data: the teacher answers prompts (vLLM offline batch, or Hugging Face generate)."""

    MOVED: ClassVar[dict[str, str]] = {k: "filters" for k in FilterConfig.model_fields}

    prompts: str = Field(
        "builtin",
        description="'builtin' (64 shipped instructions), a .jsonl / .json / .csv / .parquet file, a folder saved "
        "with datasets' save_to_disk, or 'hf:<dataset id>' for a Hugging Face dataset (needs network or a cached "
        "copy)",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt text (ignored with template)")
    template: str | None = Field(
        None,
        description="Build each prompt from its row's fields instead, e.g. '{instruction}\\n\\n{input}' "
        "(surrounding whitespace is stripped)",
    )
    hf_split: str = Field("train", description="Split of an 'hf:' or save_to_disk dataset")
    hf_subset: str | None = Field(None, description="Configuration (subset) of an 'hf:' dataset")
    system_prompt: str | None = Field(None, description="System message sent before every prompt (chat mode only)")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts; empty = all")
    n: int = Field(1, ge=1, le=64, description="Completions per prompt")
    max_tokens: int = Field(128, ge=1, le=32768, description="Maximum new tokens per completion")
    temperature: float = Field(0.8, ge=0.0, le=5.0, description="Sampling temperature (0 = greedy)")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest token set with "
                         "this much probability")
    chat: Literal["auto", "on", "off"] = Field(
        "auto", description="Wrap prompts in the teacher's chat template: auto = when the teacher has one"
    )
    engine: Engine = Field("vllm", description="vllm (fast batch inference) or hf (Hugging Face generate)")
    dtype: Dtype = Field("auto", description="Inference dtype; auto = bf16 where native, else fp32")
    max_model_len: int = Field(1024, ge=64, description="Context length (prompt + completion) given to the engine")
    batch_size: int = Field(64, ge=1, description="Prompts per batch with engine hf (vLLM schedules its own)")
    shard_size: int = Field(256, ge=1, description="Prompts per output file; a stopped run resumes at the first "
                            "unfinished one")
    self_instruct: SelfInstructConfig | None = Field(
        None, description="Grow the prompt set first: the teacher writes new instructions from the prompts "
        "(Self-Instruct), which are filtered, deduplicated and answered too; empty = off",
    )
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Which completions to keep")
    topk_logprobs: int = Field(
        0, ge=0, le=100,
        description="Also store the teacher's top-k log-probs per token, for distill.mode offline (0 = off)",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM engine (tensor parallel)")

    @field_validator("prompts")
    @classmethod
    def _prompts_exist(cls, v: str) -> str:
        if v == "builtin":
            return v
        if v.startswith("hf:"):
            if not v[3:].strip():
                raise ValueError("prompts 'hf:' needs a dataset id, e.g. 'hf:tatsu-lab/alpaca'")
            return v
        if Path(v).expanduser().is_dir():
            return v
        if Path(v).suffix.lower() not in {".jsonl", ".json", ".csv", ".parquet"}:
            raise ValueError(f"prompts must be 'builtin', 'hf:<dataset id>', a save_to_disk directory or a "
                             f".jsonl/.json/.csv/.parquet file, got {v!r}")
        return _existing_file(v, "prompts")

    @field_validator("template")
    @classmethod
    def _template_ok(cls, v: str | None) -> str | None:
        if v is not None:
            template_fields(v)
        return v


class ScoreConfig(_Strict):
    """Importance of every head, MLP neuron, embedding channel and layer, from the teacher's activations on
    calibration text (Minitron)."""

    data: str = Field("generated", description="'generated' = the generated answers, or a .txt / .jsonl file of text")
    text_field: str = Field("text", description="Field holding the text when data is a .jsonl file")
    num_samples: int = Field(32, ge=1, description="Calibration sequences")
    seq_len: int = Field(256, ge=8, description="Tokens per calibration sequence")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass")
    seq_agg: SeqAgg = Field("mean", description="How a unit's activations are reduced over a sequence")
    batch_agg: BatchAgg = Field("l2", description="How the per-sequence values are reduced over the sequences")
    layer_loss: bool = Field(True, description="Also measure the loss rise with each layer skipped (a pass per layer)")

    @field_validator("data")
    @classmethod
    def _data_exists(cls, v: str) -> str:
        return v if v == "generated" else _existing_file(v, "score.data")


class BudgetConfig(_Strict):
    """A parameter budget: candidate shapes that fit it (depth only, width only, both) are pruned and ranked by a
    quick proxy on calibration data, and the best one is kept."""

    params: float = Field(..., gt=0, lt=1, description="Fraction of the teacher's parameters to keep, e.g. 0.5")
    candidates: int = Field(3, ge=1, description="How many of the best-ranked shapes to report")
    search: int = Field(8, ge=1, description="Candidate shapes to measure (at least one of each kind that fits)")
    proxy: Proxy = Field(
        "loss", description="Rank by the pruned model's calibration loss, or by KL(teacher || pruned); lower wins"
    )
    proxy_samples: int = Field(8, ge=1, description="Calibration sequences for the proxy")
    proxy_seq_len: int = Field(256, ge=8, description="Tokens per proxy calibration sequence")


#: The student shape fields of PruneConfig (unset = keep the teacher's value).
SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")


class PruneConfig(_Strict):
    """The student's shape, either given field by field (unset fields keep the teacher's value) or chosen within a
    parameter budget (the budget section)."""

    MOVED: ClassVar[dict[str, str]] = {k: "budget" for k in BudgetConfig.model_fields}

    num_hidden_layers: int | None = Field(None, ge=1, description="Layers to keep (depth pruning)")
    hidden_size: int | None = Field(None, ge=1, description="Embedding channels to keep")
    intermediate_size: int | None = Field(None, ge=1, description="MLP neurons to keep in every layer")
    num_attention_heads: int | None = Field(
        None, ge=1, description="Query heads to keep in every layer (a multiple of the key/value heads)"
    )
    budget: BudgetConfig | None = Field(
        None, description="Instead of a shape: a parameter budget, the best candidate shape is chosen; empty = use "
        "the shape fields",
    )
    layer_metric: Literal["block_influence", "loss"] = Field(
        "block_influence",
        description="Which layers to drop first: lowest block influence (1 - cos(input, output)), or lowest loss "
        "increase when skipped (needs score.layer_loss)",
    )
    rescale_norms: bool = Field(
        True,
        description="When channels are removed, scale the RMSNorm weights by sqrt(D/D') so the kept channels keep "
        "their scale",
    )

    @model_validator(mode="after")
    def _budget_or_shape(self) -> PruneConfig:
        if self.budget is not None:
            given = [f for f in SHAPE_FIELDS if getattr(self, f) is not None]
            if given:
                raise ValueError(f"give either a budget or an explicit shape, not both: unset {', '.join(given)} "
                                 "or budget")
        return self


class DistillConfig(_Strict):
    """Knowledge distillation of the student from the teacher: logit KD, optionally hidden-state KD."""

    mode: Literal["online", "offline"] = Field(
        "online",
        description="online = the teacher runs on every batch; offline = use the top-k log-probs stored at "
        "generation (needs generate.topk_logprobs > 0; the teacher is not loaded)",
    )
    loss: KDLoss = Field("forward_kl", description="Divergence: forward_kl, reverse_kl, jsd or tv")
    temperature: float = Field(1.0, gt=0.0, le=20.0, description="Softening temperature T (loss scaled by T²)")
    kd_weight: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Weight of the teacher's distribution; the data's next token (CE) gets 1 - kd_weight. 0 = plain "
        "fine-tuning on the teacher's text",
    )
    steps: int = Field(20, ge=1, description="Optimizer steps")
    batch_size: int = Field(4, ge=1, description="Sequences per step")
    seq_len: int = Field(256, ge=8, description="Tokens per training sequence (examples are packed)")
    lr: float = Field(3e-4, gt=0.0, le=1.0, description="Peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (weight matrices only)")
    warmup_steps: int = Field(2, ge=0, description="Steps of linear warmup before the cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="The cosine decay ends at lr x this")
    grad_clip: float = Field(1.0, gt=0.0, description="Clip the gradient norm to this")
    log_every: int = Field(1, ge=1, description="Log metrics every N steps")
    jsd_beta: float = Field(0.5, gt=0.0, lt=1.0, description="Teacher weight in the JSD mixture; 0.5 = symmetric")
    chunk_size: int = Field(1024, ge=1, description="Tokens per chunk of the loss (bounds its memory)")
    micro_batch_size: int | None = Field(None, ge=1, description="Sequences per forward pass; empty = batch_size")
    gradient_checkpointing: bool = Field(
        False, description="Recompute the student's activations in the backward pass (less memory, ~30% slower)"
    )
    checkpoint_every: int | None = Field(
        None, ge=1,
        description="Save a checkpoint every N steps; a stopped run resumes from the last one (empty = off)",
    )
    hidden_weight: float = Field(0.0, ge=0.0, description="Weight of hidden-state KD (0 = off; online mode only)")
    hidden_loss: HiddenLoss = Field(
        "cosine", description="Hidden-state distance: cosine = 1 - cos per token, mse = mean squared error"
    )
    peak_tflops: float | None = Field(
        None, gt=0,
        description="Peak TFLOP/s of one device in the training dtype, for the MFU metric; empty = known GPUs' "
        "bf16 peak (H100, A100, L4, ...), no MFU on CPU",
    )

    #: Fields that change how a run is observed, not what it computes: left out of the stage key, so changing
    #: them reuses a finished student.
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"log_every", "checkpoint_every", "peak_tflops"})

    @model_validator(mode="after")
    def _warmup_fits(self) -> DistillConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) must divide batch_size "
                             f"({self.batch_size})")
        if self.mode == "offline" and self.hidden_weight > 0:
            raise ValueError("hidden_weight > 0 needs the teacher's hidden states, which offline mode does not "
                             "have: use mode: online, or hidden_weight: 0")
        return self


class EvalConfig(_Strict):
    """Benchmarks (lm-eval) and held-out perplexity, the same for teacher, pruned model and student."""

    tasks: list[str] = Field(
        default_factory=lambda: ["compactlm_facts"],
        description="lm-eval tasks: the shipped compactlm_* tasks or standard lm-eval task names",
    )
    limit: int | None = Field(None, ge=1, description="Questions per task (empty = all); perplexity reads all")
    num_fewshot: int = Field(0, ge=0, le=25, description="Worked examples in each prompt")
    batch_size: int = Field(16, ge=1, description="Scoring batch size")
    perplexity: bool = Field(True, description="Also measure perplexity on held-out text")
    perplexity_text: str = Field("builtin", description="'builtin' or a .txt file (documents separated by blank lines)")
    max_length: int | None = Field(
        None, ge=16, description="Context length for scoring and the perplexity window; empty = the model's own")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype for scoring; auto = float32 on CPU, bfloat16 on CUDA"
    )
    bootstrap_iters: int = Field(0, ge=0, description="lm-eval bootstrap iterations for standard errors (0 = off)")
    data_dir: str | None = Field(
        None,
        description="Folder with local copies of the benchmark datasets that compactlm_arc_easy, compactlm_hellaswag "
        "and the other compactlm_* benchmarks read (one sub-folder per benchmark); not needed for compactlm_facts",
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="Scoring engine: hf = Hugging Face model in this process; vllm = vLLM in a child process",
    )
    speed: bool = Field(True, description="Also measure generation speed (greedy, 8 prompts x 32 new tokens, batch 8)")
    min_recovery: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Quality gate: fail the run when the student keeps less than this fraction of the teacher "
        "(the table's '% of teacher kept' / 100); empty = no gate",
    )

    @field_validator("tasks")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one task (e.g. compactlm_facts)")
        return v

    @field_validator("perplexity_text")
    @classmethod
    def _text_exists(cls, v: str) -> str:
        return v if v == "builtin" else _existing_file(v, "perplexity_text")


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
    """A whole compress pipeline: teacher -> generate -> score -> prune -> distill -> evaluate."""

    name: str = Field("compress", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name (letters, digits, _ . -)")
    teacher: str = Field(
        ...,
        description="The model to compress: a local Hugging Face folder, a .gguf file, a hub id (online only) or "
        "an alias: " + ", ".join(KNOWN_ALIASES),
    )
    workdir: Workdir = "runs"
    seed: Seed = 0
    device: DeviceSetting = "auto"
    runner: RunnerSetting = "thread"
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Synthetic data")
    score: ScoreConfig = Field(default_factory=ScoreConfig, description="Importance scoring")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="The student's shape")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Distillation")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Benchmarks")
    tracking: TrackingSetting

    @field_validator("teacher")
    @classmethod
    def _teacher_ref(cls, v: str) -> str:
        check_model_ref(v)
        return v

    def settings(self) -> RunSettings:
        """This recipe's run settings (what a stage flow takes as ``settings``)."""
        return RunSettings(**{k: getattr(self, k) for k in RunSettings.model_fields})
