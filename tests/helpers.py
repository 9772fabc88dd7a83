"""Helpers shared by the test modules (fixtures live in conftest.py; subprocess programs in tests/scripts/)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compactlm.config import DistillConfig, EvalConfig, GenerateConfig, PruneConfig, ScoreConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"
#: Real public benchmark data beside the repository (absent on a fresh clone: tests that need it skip).
SHARED_DATA = REPO.parent / "shared" / "data"
#: Environment of subprocesses: one OpenMP thread (2 shared cores), this checkout importable, unbuffered output.
SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}

# Small stage configs of the fault and resume tests (the HF engine on the tiny random model).
GEN = GenerateConfig(engine="hf", max_prompts=8, n=1, max_tokens=12, max_model_len=512, shard_size=2)
SCORE = ScoreConfig(num_samples=4, seq_len=32, batch_size=4)
PRUNE = PruneConfig(num_hidden_layers=3, intermediate_size=128)
DISTILL = DistillConfig(steps=6, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, chunk_size=32,
                        checkpoint_every=2, log_every=1)
EVAL = EvalConfig(tasks=["compactlm_facts"], limit=8, batch_size=8, max_length=128, speed=False)


# ------------------------------------------------------------------------------------------ training data

SUBJECTS = ["The river", "A small robot", "My neighbour", "The old library", "Our team", "The red fox",
            "A quiet village", "The teacher", "This recipe", "The spacecraft", "A young cat", "The museum"]
VERBS = ["opens early on", "was built during", "talks about", "likes to walk on", "is famous for",
         "often forgets about", "was repaired on", "celebrates", "looks beautiful on"]
OBJECTS = ["sunny mornings", "the winter festival", "rainy weekends", "the long summer", "quiet evenings",
           "market days", "the first of May", "holidays by the sea"]


def texts(n: int, offset: int = 0) -> list[tuple[str, str]]:
    """n deterministic (prompt, completion) pairs."""
    out = []
    for i in range(offset, offset + n):
        s, v, o = SUBJECTS[i % len(SUBJECTS)], VERBS[(i * 7) % len(VERBS)], OBJECTS[(i * 5) % len(OBJECTS)]
        prompt = f"Write one sentence about {s.lower()}."
        completion = (f"{s} {v} {o}. Many people say that {s.lower()} {v} {OBJECTS[(i + 3) % len(OBJECTS)]}, "
                      f"and everyone agrees it is true.")
        out.append((prompt, completion))
    return out


def write_generated(out: Path, tokenizer, pairs: list[tuple[str, str]], shard_rows: int = 16) -> Path:
    """A generated dataset directory of chat-formatted `pairs` (the format module writes it)."""
    from compactlm.formats.generated import write_dataset

    rows = []
    for pid, (prompt, completion) in enumerate(pairs):
        prompt_text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"id": f"{pid}-0", "prompt_id": pid, "sample": 0, "prompt": prompt, "prompt_text": prompt_text,
                     "completion": completion, "prompt_token_ids": p_ids, "completion_token_ids": c_ids,
                     "finish_reason": "stop"})
    write_dataset(out, rows, {"stage": "generate", "rows": len(rows)}, shard_rows=shard_rows)
    return out


#: Small and fast generation: the HF engine on the tiny random model.
FAST = dict(engine="hf", max_tokens=8, max_model_len=512)

#: Calibration text of the pruning tests, and of the budget fan-out tests (each file's scores come from it).
PRUNING_TEXT = "\n\n".join(f"Line {i}: pruning keeps the heads, neurons and channels that matter most."
                             for i in range(20))
FANOUT_TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single "
               "step. Knowledge is power, and power corrupts. The sun rises in the east and sets in the west. ") * 6


def generation_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    """``python -m compactlm.generation ARGS`` (one OpenMP thread)."""
    return subprocess.run([sys.executable, "-m", "compactlm.generation", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, **{"env": SUB_ENV, **kw})


def tiny_model_with_tokenizer(out: Path, tokenizer_dir: Path, arch: str = "qwen2", **shape) -> Path:
    """A tiny random decoder of `arch` whose vocabulary is the tokenizer in `tokenizer_dir` (head_dim 64)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compactlm.models import MODEL_BUILD_LOCK

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    classes = {"qwen2": "Qwen2Config", "mistral": "MistralConfig", "llama": "LlamaConfig"}
    dims = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_hidden_layers=2,
                intermediate_size=256, tie_word_embeddings=True, max_position_embeddings=2048) | shape
    cfg = getattr(transformers, classes[arch])(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **dims)
    torch.manual_seed(0)
    with MODEL_BUILD_LOCK:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def kd_cfg(**kw) -> DistillConfig:
    """The distillation tests' small config (overrides in `kw`)."""
    base = dict(steps=6, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, chunk_size=20)
    return DistillConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------- models, tensors

@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch threads (the fault tests compare with one-thread subprocesses)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_ids(n: int = 2, t: int = 10, seed: int = 0):
    """[n, t] seeded random token ids below 5000."""
    import torch

    return torch.randint(0, 5000, (n, t), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits


def quick_scores(model, ids=None):
    """Importance of `model` on random ids (no layer-loss pass)."""
    from compactlm.importance import compute_importance

    return compute_importance(model, random_ids() if ids is None else ids, batch_size=2, layer_loss=False)


def hf_topk(model, prompt_ids: list[int], completion_ids: list[int], k: int):
    """Raw log-probs of a teacher forward pass over prompt + completion, at each completion position [T, V]."""
    import torch

    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return logp[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(completion_ids)]


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def bf16_copy(model_dir: Path, out: Path) -> Path:
    """`model_dir` stored in bfloat16 (as most checkpoints are), with its tokenizer files, at `out`."""
    from compactlm.models import copy_model_side_files, load_model

    load_model(model_dir, dtype="bfloat16").save_pretrained(out)
    copy_model_side_files(model_dir, out)
    return out


def nan_model(model_dir: Path, out: Path) -> Path:
    """A copy of `model_dir` whose final norm is NaN: its first forward gives a non-finite loss."""
    import torch

    from compactlm.models import load_model, load_tokenizer

    model = load_model(model_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return out


def model_weights(model_dir: Path) -> dict:
    return tensors(model_dir / "model.safetensors")


def assert_same_tensors(a: Path, b: Path) -> None:
    import torch

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def loss_curve(out: Path) -> list[dict]:
    """train_log.jsonl without the timing fields (which differ run to run)."""
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in ("tokens_per_s", "model_tflops", "mfu")} for x in lines]


def manifest_sans_time(path: Path) -> dict:
    from compactlm.artifacts import read_manifest

    return {k: v for k, v in read_manifest(path).items() if k != "created_at"}


def fake_result(acc, acc_norm, ppl, params=1_000_000, size=4_000_000, task="compactlm_facts") -> dict:
    """A hand-made evaluation result (the shape compactlm.evaluation returns)."""
    metrics = {"acc": acc, "acc_stderr": None}
    if acc_norm is not None:
        metrics["acc_norm"] = acc_norm
    return {"tasks": {task: metrics},
            "perplexity": {"word_perplexity": ppl, "byte_perplexity": 2.0, "bits_per_byte": 1.0} if ppl else None,
            "params": params, "size_bytes": size, "seconds": 1.5, "lm_eval": {}}


def with_speed(result: dict, tok_s: float) -> dict:
    return {**result, "speed": {"tok_s": tok_s, "seconds": 256 / tok_s, "tokens": 256}}


# ---------------------------------------------------------------------------------------- subprocess faults

def start_script(script: str, *args, env: dict | None = None) -> subprocess.Popen:
    """Start ``tests/scripts/<script>`` with `args` (stdout/stderr piped, text)."""
    return subprocess.Popen([sys.executable, str(SCRIPTS / script), *map(str, args)], cwd=REPO,
                            env=env or SUB_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_script(script: str, *args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], cwd=REPO, env=env or SUB_ENV,
                          capture_output=True, text=True, timeout=timeout)


def wait_for_line(proc: subprocess.Popen, marker: str, timeout: float = 240) -> None:
    """Read the child's stdout until a line equal to `marker` (the child then pauses at its chosen point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == marker:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before {marker!r}:\n{proc.stderr.read()[-4000:]}")
    raise AssertionError(f"no {marker!r} from the child within {timeout:.0f} s")


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()  # reaped: its pid is gone, so its temp directory counts as stale
    assert proc.returncode == -signal.SIGKILL


def tmp_dirs(final: Path) -> list[Path]:
    """The publish temp directories of output `final`."""
    return sorted(final.parent.glob(f".{final.name}.tmp-*"))


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# Disk full: a small tmpfs mounted over the output directory when this process may mount (root, as in the dev
# container); elsewhere (CI) the subprocess runs under RLIMIT_FSIZE with SIGXFSZ ignored, so its writes fail with
# EFBIG just as they would on a full disk. Both variants run where both are possible.

def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/compactlm-tmpfs-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    finally:
        probe.rmdir()


TMPFS = _can_mount_tmpfs()
DISK_MODES = [pytest.param("tmpfs", marks=pytest.mark.skipif(not TMPFS, reason="cannot mount a tmpfs here")),
              "rlimit"]


@contextlib.contextmanager
def small_disk(path: Path, size_bytes: int) -> Iterator[None]:
    """A tmpfs of `size_bytes` mounted at `path` (created), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow_disk(path: Path, size_bytes: int) -> None:
    """'Free space': remount the tmpfs larger, keeping its files."""
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(path)], check=True)


def pages(n: int) -> int:
    return -(-n // 4096) * 4096


# --------------------------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(state: Path, port: int) -> subprocess.Popen:
    """A real MLflow server on 127.0.0.1 (as flows/serve.py starts it), healthy when this returns."""
    import urllib.request

    from flows.serve import mlflow_server_env

    log = open(state / f"mlflow-{port}.log", "ab")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
                             "--artifacts-destination", str(state / "mlartifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=state,
                            env=mlflow_server_env(dict(os.environ)))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (state / f"mlflow-{port}.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    raise AssertionError("mlflow server did not come up in 120 s")


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def peaked_tiny_model(out: Path, *, seed: int = 0, std: float = 3.0) -> Path:
    """The tiny Llama (head_dim 64, real SmolLM2 tokenizer) with weights redrawn large enough that greedy decoding
    is decisive and varied (~32 distinct tokens in 32 steps, top-1 / top-2 logit gap >= ~0.15 on the path from
    "The capital of France is"; the stock random init repeats one token). Export tests compare engines on it."""
    import torch

    from compactlm.models import load_model, load_tokenizer, make_tiny_model

    if (out / "model.safetensors").is_file():
        return out
    base = make_tiny_model(out.parent / f"{out.name}-base")
    model, tok = load_model(base), load_tokenizer(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "embed" in name else std / p.shape[1] ** 0.5))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def vllm_greedy(model_dirs: list, max_tokens: int, dtype: str = "float32") -> dict[int, dict]:
    """{"ids", "logprobs"} of each model's greedy tokens after tests/scripts/vllm_greedy.py's prompt, from one vLLM
    subprocess, by index; fails with vLLM's output if any model fails."""
    proc = run_script("vllm_greedy.py", "--max-tokens", max_tokens, "--dtype", dtype, *model_dirs,
                      env={**SUB_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=900)
    ok = {int(ln.split()[1]): json.loads(ln.split(" ", 2)[2]) for ln in proc.stdout.splitlines()
          if ln.startswith("VLLM_OK ")}
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_FAIL ")]
    assert proc.returncode == 0 and not failed and len(ok) == len(model_dirs), \
        (failed, proc.stdout[-3000:], proc.stderr[-8000:])
    return ok
