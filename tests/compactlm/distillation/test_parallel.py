"""Data parallel under torchrun: two CPU processes (gloo) equal one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compactlm.artifacts import is_complete
from compactlm.distillation import distill
from tests.helpers import REPO, SCRIPTS, model_weights
from tests.helpers import kd_cfg as cfg


@pytest.mark.integration  # two torchrun processes (gloo) + a reference run
@pytest.mark.long(16)
def test_torchrun_two_cpu_processes_match_single_process(teacher_dir, student_dir, data_dir, tmp_path):
    import os
    import subprocess
    import sys

    c = cfg(steps=3, batch_size=4, micro_batch_size=1, hidden_weight=0.5)
    script = SCRIPTS / "ddp_distillation.py"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(teacher_dir),
                           str(student_dir), str(data_dir), str(tmp_path / "ddp"), c.model_dump_json()],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["ranks_in_sync"] for r in results)  # identical weights on both ranks
    assert results[0]["loss"] == pytest.approx(results[1]["loss"])  # all-reduced metrics
    assert is_complete(tmp_path / "ddp")

    single = distill(teacher_dir, student_dir, data_dir, c, tmp_path / "single", seed=4)
    assert results[0]["loss"] == pytest.approx(single["loss"], rel=1e-4)
    assert results[0]["tokens"] == single["tokens"] and results[0]["loss_tokens"] == single["loss_tokens"]
    a, b = model_weights(tmp_path / "ddp"), model_weights(tmp_path / "single")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
