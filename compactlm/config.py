"""Recipe and stage configs.

Every stage takes one pydantic model, so the Prefect UI renders it as a form and bad input fails before any
compute. A whole pipeline is one :class:`Recipe`, loaded from YAML with :func:`load_recipe`.
Nothing here imports torch, transformers or prefect: validating a recipe takes milliseconds.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compactlm.models import KNOWN_ALIASES, check_model_ref


class RecipeError(ValueError):
    """A recipe or stage config is invalid. The message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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

_TEMPLATE_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def template_fields(template: str) -> list[str]:
    """The row fields a prompt template names, e.g. ``"{instruction}\n\n{input}"`` -> [instruction, input].

    Only plain ``{field}`` placeholders are allowed (no attribute/index access, no conversions or format
    specs), so a recipe's template can read a row's values and nothing else. Raises ValueError otherwise.
    """
    import string

    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a valid format string ({e}); "
                         "write literal braces as '{{' and '}}'") from None
    fields = []
    for _, name, spec, conv in parts:
        if name is None:
            continue
        if not _TEMPLATE_FIELD.match(name) or spec or conv:
            raise ValueError(f"template placeholder {{{name}{'!' + conv if conv else ''}"
                             f"{':' + spec if spec else ''}}} is not allowed: use plain {{field}} names")
        fields.append(name)
    if not fields:
        raise ValueError(f"template {template!r} names no field; use e.g. '{{instruction}}\\n\\n{{input}}'")
    return fields


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
    seeds_per_prompt: int = Field(
        3, ge=1, le=16, description="Seed examples shown in each instruction-writing prompt (seeded random subset)"
    )
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


class GenerateConfig(_Strict):
    """Synthetic data: the teacher answers seed prompts (vLLM offline batch; HF generate as fallback)."""

    prompts: str = Field(
        "builtin",
        description="'builtin' for the shipped seed prompts; a local .jsonl/.json/.csv/.parquet file; a "
        "directory saved with datasets' save_to_disk; or 'hf:<dataset id>' for a Hugging Face hub dataset "
        "(needs network or the local HF cache)",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt text (ignored with template)")
    template: str | None = Field(
        None,
        description="Build each prompt from its row with a format string over the row's fields, e.g. "
        "'{instruction}\\n\\n{input}'; the result is stripped of surrounding whitespace",
    )
    hf_split: str = Field("train", description="Split of an 'hf:' or save_to_disk dataset")
    hf_subset: str | None = Field(None, description="Config (subset) name of an 'hf:' dataset")
    system_prompt: str | None = Field(None, description="Optional system message (chat mode only)")
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many prompts (None = all)")
    n: int = Field(1, ge=1, le=64, description="Completions per prompt")
    max_tokens: int = Field(128, ge=1, le=32768, description="Max new tokens per completion")
    temperature: float = Field(0.8, ge=0.0, le=5.0, description="Sampling temperature (0 = greedy)")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling threshold")
    chat: Literal["auto", "on", "off"] = Field(
        "auto", description="Apply the teacher's chat template: auto = when it has one"
    )
    engine: Literal["vllm", "hf"] = Field("vllm", description="vLLM (fast) or HF generate (fallback)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Inference dtype; auto = bfloat16 on GPU and on CPUs with native bf16, else float32"
    )
    max_model_len: int = Field(1024, ge=64, description="Context length given to the engine")
    batch_size: int = Field(64, ge=1, description="HF engine batch size (vLLM schedules its own)")
    shard_size: int = Field(256, ge=1, description="Prompts per output shard (the unit of resume)")
    self_instruct: SelfInstructConfig | None = Field(
        None, description="Grow the prompt set first: the teacher writes new instructions from the seed prompts "
        "(Self-Instruct), which are filtered, deduplicated and then answered; None = off",
    )
    # ---- completion filters (each one's drop count is in the manifest's stats.dropped)
    min_tokens: int = Field(1, ge=0, description="Drop completions shorter than this many tokens (EOS excluded)")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Drop completions longer than this many tokens (EOS excluded); None = off"
    )
    drop_truncated: bool = Field(
        False, description="Drop completions cut off by max_tokens (finish_reason 'length')"
    )
    max_repetition: float | None = Field(
        0.5, gt=0.0, le=1.0,
        description="Drop degenerate completions: the share of repeated token n-grams (1 - unique/total) is "
        "above this; None = off",
    )
    repetition_ngram: int = Field(4, ge=1, le=32, description="n of the n-grams max_repetition counts")
    dedup: bool = Field(True, description="Drop exact-duplicate completions (case and whitespace folded)")
    near_dup_threshold: float | None = Field(
        0.9, gt=0.0, le=1.0,
        description="Drop a completion whose MinHash Jaccard similarity (word 3-gram shingles) to an earlier "
        "kept one is at least this; None = off",
    )
    minhash_num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (accuracy vs speed)")
    topk_logprobs: int = Field(
        0, ge=0, le=100, description="Store the teacher's top-k log-probs per token (0 = off)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel size (multi-GPU)")

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

    @model_validator(mode="after")
    def _lengths_order(self) -> GenerateConfig:
        if self.max_completion_tokens is not None and self.max_completion_tokens < self.min_tokens:
            raise ValueError(f"max_completion_tokens ({self.max_completion_tokens}) must be >= min_tokens "
                             f"({self.min_tokens})")
        return self


class ScoreConfig(_Strict):
    """Activation-based importance (Minitron): heads, neurons, embedding channels, layers."""

    data: str = Field(
        "generated",
        description="'generated' = the synthetic dataset; or a local text/jsonl file of calibration text",
    )
    text_field: str = Field("text", description="Column with the text when data is a .jsonl file")
    num_samples: int = Field(32, ge=1, description="Calibration sequences")
    seq_len: int = Field(256, ge=8, description="Tokens per calibration sequence")
    batch_size: int = Field(8, ge=1, description="Forward batch size")
    seq_agg: Literal["mean", "l2", "var"] = Field("mean", description="Aggregation over the sequence")
    batch_agg: Literal["l2", "mean", "var"] = Field("l2", description="Aggregation over the batch")
    layer_loss: bool = Field(
        True, description="Also measure the loss increase when each layer is skipped (one pass per layer)"
    )

    @field_validator("data")
    @classmethod
    def _data_exists(cls, v: str) -> str:
        return v if v == "generated" else _existing_file(v, "score.data")


class PruneConfig(_Strict):
    """Target shape of the student. Unset fields keep the teacher's value."""

    num_hidden_layers: int | None = Field(None, ge=1, description="Layers to keep (depth pruning)")
    hidden_size: int | None = Field(None, ge=1, description="Embedding channels to keep")
    intermediate_size: int | None = Field(None, ge=1, description="MLP neurons to keep per layer")
    num_attention_heads: int | None = Field(
        None, ge=1, description="Query heads to keep per layer (a multiple of num_key_value_heads)"
    )
    layer_metric: Literal["block_influence", "loss"] = Field(
        "block_influence", description="Layer score used for depth pruning"
    )
    rescale_norms: bool = Field(
        True,
        description="When channels are pruned, scale RMSNorm weights by sqrt(D/D') so the normalized "
        "scale is kept (exact for removed all-zero channels)",
    )
    params: float | None = Field(
        None, gt=0, lt=1,
        description="Parameter budget as a fraction of the teacher's parameters (e.g. 0.5). Instead of the "
        "shape fields: candidate shapes (depth-only, width-only, mixed) that fit are ranked by `proxy` on "
        "calibration data and the best is pruned",
    )
    candidates: int = Field(3, ge=1, description="With params: how many top-ranked candidate shapes to return")
    search: int = Field(
        8, ge=1, description="With params: candidate shapes scored with the proxy (at least one per kind that fits)"
    )
    proxy: Literal["loss", "kl"] = Field(
        "loss",
        description="With params: rank candidates by calibration loss ('loss') or KL(teacher || student) "
        "('kl') right after pruning, lower is better",
    )
    proxy_samples: int = Field(8, ge=1, description="With params: calibration sequences for the proxy")
    proxy_seq_len: int = Field(256, ge=8, description="With params: tokens per proxy calibration sequence")

    @model_validator(mode="after")
    def _budget_or_shape(self) -> "PruneConfig":
        if self.params is not None:
            given = [f for f in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
                     if getattr(self, f) is not None]
            if given:
                raise ValueError(f"give either params (a parameter budget) or an explicit shape, not both: "
                                 f"unset {', '.join(given)} or params")
        return self


class DistillConfig(_Strict):
    """Logit knowledge distillation of the pruned student from the teacher."""

    mode: Literal["online", "offline"] = Field(
        "online",
        description="online = teacher forward on every batch; offline = KD from the top-k log-probs stored by "
        "generation (needs generate.topk_logprobs > 0; the teacher is not loaded)",
    )
    loss: Literal["forward_kl", "reverse_kl", "jsd", "tv"] = Field("forward_kl", description="KD divergence")
    temperature: float = Field(1.0, gt=0.0, le=20.0, description="KD temperature (loss scaled by T^2)")
    kd_weight: float = Field(1.0, ge=0.0, le=1.0, description="Weight of KD; CE on the data gets 1 - kd_weight")
    steps: int = Field(20, ge=1, description="Optimizer steps")
    batch_size: int = Field(4, ge=1, description="Sequences per step")
    seq_len: int = Field(256, ge=8, description="Tokens per packed training sequence")
    lr: float = Field(
        3e-4, gt=0.0, le=1.0,
        description="Peak learning rate (AdamW); 3e-4 beat 1e-4 and 1e-3 in benchmarks/quality.py",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (matrices only, not norms/biases)")
    warmup_steps: int = Field(2, ge=0, description="Linear warmup steps before cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine decay ends at lr * min_lr_ratio")
    grad_clip: float = Field(1.0, gt=0.0, description="Gradient norm clipping")
    log_every: int = Field(1, ge=1, description="Log metrics every N steps")
    jsd_beta: float = Field(
        0.5, gt=0.0, lt=1.0, description="Teacher weight in the JSD mixture (loss: jsd); 0.5 = symmetric JSD"
    )
    chunk_size: int = Field(
        1024, ge=1, description="Tokens per chunk in the fp32 loss (bounds loss memory for large vocabularies)"
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="Sequences per forward pass (gradient accumulation); None = batch_size"
    )
    gradient_checkpointing: bool = Field(False, description="Recompute student activations in backward (saves memory)")
    checkpoint_every: int | None = Field(
        None, ge=1,
        description="Write a resumable checkpoint every N steps into <out_dir>.ckpt/ (None = off); a re-run "
        "with the same inputs resumes from the last one",
    )
    hidden_weight: float = Field(
        0.0, ge=0.0, description="Weight of hidden-state KD added to the loss (0 = off; online mode only)"
    )
    hidden_loss: Literal["cosine", "mse"] = Field(
        "cosine", description="Hidden-state distance: cosine = 1 - cos per token, mse = mean squared error"
    )
    peak_tflops: float | None = Field(
        None, gt=0,
        description="Peak dense TFLOP/s of one device in the training dtype, for the MFU metric; None = the "
        "bf16 peak of a known GPU (H100, A100, L4, ...), not reported on CPU",
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
    """lm-eval benchmarks and held-out perplexity for teacher, pruned and student."""

    tasks: list[str] = Field(
        default_factory=lambda: ["compactlm_facts"],
        description="lm-eval task names: shipped local tasks (compactlm_*) or standard ones",
    )
    limit: int | None = Field(
        None, ge=1, description="Examples per benchmark task (None = all); perplexity always uses the whole text"
    )
    num_fewshot: int = Field(0, ge=0, le=25, description="Few-shot examples in each prompt")
    batch_size: int = Field(16, ge=1, description="Scoring batch size")
    perplexity: bool = Field(True, description="Perplexity on held-out text")
    perplexity_text: str = Field(
        "builtin", description="'builtin' or a local .txt file (one document per blank-line separated paragraph)"
    )
    max_length: int = Field(512, ge=16, description="Context length for scoring (perplexity rolling window)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype for scoring; auto = float32 on CPU, bfloat16 on CUDA"
    )
    bootstrap_iters: int = Field(
        0, ge=0, description="lm-eval bootstrap iterations for stderr (0 = off: stderr is reported as null)"
    )
    data_dir: str = Field(
        "../shared/data",
        description="Folder with benchmark copies for compactlm_arc_easy etc. (relative = to the repo root)",
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="Scoring engine: hf = lm-eval's HFLM in this process; vllm = lm-eval's VLLM model, run in a "
                    "child process (python -m compactlm.evaluation)",
    )
    speed: bool = Field(
        True,
        description="Measure inference tok/s: greedy HF generation, 8 fixed prompts x 32 new tokens, batch 8",
    )
    min_recovery: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Quality gate: fail the run if the student keeps less than this fraction of the teacher "
                    "(the table's '% of teacher kept' / 100); None = no gate",
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
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI or sqlite under the workdir"
    )
    experiment: str = Field("compactlm", min_length=1, description="MLflow experiment name")
    log_model: bool = Field(True, description="Log the distilled student's files as MLflow artifacts")


class Recipe(_Strict):
    """A whole compress pipeline: teacher -> generate -> score -> prune -> distill -> evaluate."""

    name: str = Field("compress", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name")
    teacher: str = Field(
        ...,
        description="Local HF dir, .gguf file, hub id (online only) or alias: " + ", ".join(KNOWN_ALIASES),
    )
    workdir: str = Field("runs", description="Where stage outputs are written (keyed by their inputs)")
    seed: int = Field(0, ge=0, description="Seed for sampling, data order and training")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Torch device for score/distill/eval")
    runner: Literal["thread", "process", "ray"] = Field(
        "thread",
        description="Prefect task runner for the pruning-candidate fan-out (prune.params: one task per "
        "candidate): thread = threads of the flow's process, process = a local process pool, ray = Ray "
        "($RAY_ADDRESS, else a local instance limited to 2 CPUs; needs the `ray` extra). Same choice either way",
    )
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("teacher")
    @classmethod
    def _teacher_ref(cls, v: str) -> str:
        check_model_ref(v)
        return v


def _set_dotted(data: dict[str, Any], key: str, raw: str) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `compactlm schema` for the fields)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = e.get("input")
        quiet = e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) or repr(got) in msg
        suffix = "" if quiet else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{suffix}")
    return "\n".join(lines)


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> Recipe:
    """Load and validate a recipe from YAML (or a dict), applying `key.sub=value` overrides."""
    source = str(path) if path is not None else "<dict>"
    if data is None:
        if path is None:
            raise RecipeError("give a recipe path or a dict")
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {source}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe {source} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {source} must be a mapping of fields, got {type(data).__name__}")
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise RecipeError(f"--set key {key!r} is not a dotted field name like distill.steps")
        _set_dotted(data, key, raw)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, source)) from None


def preflight(recipe: Recipe, teacher_dir: str | os.PathLike | None = None) -> None:
    """Checks that need more than the schema but no weights: benchmark task names and their data files, and,
    given the teacher's directory, that the prune target fits the teacher's shape (reads config.json only).

    Raises RecipeError naming the field. Shipped task names are checked in about a millisecond.
    """
    from compactlm.evaluation import check_tasks

    try:
        check_tasks(recipe.eval)
    except ValueError as e:
        raise RecipeError(f"invalid recipe:\n  eval.tasks: {e}") from None
    if teacher_dir is not None:
        from transformers import AutoConfig

        from compactlm.pruning.prune import target_shape

        try:
            target_shape(AutoConfig.from_pretrained(teacher_dir, trust_remote_code=False), recipe.prune)
        except ValueError as e:
            raise RecipeError(f"invalid recipe:\n  prune: {e}") from None


def parse_stage_config(raw: str, cls: type[BaseModel]) -> BaseModel:
    """A stage config from a command line's ``--config``: a JSON object, or a path to a .json/.yaml file.

    Raises ValueError (bad JSON, missing file, not a mapping) or pydantic's ValidationError (bad fields).
    """
    text = raw.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config is not valid JSON: {e}") from None
    else:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise ValueError(f"--config: {raw!r} is neither a JSON object nor an existing .json/.yaml file")
        data = (yaml.safe_load(path.read_text()) or {}) if path.suffix.lower() in (".yaml", ".yml") \
            else json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"--config must be a JSON object of {cls.__name__} fields")
    return cls.model_validate(data)
