"""The prune stage: a loadable HF student, bad targets rejected before writing, a kill or a full disk mid-publish
leaves nothing. (Every family's student in vLLM: test_vllm_students.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compactlm.artifacts import is_complete
from compactlm.config import PruneConfig
from compactlm.importance import load_scores
from compactlm.models import count_params, load_model
from compactlm.pruning import prune_model, prune_to_dir
from tests.helpers import (
    PRUNE,
    assert_same_tensors,
    logits_of,
    manifest_sans_time,
    random_ids,
    run_script,
    sigkill,
    start_script,
    tmp_dirs,
    wait_for_line,
)


def test_prune_to_dir_round_trip(tiny_gqa_model_dir, scored, tmp_path):
    cfg = PruneConfig(num_hidden_layers=3, hidden_size=192, intermediate_size=256, num_attention_heads=2)
    out = tmp_path / "student"
    rec = prune_to_dir(tiny_gqa_model_dir, scored, cfg, out)
    assert (out / "manifest.json").is_file() and (out / "model.safetensors").is_file()
    on_disk = json.loads((out / "pruning.json").read_text())
    assert on_disk["kept_layers"] == rec["kept_layers"] and len(rec["kept_layers"]) == 3
    assert on_disk["params_after"] < on_disk["params_before"]
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
            config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (3, 192, 256, 2, 2, 64)
    # identical to pruning in memory, and loadable unchanged by AutoModelForCausalLM
    in_memory, _ = prune_model(load_model(tiny_gqa_model_dir), load_scores(scored), cfg)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids()
    assert torch.equal(logits_of(loaded, ids), logits_of(in_memory, ids))
    assert count_params(loaded) == rec["params_after"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and len(tok) == 49152


def test_prune_to_dir_shape_override_and_errors(tiny_gqa_model_dir, scored, tmp_path):
    shape = {"num_hidden_layers": 3, "intermediate_size": 256}
    # an explicit shape wins over the budget (the flow's fan-out over the top-k candidates)
    rec = prune_to_dir(tiny_gqa_model_dir, scored, PruneConfig(budget=dict(params=0.5), rescale_norms=False),
                       tmp_path / "a", shape=shape)
    assert rec["selection"] == "shape" and rec["ranking"] is None and rec["rescale_norms"] is False
    assert rec["candidate"]["kind"] == "mixed" and rec["candidate"]["params"] == rec["params_after"]
    assert rec["student"]["num_hidden_layers"] == 3 and rec["student"]["intermediate_size"] == 256
    assert rec["student"]["hidden_size"] == 256  # missing keys keep the teacher's value
    plain = prune_to_dir(tiny_gqa_model_dir, scored, PruneConfig(num_hidden_layers=2), tmp_path / "b")
    assert plain["selection"] == "config" and plain["candidate"]["kind"] == "depth" and plain["ranking"] is None
    bad = [
        (dict(cfg=PruneConfig(budget=dict(params=0.95))), "pass calibration="),
        (dict(cfg=PruneConfig(budget=dict(params=0.05)), calibration=random_ids()),
         r"prune.budget.params=0.05: no student shape fits"),
        (dict(cfg=PruneConfig(), shape={"layers": 2}), r"shape has unknown keys \['layers'\]"),
        (dict(cfg=PruneConfig(), shape={"num_hidden_layers": 9}), "larger than the teacher's 4"),
        (dict(cfg=PruneConfig(), shape={"num_hidden_layers": -1}), "num_hidden_layers"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            prune_to_dir(tiny_gqa_model_dir, scored, kwargs.pop("cfg"), tmp_path / "never", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("target,field", [
    (dict(num_hidden_layers=5), "num_hidden_layers"), (dict(hidden_size=512), "hidden_size"),
    (dict(intermediate_size=1024), "intermediate_size"), (dict(num_attention_heads=8), "num_attention_heads"),
    (dict(num_attention_heads=3), "multiple of the teacher's num_key_value_heads"),
    (dict(hidden_size=250), r"prune.hidden_size as a multiple of num_attention_heads=4 \(e.g. 248 or 252\)"),
])
def test_bad_targets_write_nothing(tiny_gqa_model_dir, scored, tmp_path, target, field):
    with pytest.raises(ValueError, match=field):
        prune_to_dir(tiny_gqa_model_dir, scored, PruneConfig(**target), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.integration  # a subprocess and two in-process prunings: ~20 s idle
def test_sigkill_while_pruning_writes_publishes_nothing_and_rerun_matches(tiny_model_dir, scores_dir, tmp_path):
    from compactlm.pruning import prune_to_dir

    ref = tmp_path / "ref"
    prune_to_dir(tiny_model_dir, scores_dir, PRUNE, ref, seed=0)
    out = tmp_path / "prune" / "k"
    proc = start_script("prune_faulty.py", "pause", tiny_model_dir, scores_dir, out, PRUNE.model_dump_json())
    try:
        wait_for_line(proc, "IN-PUBLISH")
        tmps = tmp_dirs(out)
        assert len(tmps) == 1 and (tmps[0] / "model.safetensors").is_file()  # weights written, not published
        sigkill(proc)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists() and not is_complete(tmps[0])

    prune_to_dir(tiny_model_dir, scores_dir, PRUNE, out, seed=0)
    assert tmp_dirs(out) == []
    assert_same_tensors(out / "model.safetensors", ref / "model.safetensors")
    for name in ("config.json", "pruning.json"):
        assert json.loads((out / name).read_text()) == json.loads((ref / name).read_text()), name
    assert manifest_sans_time(out) == manifest_sans_time(ref)


@pytest.mark.integration  # a pruning subprocess and one in-process: ~15 s idle
def test_disk_full_while_publishing_a_stage_output(tiny_model_dir, scores_dir, tmp_path):
    """The output's weights cannot be written: a WriteError naming the output, no directory, no temp left."""
    from compactlm.pruning import prune_to_dir

    out = tmp_path / "prune" / "k"
    proc = run_script("prune_faulty.py", "limit", tiny_model_dir, scores_dir, out, PRUNE.model_dump_json())
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "WriteError" in last and f"could not write {out}:" in last and "file too large" in last, last
    assert not out.exists() and tmp_dirs(out) == []

    ref = tmp_path / "ref"
    prune_to_dir(tiny_model_dir, scores_dir, PRUNE, ref, seed=0)
    prune_to_dir(tiny_model_dir, scores_dir, PRUNE, out, seed=0)
    assert_same_tensors(out / "model.safetensors", ref / "model.safetensors")
