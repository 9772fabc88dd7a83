"""On-policy distillation: which steps sample and what they sample are fixed by the seed; the student trains on its own
samples scored by the teacher; a SIGKILL mid-run resumes to the same weights; bad input fails before training."""

from __future__ import annotations

import pytest
import torch

from compactlm.config import DistillConfig
from compactlm.distillation import DistillError, distill
from compactlm.distillation.onpolicy import is_on_policy, sample_batch
from compactlm.distillation.setup import setup
from compactlm.models import load_model
from tests.helpers import REPO, SCRIPTS, peaked_tiny_model
from tests.helpers import kd_cfg as cfg

ON = {"fraction": 0.5, "max_new_tokens": 8}


def _run(teacher_dir, student_dir, data_dir, tmp_path, seed: int, **on):
    return setup(teacher_dir, student_dir, data_dir, cfg(seq_len=48, on_policy={**ON, **on}), tmp_path / "x",
                 seed=seed)


def test_on_policy_steps_and_batches_are_reproducible_for_a_seed(teacher_dir, student_dir, data_dir, tmp_path):
    a, b = (_run(teacher_dir, student_dir, data_dir, tmp_path, seed=3) for _ in range(2))
    other = _run(teacher_dir, student_dir, data_dir, tmp_path, seed=4)
    coins = [is_on_policy(a, s) for s in range(200)]
    assert coins == [is_on_policy(b, s) for s in range(200)] != [is_on_policy(other, s) for s in range(200)]
    assert 0.4 < sum(coins) / 200 < 0.6  # λ = 0.5
    for fraction, want in ((1.0, True), (0.0, False)):  # the coin alone, on the same run (no second setup)
        other.cfg = other.cfg.model_copy(update={"on_policy": other.cfg.on_policy.model_copy(
            update={"fraction": fraction})})
        assert all(is_on_policy(other, s) == want for s in range(50))

    one, two = sample_batch(a, 7, 0), sample_batch(b, 7, 0)  # same seed and step: same prompts and samples
    assert torch.equal(one.ids, two.ids) and torch.equal(one.mask, two.mask) and one.on_policy
    assert not torch.equal(one.ids, sample_batch(a, 8, 0).ids)
    for row, mask in zip(one.ids.tolist(), one.mask.tolist()):
        first = mask.index(1)
        sampled = [t for t, m in zip(row, mask) if m]
        assert 1 <= len(sampled) <= 8 and mask[first:first + len(sampled)] == [1] * len(sampled)
        assert any(row[:first] == p[-len(row[:first]):] for p in a.prompts)  # a data prompt, then the sample
        assert not any(t in a.eos_ids for t in sampled[:-1])  # stops at the first EOS
    assert one.n_loss == int(one.mask[:, 1:].sum()) and one.sample_tokens == one.mask.sum().item() / 2


def test_on_policy_training_logs_samples_and_lowers_the_divergence(teacher_dir, student_dir, data_dir, tmp_path):
    logged: list[dict] = []
    c = cfg(steps=10, seq_len=48, lr=1e-2, on_policy={"fraction": 1.0, "max_new_tokens": 12})
    summary = distill(teacher_dir, student_dir, data_dir, c, tmp_path / "out", seed=0,
                      log_fn=lambda m, s: logged.append(m))
    assert summary["steps"] == 10 and all(m["on_policy"] == 1.0 for m in logged)
    assert logged[-1]["on_policy_fraction"] == 1.0 and all(0 < m["sample_tokens"] <= 12 for m in logged)
    assert all(m["teacher_nll"] > 0 and m["loss"] == pytest.approx(m["kd_loss"]) for m in logged)
    first, last = (sum(m["kd_loss"] for m in part) / 3 for part in (logged[:3], logged[-3:]))
    assert last < 0.8 * first, [m["kd_loss"] for m in logged]  # reverse KL on its own samples went down
    assert not torch.equal(load_model(tmp_path / "out").lm_head.weight, load_model(student_dir).lm_head.weight)


@pytest.mark.integration  # a subprocess killed mid-run, then two short runs
@pytest.mark.long(13)
def test_sigkill_during_on_policy_training_resumes_bit_identically(teacher_dir, student_dir, data_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from compactlm.distillation.checkpoint import checkpoint_root

    c = cfg(steps=8, seq_len=48, checkpoint_every=2, on_policy=ON)
    logged: list[dict] = []
    distill(teacher_dir, student_dir, data_dir, c, tmp_path / "ref", seed=1, log_fn=lambda m, s: logged.append(m))
    assert 0 < sum(m["on_policy"] for m in logged) < 8  # both kinds of steps happen
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "slow_distillation.py"), str(teacher_dir),
                             str(student_dir), str(data_dir), str(out), c.model_dump_json()],
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 240
        while not list(checkpoint_root(out).glob("step-0000000[4-6]")):
            assert proc.poll() is None and time.monotonic() < deadline, "no step-4 checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    resumed = distill(teacher_dir, student_dir, data_dir, c, out, seed=1)
    assert resumed["resumed_from"] >= 4
    ref, got = load_model(tmp_path / "ref").state_dict(), load_model(out).state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


VLLM_ON = {"fraction": 1.0, "max_new_tokens": 8, "engine": "vllm", "refresh_every": 2}


@pytest.mark.integration  # one vLLM engine in this process
@pytest.mark.long(12)
def test_vllm_sampler_samples_from_the_weights_it_was_last_given(teacher_dir, data_dir, tmp_path):
    """On a model whose greedy path is decisive (peaked_tiny_model), vLLM sampling at T=0.01 is HF's greedy
    decoding of the live student, before and after the student's weights change and are loaded into it."""
    from compactlm.distillation.onpolicy import _generate, refresh

    student = peaked_tiny_model(tmp_path / "peaked")
    run = setup(teacher_dir, student, data_dir, cfg(seq_len=48, on_policy={**VLLM_ON, "temperature": 0.01}),
                tmp_path / "x", seed=0)
    try:
        prompts = [p[-40:] for p in run.prompts[:3]]  # what sample_batch keeps at seq_len 48
        def sample():
            return run.sampler.sample(prompts, run.cfg.on_policy, run.eos_ids, seed=5)

        before = sample()
        assert before == _generate(run, prompts, step=0) and all(len(s) >= 1 for s in before)
        with torch.no_grad():  # a different model of the same shape: another greedy path
            for w in run.student.parameters():
                w.copy_(w.flip(0))
        assert sample() == before  # not loaded yet: the engine's old weights
        refresh(run, 1)  # not a multiple of refresh_every: nothing loaded
        assert run.sampler.loads == 0
        refresh(run, 2)
        after = sample()
        assert run.sampler.loads == 1 and after == _generate(run, prompts, step=0) != before
    finally:
        run.sampler.close()


@pytest.mark.integration  # three short runs, each with its vLLM engine
@pytest.mark.long(21)
def test_vllm_on_policy_run_stopped_after_a_checkpoint_resumes_bit_identically(teacher_dir, student_dir, data_dir,
                                                                              tmp_path):
    c = cfg(steps=4, seq_len=48, checkpoint_every=2, on_policy=VLLM_ON)
    logged: list[dict] = []
    ref = distill(teacher_dir, student_dir, data_dir, c, tmp_path / "ref", seed=1,
                  log_fn=lambda m, s: logged.append(m))
    assert all(m["on_policy"] == 1.0 and 0 < m["sample_tokens"] <= 8 for m in logged)
    assert ref["sampler_loads"] == 2 and ref["sampler_start_s"] > 0  # steps 0 and 2

    def stop_at_step_three(metrics, step):
        if step >= 3:  # after the step-2 checkpoint
            raise KeyboardInterrupt

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        distill(teacher_dir, student_dir, data_dir, c, out, seed=1, log_fn=stop_at_step_three)
    resumed = distill(teacher_dir, student_dir, data_dir, c, out, seed=1)
    assert resumed["resumed_from"] == 2 and resumed["sampler_loads"] == 1  # the checkpoint's weights, at step 2
    want, got = load_model(tmp_path / "ref").state_dict(), load_model(out).state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_on_policy_bad_input_fails_before_training(teacher_dir, other_student_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="on_policy.fraction"):
        DistillConfig(on_policy={"fraction": 1.5})
    with pytest.raises(ValueError, match="use mode: online"):
        DistillConfig(mode="offline", on_policy={})
    with pytest.raises(ValueError, match=r"on_policy.max_new_tokens \(64\) must be below seq_len \(32\)"):
        DistillConfig(seq_len=32, on_policy={})
    with pytest.raises(ValueError, match=r"checkpoint_every \(3\) must be a multiple of on_policy.refresh_every \(2\)"):
        DistillConfig(checkpoint_every=3, on_policy={"engine": "vllm", "refresh_every": 2})
    with pytest.raises(ValueError, match="use on_policy.engine: hf with lora"):
        DistillConfig(lora={}, on_policy={"engine": "vllm"})
    with pytest.raises(DistillError, match="another tokenizer: drop on_policy"):
        distill(teacher_dir, other_student_dir, data_dir, cfg(kd_weight=0.5, seq_len=48, on_policy=ON),
                tmp_path / "x")
    assert not (tmp_path / "x").exists()
