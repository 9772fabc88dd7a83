"""Faults injected into real processes: SIGKILL mid-stage, a full disk, the MLflow server going away.

Pattern (as in the generation / distillation kill tests): the stage runs in a subprocess running a small
script; the fault happens at a chosen point (a SIGKILL once the script reports it is inside the stage's write
or compute; a real ENOSPC / EFBIG write failure); then a rerun with the same inputs is compared with an
uninterrupted run. The scripts only *pause* at the chosen point (a sleep) so the kill lands there every
time; they never replace a component.

Disk full: a small tmpfs is mounted over the output directory when this process may mount (root, as in the
dev container); elsewhere (CI) the subprocess runs under ``RLIMIT_FSIZE`` with SIGXFSZ ignored, so its writes
fail with EFBIG just as they would on a full disk. Both variants run where both are possible.
"""

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
from pathlib import Path
from typing import Iterator

import pytest
import torch

from compactlm.artifacts import MANIFEST, is_complete, read_manifest
from compactlm.config import DistillConfig, EvalConfig, GenerateConfig, PruneConfig, ScoreConfig

REPO = Path(__file__).resolve().parents[1]
SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
GEN = GenerateConfig(engine="hf", max_prompts=8, n=1, max_tokens=12, max_model_len=512, shard_size=2)
SCORE = ScoreConfig(num_samples=4, seq_len=32, batch_size=4)
PRUNE = PruneConfig(num_hidden_layers=3, intermediate_size=128)
DISTILL = DistillConfig(steps=6, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, chunk_size=32,
                        checkpoint_every=2, log_every=1)
EVAL = EvalConfig(tasks=["compactlm_facts"], limit=8, batch_size=8, max_length=128, speed=False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread (2 shared cores); subprocesses get OMP_NUM_THREADS=1 for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gen_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A small generated dataset (HF engine): calibration data for scoring, training data for distillation."""
    from compactlm.generation import generate_dataset

    out = tmp_path_factory.mktemp("faults-gen") / "gen"
    generate_dataset(tiny_model_dir, GEN, out, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def scores_dir(tiny_model_dir, gen_dir, tmp_path_factory) -> Path:
    from compactlm.importance import score_model

    out = tmp_path_factory.mktemp("faults-score") / "scores"
    score_model(tiny_model_dir, gen_dir, SCORE, out, seed=0)
    return out


# ------------------------------------------------------------------------------------------------ helpers

def _start(script: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env or SUB_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc: subprocess.Popen, marker: str, timeout: float = 240) -> None:
    """Read the child's stdout until a line equal to `marker` (the child then pauses at its chosen point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == marker:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before {marker!r}:\n{proc.stderr.read()[-4000:]}")
    raise AssertionError(f"no {marker!r} from the child within {timeout:.0f} s")


def _sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()  # reaped: its pid is gone, so its temp directory counts as stale
    assert proc.returncode == -signal.SIGKILL


def _tmp_dirs(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.tmp-*"))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _manifest(path: Path) -> dict:
    return {k: v for k, v in read_manifest(path).items() if k != "created_at"}


# ---------------------------------------------------------------------------- 1. SIGKILL inside a stage

# Each script pauses right after the stage has written its big file into the publish temp directory (before
# the manifest and the rename), announces it, and is killed there.
PAUSE_PRELUDE = """
import sys, time
def pause_after(real):
    def wrapped(*a, **kw):
        out = real(*a, **kw)
        print("IN-PUBLISH", flush=True)
        time.sleep(600)
        return out
    return wrapped
"""

SCORE_SCRIPT = PAUSE_PRELUDE + """
import compactlm.importance.score as S, compactlm.importance.plots as PL
from compactlm.config import ScoreConfig
PL.write_plots = pause_after(PL.write_plots)
model, calib, out, cfg = sys.argv[1:5]
S.score_model(model, calib, ScoreConfig.model_validate_json(cfg), out, seed=0)
"""

PRUNE_SCRIPT = PAUSE_PRELUDE + """
import compactlm.pruning.prune as P
from compactlm.config import PruneConfig
P.copy_model_side_files = pause_after(P.copy_model_side_files)
model, scores, out, cfg = sys.argv[1:5]
P.prune_to_dir(model, scores, PruneConfig.model_validate_json(cfg), out, seed=0)
"""

# Evaluation: killed after lm-eval scored the benchmark task, while it is about to score perplexity.
EVAL_SCRIPT = """
import sys, time
from lm_eval.models.huggingface import HFLM
from compactlm.config import EvalConfig
from tasks.common import RunContext
from tasks.evaluate import _evaluate_cached
real = HFLM.loglikelihood_rolling
def pause_before(self, *a, **kw):
    print("IN-EVAL", flush=True)
    time.sleep(600)
    return real(self, *a, **kw)
HFLM.loglikelihood_rolling = pause_before
model, workdir, cfg = sys.argv[1:4]
ctx = RunContext(workdir=workdir, tracking_uri="unused", experiment="unused", parent_run_id="unused")
_evaluate_cached(ctx, model, EvalConfig.model_validate_json(cfg))
"""


@pytest.mark.integration  # a subprocess and two in-process scorings: ~20 s idle
def test_sigkill_while_scoring_publishes_nothing_and_rerun_matches(tiny_model_dir, gen_dir, scores_dir, tmp_path):
    from compactlm.importance import score_model

    out = tmp_path / "score" / "k"
    proc = _start(SCORE_SCRIPT, tiny_model_dir, gen_dir, out, SCORE.model_dump_json())
    try:
        _wait_for_line(proc, "IN-PUBLISH")
        tmps = _tmp_dirs(out)
        assert len(tmps) == 1 and (tmps[0] / "scores.safetensors").is_file()  # killed mid-write
        _sigkill(proc)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists(), "a killed scoring must publish nothing"
    assert not is_complete(tmps[0]) and tmps[0].is_dir()  # the leftover: no manifest, never read

    score_model(tiny_model_dir, gen_dir, SCORE, out, seed=0)
    assert not tmps[0].exists(), "the rerun removes the dead process's temp directory"
    assert _tmp_dirs(out) == []
    _assert_same_tensors(out / "scores.safetensors", scores_dir / "scores.safetensors")
    assert json.loads((out / "scores.json").read_text()) == json.loads((scores_dir / "scores.json").read_text())
    assert _manifest(out) == _manifest(scores_dir)


@pytest.mark.integration  # a subprocess and two in-process prunings: ~20 s idle
def test_sigkill_while_pruning_writes_publishes_nothing_and_rerun_matches(tiny_model_dir, scores_dir, tmp_path):
    from compactlm.pruning import prune_to_dir

    ref = tmp_path / "ref"
    prune_to_dir(tiny_model_dir, scores_dir, PRUNE, ref, seed=0)
    out = tmp_path / "prune" / "k"
    proc = _start(PRUNE_SCRIPT, tiny_model_dir, scores_dir, out, PRUNE.model_dump_json())
    try:
        _wait_for_line(proc, "IN-PUBLISH")
        tmps = _tmp_dirs(out)
        assert len(tmps) == 1 and (tmps[0] / "model.safetensors").is_file()  # weights written, not published
        _sigkill(proc)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists() and not is_complete(tmps[0])

    prune_to_dir(tiny_model_dir, scores_dir, PRUNE, out, seed=0)
    assert _tmp_dirs(out) == []
    _assert_same_tensors(out / "model.safetensors", ref / "model.safetensors")
    for name in ("config.json", "pruning.json"):
        assert json.loads((out / name).read_text()) == json.loads((ref / name).read_text()), name
    assert _manifest(out) == _manifest(ref)


@pytest.mark.integration  # lm-eval three times on the tiny model: ~40 s idle
def test_sigkill_during_evaluation_publishes_nothing_and_rerun_matches(tiny_model_dir, tmp_path):
    from compactlm.evaluation import evaluate_model
    from tasks.common import RunContext
    from tasks.evaluate import _evaluate_cached

    workdir = tmp_path / "work"
    proc = _start(EVAL_SCRIPT, tiny_model_dir, workdir, EVAL.model_dump_json())
    try:
        _wait_for_line(proc, "IN-EVAL", timeout=300)
        _sigkill(proc)
    finally:
        proc.kill()
        proc.wait()
    cache = workdir / "eval-model"
    assert not any(is_complete(p) for p in cache.glob("*"))  # nothing published (no directory at all)

    ctx = RunContext(workdir=str(workdir), tracking_uri="unused", experiment="unused", parent_run_id="unused")
    rerun = _evaluate_cached(ctx, str(tiny_model_dir), EVAL)
    published = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(published) == 1 and is_complete(published[0])
    ref = evaluate_model(tiny_model_dir, EVAL, seed=0)
    assert rerun["tasks"] == ref["tasks"] and rerun["perplexity"] == ref["perplexity"]
    assert rerun["params"] == ref["params"] and rerun["size_bytes"] == ref["size_bytes"]


# ------------------------------------------------------------------------------------------- 2. disk full

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
def _small_disk(path: Path, size_bytes: int) -> Iterator[None]:
    """A tmpfs of `size_bytes` mounted at `path` (created), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _grow_disk(path: Path, size_bytes: int) -> None:
    """'Free space': remount the tmpfs larger, keeping its files."""
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(path)], check=True)


def _pages(n: int) -> int:
    return -(-n // 4096) * 4096


# The write limit starts at a chosen point (before shard FAIL_AT / after checkpoint step 2); from there on every
# write over LIMIT bytes fails with a real EFBIG from the kernel.
LIMIT_PRELUDE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
def limit_writes(n=4096):
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
"""

GEN_SCRIPT = LIMIT_PRELUDE + """
import compactlm.generation.dataset as D
from compactlm.config import GenerateConfig
model, out, cfg, fail_at = sys.argv[1:5]
real = D._write_shard
def write_shard(path, *a, **kw):
    if int(fail_at) >= 0 and path.name == D.SHARD_NAME.format(int(fail_at)):
        limit_writes(512)
    return real(path, *a, **kw)
D._write_shard = write_shard
D.generate_dataset(model, GenerateConfig.model_validate_json(cfg), out, seed=0, progress=False)
"""


@pytest.mark.integration  # generation subprocess + a resume: ~15 s idle per mode
@pytest.mark.parametrize("mode", DISK_MODES)
def test_disk_full_while_writing_a_shard_then_resume(mode, tiny_model_dir, gen_dir, tmp_path):
    import pyarrow.parquet as pq

    from compactlm.datasets import read_generated
    from compactlm.generation import generate_dataset

    shards = sorted((gen_dir / "data").glob("shard-*.parquet"))
    assert len(shards) == 4
    disk = tmp_path / "disk"
    out = disk / "gen"
    with _small_disk(disk, _pages(shards[0].stat().st_size) + _pages(shards[1].stat().st_size)) \
            if mode == "tmpfs" else contextlib.nullcontext():
        proc = subprocess.run([sys.executable, "-c", GEN_SCRIPT, str(tiny_model_dir), str(out),
                               GEN.model_dump_json(), "2" if mode == "rlimit" else "-1"],
                              cwd=REPO, env=SUB_ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        # the error names the shard and the cause, and says what survives
        assert "WriteError" in last and f"could not write {out / 'data' / 'shard-00002.parquet'}" in last, last
        assert ("no space left on device" if mode == "tmpfs" else "file too large") in last, last
        assert "finished shards are kept" in last
        assert not is_complete(out)
        assert sorted(p.name for p in (out / "data").iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]
        for p in shards[:2]:  # the finished shards are intact (same rows; their metadata holds timings)
            assert pq.read_table(out / "data" / p.name).to_pylist() == pq.read_table(p).to_pylist()

        if mode == "tmpfs":
            _grow_disk(disk, 16 << 20)
        manifest = generate_dataset(tiny_model_dir, GEN, out, seed=0, progress=False)
        assert manifest["stats"]["resumed_shards"] == 2
        assert read_generated(out) == read_generated(gen_dir)
        ref = read_manifest(gen_dir)
        assert [s["rows"] for s in manifest["shards"]] == [s["rows"] for s in ref["shards"]]
        for key in ("completions", "completion_tokens", "prompt_tokens", "dropped", "finish_reasons"):
            assert manifest["stats"][key] == ref["stats"][key], key


SI_SCRIPT = LIMIT_PRELUDE + """
import compactlm.generation.dataset as D
from compactlm.config import GenerateConfig
model, out, cfg = sys.argv[1:4]
real = D._write_jsonl_atomic
def write_jsonl(path, *a, **kw):
    limit_writes(16)  # the instruction list is the next file written, and longer than this
    return real(path, *a, **kw)
D._write_jsonl_atomic = write_jsonl
D.generate_dataset(model, GenerateConfig.model_validate_json(cfg), out, seed=5, progress=False)
"""


@pytest.mark.integration  # three small self-instruct runs (one in a subprocess): ~30 s idle
def test_file_size_limit_while_writing_self_instruct_instructions_then_rerun(tiny_model_dir, tmp_path):
    from compactlm.datasets import read_generated
    from compactlm.generation import generate_dataset
    from test_generation import SEEDS

    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps({"instruction": t, "input": i}) + "\n"
                                                  for t, i in SEEDS))
    cfg = GenerateConfig(engine="hf", max_tokens=8, max_model_len=512, prompts=str(tmp_path / "seeds.jsonl"),
                         template="{instruction}\n\n{input}", shard_size=4, n=1,
                         self_instruct=dict(num_instructions=4, oversample=2.5, max_tokens=16, min_words=1,
                                            blocked_words=[]))
    ref = tmp_path / "ref"
    ref_manifest = generate_dataset(tiny_model_dir, cfg, ref, seed=5, progress=False)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", SI_SCRIPT, str(tiny_model_dir), str(out), cfg.model_dump_json()],
                          cwd=REPO, env=SUB_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    target = out / "self_instruct" / "instructions.jsonl"
    assert "WriteError" in last and f"could not write {target}" in last and "file too large" in last, last
    assert "instruction-writing shards are kept" in last
    # no partial instruction list, no temp file; the writing pass's shards are whole; nothing published
    assert sorted(p.name for p in target.parent.iterdir()) == [f"shard-0000{i}.parquet" for i in range(3)]
    assert not is_complete(out) and not (out / "data").exists()

    manifest = generate_dataset(tiny_model_dir, cfg, out, seed=5, progress=False)
    assert manifest["self_instruct"]["writing_pass"]["resumed_shards"] == 3
    assert target.read_text() == (ref / "self_instruct" / "instructions.jsonl").read_text()
    assert read_generated(out) == read_generated(ref)
    for key in ("candidates", "kept", "surplus", "rejected"):
        assert manifest["self_instruct"][key] == ref_manifest["self_instruct"][key], key


TIMING = ("tokens_per_s", "model_tflops", "mfu")  # train_log fields that depend on wall time

DISTILL_SCRIPT = LIMIT_PRELUDE + """
from compactlm.config import DistillConfig
from compactlm.distillation import distill
teacher, student, data, out, cfg, limit_at = sys.argv[1:7]
def log_fn(metrics, step):
    if step == int(limit_at):
        limit_writes(1 << 20)
distill(teacher, student, data, DistillConfig.model_validate_json(cfg), out, seed=0, log_fn=log_fn)
"""


@pytest.fixture(scope="module")
def student_dir(tiny_factory) -> Path:
    return tiny_factory(num_hidden_layers=2)


@pytest.fixture(scope="module")
def distilled(tiny_model_dir, student_dir, gen_dir, tmp_path_factory) -> Path:
    """An uninterrupted distillation run (the reference)."""
    from compactlm.distillation import distill

    out = tmp_path_factory.mktemp("faults-distill") / "ref"
    distill(tiny_model_dir, student_dir, gen_dir, DISTILL, out, seed=0)
    return out


def _ckpt_bytes(student_dir: Path) -> int:
    """On-disk size of one checkpoint: fp32 weights + two AdamW moments (the small files aside)."""
    return 12 * sum(t.numel() for t in _tensors(student_dir / "model.safetensors").values())


@pytest.mark.integration  # three short distillations: ~40 s idle per mode
@pytest.mark.parametrize("mode", DISK_MODES)
def test_disk_full_while_writing_a_checkpoint_then_resume(mode, tiny_model_dir, student_dir, gen_dir, distilled,
                                                         tmp_path):
    from compactlm.distillation import distill
    from compactlm.distillation.checkpoint import checkpoint_root

    disk = tmp_path / "disk"
    out = disk / "student"
    root = checkpoint_root(out)
    one = _ckpt_bytes(student_dir)
    with _small_disk(disk, int(one * 1.5)) if mode == "tmpfs" else contextlib.nullcontext():
        proc = subprocess.run([sys.executable, "-c", DISTILL_SCRIPT, str(tiny_model_dir), str(student_dir),
                               str(gen_dir), str(out), DISTILL.model_dump_json(), "3" if mode == "rlimit" else "-1"],
                              cwd=REPO, env=SUB_ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert "WriteError" in last and f"could not write {root / 'step-00000004'}" in last, last
        assert ("no space left on device" if mode == "tmpfs" else "file too large") in last, last
        assert "the last good checkpoint is kept" in last
        assert not out.exists()  # nothing published
        assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # the good one, whole; no temp dir
        assert json.loads((root / "step-00000002" / "state.json").read_text())["step"] == 2

        if mode == "tmpfs":
            _grow_disk(disk, 8 * one)
        resumed = distill(tiny_model_dir, student_dir, gen_dir, DISTILL, out, seed=0)
        assert resumed["resumed_from"] == 2 and not root.exists()
        _assert_same_tensors(out / "model.safetensors", distilled / "model.safetensors")
        curve = [{k: v for k, v in json.loads(x).items() if k not in TIMING}
                 for x in (out / "train_log.jsonl").read_text().splitlines()]
    ref = [{k: v for k, v in json.loads(x).items() if k not in TIMING}
           for x in (distilled / "train_log.jsonl").read_text().splitlines()]
    assert curve == ref


@pytest.mark.integration  # a pruning subprocess and one in-process: ~15 s idle
def test_disk_full_while_publishing_a_stage_output(tiny_model_dir, scores_dir, tmp_path):
    """The output's weights cannot be written: a WriteError naming the output, no directory, no temp left."""
    from compactlm.pruning import prune_to_dir

    script = LIMIT_PRELUDE + "limit_writes(1 << 20)\n" + PRUNE_SCRIPT.replace("P.copy_model_side_files = pause_after",
                                                                               "")
    out = tmp_path / "prune" / "k"
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), str(scores_dir), str(out),
                           PRUNE.model_dump_json()], cwd=REPO, env=SUB_ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "WriteError" in last and f"could not write {out}:" in last and "file too large" in last, last
    assert not out.exists() and _tmp_dirs(out) == []

    ref = tmp_path / "ref"
    prune_to_dir(tiny_model_dir, scores_dir, PRUNE, ref, seed=0)
    prune_to_dir(tiny_model_dir, scores_dir, PRUNE, out, seed=0)
    _assert_same_tensors(out / "model.safetensors", ref / "model.safetensors")


def test_write_errors_are_recognised_and_others_pass_through(tmp_path):
    """Unit: how each library reports a full disk, mapped to one WriteError naming the path."""
    import errno

    from compactlm.artifacts import WriteError, as_write_error, publish_dir

    cases = [OSError(errno.ENOSPC, "No space left on device"),
             RuntimeError("Error while serializing: I/O error: File too large (os error 27)"),
             RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")]
    for exc in cases:
        err = as_write_error(exc, tmp_path / "x")
        assert isinstance(err, WriteError) and f"could not write {tmp_path / 'x'}" in str(err), exc
    assert as_write_error(ValueError("bad config"), tmp_path / "x") is None
    assert as_write_error(OSError(errno.ENOENT, "missing"), tmp_path / "x") is None

    final = tmp_path / "out"
    with pytest.raises(WriteError, match="no space left on device") as info:
        with publish_dir(final, {}) as tmp:
            (tmp / "a").write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(info.value.__cause__, OSError)
    assert not final.exists() and _tmp_dirs(final) == []
    with pytest.raises(KeyError):  # not a write failure: unchanged
        with publish_dir(final, {}):
            raise KeyError("x")


def test_stale_temp_dirs_of_dead_processes_are_removed(tmp_path):
    from compactlm.artifacts import publish_dir, remove_stale_tmp

    final = tmp_path / "out"
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{host}-{dead}-abcd1234"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-abcd1234"
    other_host = tmp_path / f".out.tmp-elsewhere-{dead}-abcd1234"
    old_style = tmp_path / ".out.tmp-abcd1234"
    other_output = tmp_path / f".out2.tmp-{host}-{dead}-abcd1234"
    for p in (stale, live, other_host, old_style, other_output):
        p.mkdir()
    assert remove_stale_tmp(final) == [stale]
    with publish_dir(final, {}) as tmp:
        (tmp / "f").write_text("x")
    assert is_complete(final) and (final / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", live.name, other_host.name, old_style.name, other_output.name])


# ------------------------------------------------------------------------------------ 3. MLflow server down

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(state: Path, port: int) -> subprocess.Popen:
    """A real MLflow server on 127.0.0.1 (as flows/serve.py starts it), healthy when this returns."""
    import urllib.request

    log = open(state / f"mlflow-{port}.log", "ab")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
                             "--artifacts-destination", str(state / "mlartifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=state)
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


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# Two stages through the real task code (tasks/*.py, run_stage) against the server: score, then distill.
PIPELINE_SCRIPT = """
import sys
from compactlm.config import DistillConfig, ScoreConfig
from compactlm.tracking import Tracker
from tasks.common import RunContext
from tasks.distill import distill
from tasks.score import score
uri, workdir, teacher, student, data, score_cfg, distill_cfg = sys.argv[1:8]
tracker = Tracker(uri, "faults")
parent = tracker.start_run("pipeline")
ctx = RunContext(workdir=workdir, tracking_uri=uri, experiment="faults", parent_run_id=parent)
try:
    score.fn(ctx, teacher, data, ScoreConfig.model_validate_json(score_cfg))
    print("SCORED", flush=True)
    distill.fn(ctx, teacher, student, data, DistillConfig.model_validate_json(distill_cfg), log_model=False)
    tracker.end_run(parent)
except BaseException:
    tracker.end_run(parent, "FAILED")
    raise
print("DONE", flush=True)
"""


@pytest.mark.integration  # an MLflow server twice, two pipeline subprocesses: ~60 s idle
def test_mlflow_server_down_mid_run_fails_clearly_then_rerun_reuses_stages(tiny_model_dir, student_dir, gen_dir,
                                                                          tmp_path):
    from mlflow.tracking import MlflowClient

    state, workdir = tmp_path / "mlflow", tmp_path / "work"
    state.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = DistillConfig(**{**DISTILL.model_dump(), "steps": 12, "checkpoint_every": 3})
    env = {k: v for k, v in SUB_ENV.items() if not k.startswith("MLFLOW_")}
    args = [uri, workdir, tiny_model_dir, student_dir, gen_dir, SCORE.model_dump_json(), cfg.model_dump_json()]
    server = _mlflow_server(state, port)
    try:
        proc = _start(PIPELINE_SCRIPT, *args, env=env)
        try:
            _wait_for_line(proc, "SCORED")
            # the distill stage is computing (its first checkpoint is on disk): the server dies
            deadline = time.monotonic() + 240
            while not list((workdir / "distill").glob("*.ckpt/step-*")):
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            _kill_group(server)
            t_kill = time.monotonic()
            _, stderr = proc.communicate(timeout=300)
            seconds_to_fail = time.monotonic() - t_kill
        finally:
            proc.kill()
            proc.wait()
    finally:
        _kill_group(server)

    assert proc.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "TrackingUnavailableError" in last and f"MLflow tracking store {uri} is unreachable" in last, last
    assert "MLFLOW_TRACKING_URI" in last and "rerun" in last
    assert "step metrics are no longer logged, the stage goes on" in stderr  # one warning, then compute went on
    assert seconds_to_fail < 90, f"took {seconds_to_fail:.0f} s to fail"
    print(f"MLflow down -> clear error after {seconds_to_fail:.1f} s")
    # the stage outputs are complete and valid: distillation finished and published despite the dead server
    (score_out,) = [p for p in (workdir / "score").iterdir() if not p.name.startswith(".")]
    (distill_out,) = [p for p in (workdir / "distill").iterdir() if p.is_dir() and not p.name.startswith(".")
                      and not p.name.endswith(".ckpt")]
    assert is_complete(score_out) and is_complete(distill_out)
    assert read_manifest(distill_out)["metrics"]["steps"] == 12
    assert f"the output {distill_out} is complete and a rerun reuses it" in last

    server = _mlflow_server(state, port)  # back up, same store
    try:
        proc = _start(PIPELINE_SCRIPT, *args, env=env)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert "DONE" in stdout
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("faults")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 2 and parents[1].info.status == "FINISHED"
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id]
        assert {k.info.run_name: k.data.tags["compactlm.cache_hit"] for k in kids} == {"score": "true",
                                                                                     "distill": "true"}
        assert all(k.info.status == "FINISHED" for k in kids)
        first = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
        assert first["score"].info.status == "FINISHED"
        assert len(client.get_metric_history(first["distill"].info.run_id, "loss")) >= 3  # logged while up
    finally:
        _kill_group(server)


def test_unreachable_tracking_server_fails_fast_with_the_uri(monkeypatch):
    from compactlm.tracking import HTTP_BOUNDS, Tracker, TrackingUnavailableError

    for k in HTTP_BOUNDS:  # unset for this test, restored after
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=f"MLflow tracking store {uri} is unreachable") as info:
        Tracker(uri, "x")
    seconds = time.monotonic() - t0
    assert seconds < 30, f"took {seconds:.0f} s"  # MLflow's defaults take about 4 minutes
    assert "Connection refused" in str(info.value) and "MLFLOW_HTTP_REQUEST_MAX_RETRIES=3" in str(info.value)
    assert {k: os.environ[k] for k in HTTP_BOUNDS} == HTTP_BOUNDS


def test_hung_tracking_server_fails_within_the_timeout_bounds(monkeypatch):
    """A server that accepts connections and never answers (a hung process, a stuck proxy): the call times
    out per attempt and fails after the bounded retries with the same clear error, instead of hanging."""
    import socket
    import threading

    from compactlm.tracking import Tracker, TrackingUnavailableError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")  # the user's settings win over HTTP_BOUNDS
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_hold():  # read nothing, answer nothing, close nothing
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{srv.getsockname()[1]}"
    try:
        t0 = time.monotonic()
        with pytest.raises(TrackingUnavailableError, match=f"MLflow tracking store {uri} is unreachable") as info:
            Tracker(uri, "x")
        seconds = time.monotonic() - t0
    finally:
        stop.set()
        thread.join()
        for c in accepted:
            c.close()
        srv.close()
    assert len(accepted) == 2  # the first attempt and one retry, each held until its read timeout
    assert 4 <= seconds < 20, f"took {seconds:.1f} s"  # two 2-s read timeouts + backoff, not forever
    assert "timed out" in str(info.value).lower() and "MLFLOW_HTTP_REQUEST_TIMEOUT=2" in str(info.value)


def test_user_http_retry_settings_are_kept(monkeypatch, tmp_path):
    from compactlm.tracking import Tracker, bound_http_retries

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    assert bound_http_retries()["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "15"
    # a local store is not an HTTP server: errors from it are not re-labelled, end_run(FAILED) still works
    t = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "x")
    run = t.start_run("r")
    t.end_run(run, "FAILED")
    assert t.client.get_run(run).info.status == "FAILED"
