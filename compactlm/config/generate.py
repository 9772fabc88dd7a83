"""The generate section: where the prompts come from, how the teacher samples, which completions are kept."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from compactlm.choices import Dtype, Engine
from compactlm.config.base import _existing_file, _Strict
from compactlm.templates import template_fields

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
        description="Also store k of the teacher's log-probs per token, for distill.mode offline (0 = off)",
    )
    logit_targets: Literal["topk", "sampled"] = Field(
        "topk",
        description="What those k per token are: topk = the k most likely tokens (the rest as one bucket); sampled "
        "= k tokens drawn from the teacher's distribution, an unbiased estimate of the full KL at the same bytes "
        "(engine hf only)",
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

    @model_validator(mode="after")
    def _sampled_targets(self) -> GenerateConfig:
        if self.logit_targets == "sampled":
            if self.topk_logprobs == 0:
                raise ValueError("logit_targets: sampled draws topk_logprobs tokens per position; set "
                                 "topk_logprobs: k (e.g. 16), or drop logit_targets")
            if self.engine != "hf":
                raise ValueError("logit_targets: sampled needs the teacher's full distribution, which vLLM does not "
                                 "return (only its top log-probs): set engine: hf, or logit_targets: topk")
        return self
