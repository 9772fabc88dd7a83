"""Repair after slicing (compactlm.pruning.repair): the refitted projections reproduce the teacher's outputs better
on held-out activations, an unpruned projection comes back exactly, and the prune stage records the repair."""

from __future__ import annotations

import json

import pytest
import torch

from compactlm.arch import decoder_layers
from compactlm.config import PruneConfig, RepairConfig
from compactlm.importance import load_scores
from compactlm.models import load_model
from compactlm.pruning import plan_pruning, prune_model, prune_to_dir
from compactlm.pruning.repair import PROJECTIONS, reconstruct
from tests.helpers import logits_of, random_ids

WIDTH = PruneConfig(num_attention_heads=2, intermediate_size=256, hidden_size=192)


def _calib(seed: int, n: int = 32, t: int = 64) -> torch.Tensor:
    return random_ids(n, t, seed=seed)


def _twin_teacher(model_dir):
    """The GQA tiny model (4 query heads in 2 KV groups, 512 neurons) where every removed unit has a kept twin:
    query head 2g+1 is a copy of head 2g (same attention output), neuron 256+i computes -0.5 x neuron i; and
    scores that keep head 2g and neuron i. Slicing loses half of every projection's output; all of it is
    linearly predictable from what is kept."""
    from compactlm.formats.scores import ImportanceScores

    teacher = load_model(model_dir)
    hd, n = teacher.config.head_dim, 256
    with torch.no_grad():
        for layer in decoder_layers(teacher):
            q = layer.self_attn.q_proj.weight
            for g in range(2):
                q[(2 * g + 1) * hd:(2 * g + 2) * hd] = q[2 * g * hd:(2 * g + 1) * hd]
            layer.mlp.gate_proj.weight[n:] = layer.mlp.gate_proj.weight[:n]
            layer.mlp.up_proj.weight[n:] = -0.5 * layer.mlp.up_proj.weight[:n]
    layers = teacher.config.num_hidden_layers
    scores = ImportanceScores(heads=torch.tensor([[2.0, 1.0, 2.0, 1.0]] * layers),
                              neurons=torch.cat([torch.full((layers, n), 2.0), torch.ones(layers, n)], dim=1),
                              channels=torch.arange(teacher.config.hidden_size, dtype=torch.float32),
                              layer_block_influence=torch.ones(layers))
    return teacher, scores


def _projection_inputs(model, ids) -> dict:
    """{(layer, projection): input activations [tokens, width]} of `model` on `ids`."""
    out, handles = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        for name in PROJECTIONS:
            def hook(_m, inp, _o, key=(i, name)):
                out[key] = inp[0].reshape(-1, inp[0].shape[-1])
            handles.append(layer.get_submodule(name).register_forward_hook(hook))
    model(input_ids=ids)
    for h in handles:
        h.remove()
    return out


def _held_out_errors(teacher, student, plan, ids) -> dict:
    """Relative error of each student projection against the teacher's, both fed the teacher's activations."""
    acts = _projection_inputs(teacher, ids)
    hd = teacher.config.head_dim
    ch = torch.tensor(plan["kept_channels"])
    errors = {}
    for s, layer in enumerate(plan["kept_layers"]):
        kept = {"self_attn.o_proj": [h * hd + j for h in plan["kept_heads"][s] for j in range(hd)],
                "mlp.down_proj": plan["kept_neurons"][s]}
        for name in PROJECTIONS:
            h = acts[layer, name]
            target = h @ decoder_layers(teacher)[layer].get_submodule(name).weight[ch].T
            got = h[:, kept[name]] @ decoder_layers(student)[s].get_submodule(name).weight.T
            errors[s, name] = float((target - got).square().sum() / target.square().sum())
    return errors


@torch.no_grad()
def test_refit_rebuilds_what_removed_units_contributed_on_held_out_tokens(tiny_gqa_model_dir):
    teacher, scores = _twin_teacher(tiny_gqa_model_dir)
    plan = plan_pruning(teacher.config, scores, WIDTH)
    assert plan["kept_heads"][0] == [0, 2] and plan["kept_neurons"][0] == list(range(256))
    sliced, _ = prune_model(teacher, scores, WIDTH)
    repaired, _ = prune_model(teacher, scores, WIDTH)
    report = reconstruct(teacher, repaired, plan, _calib(seed=1))
    assert report["passes"] == 1 and len(report["projections"]) == 2 * 4  # both projections of the 4 layers
    assert all(r["error_after"] < 0.01 < 0.1 < r["error_before"] for r in report["projections"]), report
    held_out = _calib(seed=2, n=8)
    before = _held_out_errors(teacher, sliced, plan, held_out)
    after = _held_out_errors(teacher, repaired, plan, held_out)
    assert all(after[k] < 0.1 * before[k] and before[k] > 0.1 for k in before), (before, after)
    # the student as a whole follows the teacher more closely; only the refitted projections changed
    t, a, b = (logits_of(m, held_out) for m in (teacher, sliced, repaired))
    assert (b - t).square().mean() < 0.75 * (a - t).square().mean()  # 0.58x here; channels are still cut
    for name, w in repaired.state_dict().items():
        if not name.endswith(("o_proj.weight", "down_proj.weight")):
            assert torch.equal(w, sliced.state_dict()[name]), name


def test_memory_bound_splits_passes_with_the_same_result(tiny_gqa_model_dir, scored):
    teacher = load_model(tiny_gqa_model_dir)
    scores = load_scores(scored)
    plan = plan_pruning(teacher.config, scores, WIDTH)
    one, _ = prune_model(teacher, scores, WIDTH)
    many, _ = prune_model(teacher, scores, WIDTH)
    ids = _calib(seed=1, n=4)
    assert reconstruct(teacher, one, plan, ids)["passes"] == 1
    # one MLP Gram matrix (512^2 floats = 1 MiB) per pass: 4 layers -> 4+ passes
    assert reconstruct(teacher, many, plan, ids, max_memory_gb=1.1 / 1024)["passes"] >= 4
    for name, w in one.state_dict().items():
        torch.testing.assert_close(many.state_dict()[name], w, rtol=1e-5, atol=1e-6)


def test_nothing_pruned_comes_back_exactly(tiny_gqa_model_dir, scored):
    teacher = load_model(tiny_gqa_model_dir)
    scores = load_scores(scored)
    for cfg in (PruneConfig(), PruneConfig(num_hidden_layers=3)):  # prune nothing; depth only (no unit removed)
        student, _ = prune_model(teacher, scores, cfg)
        expected = {k: v.clone() for k, v in student.state_dict().items()}
        report = reconstruct(teacher, student, plan_pruning(teacher.config, scores, cfg), _calib(seed=1, n=4))
        assert report["projections"] == [] and report["passes"] == 0
        for name, w in student.state_dict().items():
            assert torch.equal(w, expected[name]), name
    # the least-squares solution itself is exact for a projection that keeps all its inputs
    from compactlm.pruning.repair import _fit

    w, h = torch.randn(6, 10, dtype=torch.float64), torch.randn(200, 10, dtype=torch.float64)
    fitted, before, after = _fit(w, h.T @ h, torch.arange(10), damping=0.01)
    torch.testing.assert_close(fitted, w)
    assert before == pytest.approx(0.0, abs=1e-12) and after == pytest.approx(0.0, abs=1e-12)


def test_prune_stage_with_repair_returns_teacher_logits_when_nothing_is_pruned(tiny_gqa_model_dir, scored,
                                                                              tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Sentence {i}: the model keeps what matters." for i in range(40)))
    repair = RepairConfig(num_samples=4, seq_len=32)
    rec = prune_to_dir(tiny_gqa_model_dir, scored, PruneConfig(repair=repair), tmp_path / "same", calibration=calib)
    assert rec["repair"]["projections"] == []
    teacher, student = load_model(tiny_gqa_model_dir), load_model(tmp_path / "same")
    ids = random_ids()
    torch.testing.assert_close(logits_of(student, ids), logits_of(teacher, ids), rtol=0, atol=1e-5)

    rec = prune_to_dir(tiny_gqa_model_dir, scored, WIDTH.model_copy(update={"repair": repair}), tmp_path / "width",
                       calibration=calib)
    on_disk = json.loads((tmp_path / "width" / "pruning.json").read_text())
    assert on_disk["repair"]["tokens"] == 4 * 32 and len(on_disk["repair"]["projections"]) == 8
    assert on_disk["repair"]["mean_error_after"] < on_disk["repair"]["mean_error_before"]
    plain = prune_to_dir(tiny_gqa_model_dir, scored, WIDTH, tmp_path / "plain")
    assert "repair" not in plain and rec["student"] == plain["student"]


def test_repair_without_calibration_fails_before_loading(tiny_gqa_model_dir, scored, tmp_path):
    cfg = WIDTH.model_copy(update={"repair": RepairConfig()})
    for calibration in (None, tmp_path / "missing.txt"):
        with pytest.raises(ValueError, match="prune.repair refits .* calibration"):
            prune_to_dir(tiny_gqa_model_dir, scored, cfg, tmp_path / "out", calibration=calibration)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="damping"):
        RepairConfig(damping=0)
