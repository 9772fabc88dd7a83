"""The score, prune, distill and eval sections."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from compactlm.choices import BatchAgg, HiddenLoss, KDLoss, Proxy, SeqAgg
from compactlm.config.base import _existing_file, _Strict


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
    streaming: bool = Field(
        False, description="Run the calibration through one decoder layer at a time, each read from the teacher's "
        "safetensors files and freed after (memory: about one layer plus the calibration activations; for "
        "teachers larger than memory). The same scores; needs layer_loss: false",
    )

    #: Fields that change how the scores are computed, not what they are: left out of the stage key.
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"streaming"})

    @field_validator("data")
    @classmethod
    def _data_exists(cls, v: str) -> str:
        return v if v == "generated" else _existing_file(v, "score.data")

    @model_validator(mode="after")
    def _streaming_one_pass(self) -> ScoreConfig:
        if self.streaming and self.layer_loss:
            raise ValueError("streaming runs the calibration through each layer once; layer_loss needs a pass per "
                             "skipped layer: set layer_loss: false (layers are then ranked by block influence), or "
                             "streaming: false")
        return self


class BudgetConfig(_Strict):
    """A parameter budget: candidate shapes that fit it (depth only, width only, both) are pruned and ranked by a
    quick proxy on calibration data (optionally the best few again after a short distillation), and the best one
    is kept."""

    params: float = Field(..., gt=0, lt=1, description="Fraction of the teacher's parameters to keep, e.g. 0.5")
    candidates: int = Field(3, ge=1, description="How many of the best-ranked shapes to report")
    search: int = Field(8, ge=1, description="Candidate shapes to measure (at least one of each kind that fits)")
    proxy: Proxy = Field(
        "loss", description="Rank by the pruned model's calibration loss, or by KL(teacher || pruned); lower wins"
    )
    proxy_samples: int = Field(8, ge=1, description="Calibration sequences for the proxy")
    proxy_seq_len: int = Field(256, ge=8, description="Tokens per proxy calibration sequence")
    short_distill: DistillConfig | None = Field(
        None, description="Rank the best candidates by a short distillation instead (ModelOpt, Minitron): each of "
        "the top distill_top by the proxy is distilled with these settings on the generated data, then measured by "
        "the proxy again; the others keep their proxy order after them. Empty = the proxy alone",
    )
    distill_top: int = Field(3, ge=1, description="How many of the proxy's best candidates get the short distillation")


class RepairConfig(_Strict):
    """Rebuild part of what the removed heads and neurons contributed, without training: every kept layer's output
    projections (attention o_proj, MLP down_proj) refitted by least squares so that, on calibration text, they
    reproduce the teacher's outputs from the units the student keeps (compactlm.pruning.repair)."""

    method: Literal["least_squares"] = Field(
        "least_squares", description="least_squares = refit o_proj and down_proj on the teacher's activations"
    )
    hidden: Literal["slice", "pca"] = Field(
        "slice",
        description="How a smaller hidden size is cut: slice = keep the most important channels; pca = rotate "
        "the residual stream onto its principal components first (norm weights folded into the next "
        "projections; the student stays a plain model of its family), then keep the leading ones. pca: llama, "
        "mistral, qwen2, qwen3, phi3 teachers with an output head of their own (not tied to the embeddings)",
    )
    num_samples: int = Field(32, ge=1, description="Calibration sequences (from the prune stage's data)")
    seq_len: int = Field(256, ge=8, description="Tokens per calibration sequence")
    damping: float = Field(
        0.01, gt=0.0, le=100.0,
        description="Ridge strength toward the sliced weights, relative to the mean activation energy",
    )
    max_memory_gb: float = Field(
        2.0, gt=0.0, description="Memory for the activation statistics; larger teachers take more passes"
    )


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
    repair: RepairConfig | None = Field(
        None, description="After slicing, refit each layer's output projections to the teacher's outputs on "
        "calibration text (no training); empty = plain slicing",
    )
    streaming: bool = Field(
        False, description="Slice the teacher tensor by tensor from its safetensors files instead of loading it "
        "(memory: about one tensor; for teachers larger than RAM). The same student, byte for byte; an explicit "
        "shape without repair only",
    )

    #: Fields that change how the student is made, not what it is: left out of the stage key.
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"streaming"})

    @model_validator(mode="after")
    def _budget_or_shape(self) -> PruneConfig:
        if self.budget is not None:
            given = [f for f in SHAPE_FIELDS if getattr(self, f) is not None]
            if given:
                raise ValueError(f"give either a budget or an explicit shape, not both: unset {', '.join(given)} "
                                 "or budget")
        if self.streaming and (self.budget is not None or self.repair is not None):
            raise ValueError("streaming slices the teacher's files without running it; a budget and repair run "
                             "the teacher on calibration data: drop budget / repair, or set streaming: false")
        return self


class OnPolicyConfig(_Strict):
    """On-policy distillation (GKD, Agarwal et al. 2024): on a share of the steps the student writes the
    continuations of the data's prompts itself, and learns the teacher's distribution on its own samples."""

    fraction: float = Field(1.0, ge=0.0, le=1.0, description="Share of steps (λ) whose batch the student samples; "
                            "each step decides from the seed, the others train on the data")
    loss: KDLoss = Field("reverse_kl", description="Divergence on the student's samples: reverse_kl (mode-seeking, "
                         "as in GKD / MiniLLM), jsd (with distill.jsd_beta), forward_kl or tv")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Tokens the student samples per prompt")
    temperature: float = Field(1.0, gt=0.0, le=5.0, description="Sampling temperature of the student")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of the student (1 = off)")
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="What samples the student: hf = generate in the training process (weights always "
        "current); vllm = a vLLM engine in the same process, faster per sample once started, its weights copied "
        "from the student every refresh_every steps (single-process training, no lora)",
    )
    refresh_every: int = Field(1, ge=1, description="vllm: copy the student's weights into the engine every N steps "
                               "(1 = samples always from the current student; more = cheaper, slightly stale)")


class LoraConfig(_Strict):
    """Low-rank adapters (LoRA, Hu et al. 2021, through peft): train two small matrices beside each adapted weight
    instead of the weight itself; they are merged into the weights when the model is published, so the output is a
    plain HF model."""

    rank: int = Field(16, ge=1, le=4096, description="Rank r of each adapter")
    alpha: float = Field(32.0, gt=0.0, description="Scale: the update is (alpha / rank) x B @ A")
    targets: list[str] = Field(
        default_factory=list,
        description="Names of the linear layers to adapt, e.g. [q_proj, v_proj]; empty = every linear layer but "
        "the output head",
    )


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
    skip_rows: int = Field(
        0, ge=0, description="Training rows to pass over first, in the seeded data order (a schedule's later rounds "
        "continue where the round before stopped); 0 = from the start",
    )
    jsd_beta: float = Field(0.5, gt=0.0, lt=1.0, description="Teacher weight in the JSD mixture; 0.5 = symmetric")
    chunk_size: int = Field(1024, ge=1, description="Tokens per chunk of the loss (bounds its memory)")
    micro_batch_size: int | None = Field(None, ge=1, description="Sequences per forward pass; empty = batch_size")
    gradient_checkpointing: bool = Field(
        False, description="Recompute the student's activations in the backward pass (less memory, ~30% slower)"
    )
    strategy: Literal["single", "ddp", "fsdp"] = Field(
        "single",
        description="single = one process; ddp = nproc processes, a full student each; fsdp = nproc processes "
        "sharing the student's weights, gradients and optimizer state (and the online teacher's weights) in "
        "shards: for students that do not fit one device. The ranks are started for you (torchrun)",
    )
    nproc: int = Field(1, ge=1, le=1024, description="Processes for ddp / fsdp: one per GPU (on CPU they share the "
                       "cores)")
    checkpoint_every: int | None = Field(
        None, ge=1,
        description="Save a checkpoint every N steps; a stopped run resumes from the last one (empty = off)",
    )
    hidden_weight: float = Field(0.0, ge=0.0, description="Weight of hidden-state KD (0 = off; online mode only)")
    hidden_loss: HiddenLoss = Field(
        "cosine", description="Hidden-state distance: cosine = 1 - cos per token, mse = mean squared error"
    )
    on_policy: OnPolicyConfig | None = Field(
        None, description="Also train on the student's own samples, scored by the teacher (needs mode: online and "
        "a student with the teacher's tokenizer); empty = off-policy only",
    )
    lora: LoraConfig | None = Field(
        None, description="Train low-rank adapters instead of every weight (merged when published); empty = full "
        "training",
    )
    peak_tflops: float | None = Field(
        None, gt=0,
        description="Peak TFLOP/s of one device in the training dtype, for the MFU metric; empty = known GPUs' "
        "bf16 peak (H100, A100, L4, ...), no MFU on CPU",
    )

    #: Fields that change how a run is observed, not what it computes: left out of the stage key, so changing
    #: them reuses a finished student.
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"log_every", "checkpoint_every", "peak_tflops", "strategy",
                                                      "nproc"})

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
        if self.on_policy is not None and self.mode == "offline":
            raise ValueError("on_policy needs the teacher to score the student's samples, which offline mode does "
                             "not load: use mode: online, or drop on_policy")
        op = self.on_policy
        if op is not None and op.engine == "vllm" and self.lora is not None:
            raise ValueError("on_policy.engine: vllm samples from the full weights, which LoRA keeps apart until the "
                             "end: use on_policy.engine: hf with lora")
        if op is not None and op.engine == "vllm" and self.checkpoint_every and \
                self.checkpoint_every % op.refresh_every:
            raise ValueError(f"checkpoint_every ({self.checkpoint_every}) must be a multiple of "
                             f"on_policy.refresh_every ({op.refresh_every}): a resumed run restarts vLLM from the "
                             "checkpoint's weights, which must be the ones it was sampling from")
        if self.strategy == "single" and self.nproc > 1:
            raise ValueError(f"nproc={self.nproc} needs strategy: ddp or fsdp (single is one process)")
        if self.strategy == "fsdp" and (self.lora is not None or self.on_policy is not None):
            raise ValueError("strategy: fsdp trains full weights off-policy: drop lora / on_policy, or use "
                             "strategy: ddp")
        if self.on_policy is not None and self.on_policy.max_new_tokens >= self.seq_len:
            raise ValueError(f"on_policy.max_new_tokens ({self.on_policy.max_new_tokens}) must be below seq_len "
                             f"({self.seq_len}): a sample and some of its prompt share one training sequence")
        return self

    @property
    def runs_teacher(self) -> bool:
        """The teacher model runs on every batch: online logit KD, hidden-state KD or on-policy KD."""
        return (self.kd_weight > 0 and self.mode == "online") or self.hidden_weight > 0 or self.on_policy is not None


class CorrectConfig(_Strict):
    """Teacher correction (Minitron; Sreenivas et al. 2024): a short full fine-tune of the teacher on the training
    data before it is scored, pruned and distilled from, so that it fits data it was not trained on (your
    corpora, another domain). Every later stage uses the corrected teacher; the evaluation compares the student
    with the original teacher and shows the corrected one beside it."""

    steps: int = Field(20, ge=1, description="Optimizer steps")
    batch_size: int = Field(4, ge=1, description="Sequences per step")
    seq_len: int = Field(256, ge=8, description="Tokens per training sequence (examples are packed)")
    lr: float | None = Field(None, gt=0.0, le=1.0, description="Peak learning rate (AdamW); empty = 1e-5 (full: "
                             "small, to adapt, not relearn) or 2e-4 (lora)")
    warmup_steps: int = Field(2, ge=0, description="Steps of linear warmup before the cosine decay")
    micro_batch_size: int | None = Field(None, ge=1, description="Sequences per forward pass; empty = batch_size")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less "
                                         "memory, ~30% slower)")
    checkpoint_every: int | None = Field(None, ge=1, description="Save a checkpoint every N steps; a stopped run "
                                         "resumes from the last one (empty = off)")
    lora: LoraConfig | None = Field(None, description="Fine-tune low-rank adapters (peft), merged into the teacher's "
                                    "weights afterwards; empty = a full fine-tune")

    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"checkpoint_every"})

    @model_validator(mode="before")
    @classmethod
    def _default_lr(cls, data):
        """An empty lr becomes the method's default, so the run logs (and keys) the rate it trains with."""
        if isinstance(data, dict) and data.get("lr") is None:
            data = {**data, "lr": 2e-4 if data.get("lora") is not None else 1e-5}
        return data

    @model_validator(mode="after")
    def _valid_training(self) -> CorrectConfig:
        try:  # the same checks as distill's (warmup within steps, micro-batches divide the batch)
            self.training()
        except ValidationError as e:
            raise ValueError("; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())) from None
        return self

    def training(self) -> DistillConfig:
        """The fine-tune as the distill trainer runs it: the data's next token only (kd_weight 0, no teacher)."""
        return DistillConfig(kd_weight=0.0, **self.model_dump(), log_every=max(1, self.steps // 20))


class JsonlTask(_Strict):
    """A multiple-choice task from a local .jsonl file, one question per line: prompted as "Question: <question>
    Answer:", each choice scored as its continuation, acc and acc_norm reported. List its name in eval.tasks."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
                      description="Task name, as listed in eval.tasks and shown in the results")
    path: str = Field(..., description="The .jsonl file (a relative path is taken from the current directory)")
    question: str = Field("question", description="Field holding the question text")
    choices: str = Field("choices", description="Field holding the list of choices (at least two strings)")
    answer: str = Field("answer", description="Field holding the correct choice: its index (0-based) or its text")

    @field_validator("path")
    @classmethod
    def _jsonl_exists(cls, v: str) -> str:
        if not v.endswith(".jsonl"):
            raise ValueError(f"give a .jsonl file (one JSON object per line), got {v!r}")
        return _existing_file(v, ".jsonl")


class EvalConfig(_Strict):
    """Benchmarks (lm-eval) and held-out perplexity, the same for teacher, pruned model and student."""

    tasks: list[str] = Field(
        default_factory=lambda: ["compactlm_facts"],
        description="lm-eval tasks: the shipped compactlm_* tasks, names from include_path or jsonl_tasks, or "
        "standard lm-eval task names whose data is in the local HF cache",
    )
    include_path: str | None = Field(
        None,
        description="Folder of your own lm-eval task YAMLs (searched recursively); list their task names in tasks. "
        "Relative data_files in them are taken from the YAML's folder, ${data_dir} is eval.data_dir",
    )
    jsonl_tasks: list[JsonlTask] = Field(
        default_factory=list,
        description="Multiple-choice tasks from local .jsonl files with a field mapping; list their names in tasks",
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
    tensor_parallel_size: int = Field(
        1, ge=1, description="vllm backend: GPUs per engine (tensor parallel), for a model larger than one GPU",
    )
    speed: bool = Field(True, description="Also measure decode speed: greedy, 16 new tokens per prompt at batch 1 "
                        "and batch 8, the models interleaved over 3 rounds (medians); a model evaluated alone: "
                        "8 prompts x 32 tokens at batch 8")
    shared_prefix: bool = Field(
        True,
        description="hf backend: score a multiple-choice question's choices in one forward with their shared "
        "context (run once), same scores as lm-eval's per-choice scoring and ~1.9x faster; false = lm-eval's "
        "plain HFLM",
    )
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

    @field_validator("include_path")
    @classmethod
    def _include_is_dir(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_dir():
            raise ValueError(f"folder not found: {v!r} (give the folder holding your lm-eval task YAMLs)")
        return v

    @model_validator(mode="after")
    def _tensor_parallel_needs_vllm(self) -> EvalConfig:
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError(f"tensor_parallel_size: {self.tensor_parallel_size} splits a model over GPUs with vLLM; "
                             "set backend: vllm (or tensor_parallel_size: 1)")
        return self

    @model_validator(mode="after")
    def _jsonl_tasks_listed(self) -> EvalConfig:
        names = [t.name for t in self.jsonl_tasks]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"jsonl_tasks: two tasks are named {name!r}; give each its own name")
            if name not in self.tasks:
                raise ValueError(f"jsonl_tasks.{i}.name: {name!r} is defined but not listed in tasks; add it to "
                                 "tasks to evaluate it (or remove its definition)")
        return self


BudgetConfig.model_rebuild()  # short_distill names DistillConfig, defined below it
PruneConfig.model_rebuild()
