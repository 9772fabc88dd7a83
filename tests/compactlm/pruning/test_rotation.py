"""Cutting the hidden size along principal components (compactlm.pruning.rotation, ``prune.repair.hidden: pca``):
the rotated teacher computes the same function; a residual stream that lives in a subspace survives the cut
exactly, where channel slicing loses it; families with norms on the stream itself are refused up front."""

from __future__ import annotations

import json

import pytest
import torch

from compactlm.arch import decoder_layers
from compactlm.config import PruneConfig, RepairConfig
from compactlm.models import load_model
from compactlm.pruning import prune_to_dir
from compactlm.pruning.rotation import ROTATABLE, principal_basis, rotate_residual, stream_moment
from tests.helpers import PRUNING_TEXT, logits_of, random_ids


def _scores(model_dir, root):
    from compactlm.config import ScoreConfig
    from compactlm.importance import score_model

    (root / "calib.txt").write_text(PRUNING_TEXT)
    score_model(model_dir, root / "calib.txt", ScoreConfig(num_samples=2, seq_len=16, batch_size=2), root / "scores")
    return root / "scores"


def _random_norms(model, seed: int = 0) -> None:
    """Norm weights away from 1, so that folding them is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))


@pytest.mark.parametrize("arch", ROTATABLE)
def test_the_rotated_teacher_computes_the_same_logits(arch, tiny_factory):
    model = load_model(tiny_factory(arch=arch, tie_word_embeddings=False))
    _random_norms(model)
    ids = random_ids(2, 24, seed=1)
    want = logits_of(model, ids)
    basis, share = principal_basis(stream_moment(model, random_ids(4, 32, seed=2)))
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[0], dtype=basis.dtype), atol=1e-8)
    assert share[0] >= share[-1] and float(share.sum()) == pytest.approx(1.0)
    rotate_residual(model, basis)
    assert torch.allclose(logits_of(model, ids), want, atol=2e-4, rtol=1e-4)
    assert all(bool((layer.input_layernorm.weight == 1).all()) for layer in decoder_layers(model))


def _subspace_teacher(model_dir, keep: int):
    """The untied GQA tiny model with everything that writes to the residual stream (embeddings, o_proj,
    down_proj) projected onto a random `keep`-dimensional subspace: the stream lives there, spread over every
    channel."""
    model = load_model(model_dir)
    _random_norms(model)
    dim = model.config.hidden_size
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(3)))
    proj = basis[:, :keep] @ basis[:, :keep].T
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb @ proj)
        for layer in decoder_layers(model):
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
                writer.weight.copy_(proj @ writer.weight)
    return model


def test_pca_keeps_a_stream_that_lives_in_a_subspace_where_slicing_loses_it(tiny_gqa_model_dir, tmp_path):
    keep = 192  # of 256
    teacher = _subspace_teacher(tiny_gqa_model_dir, keep)
    from compactlm.models import copy_model_side_files

    teacher.save_pretrained(tmp_path / "teacher")
    copy_model_side_files(tiny_gqa_model_dir, tmp_path / "teacher")
    scores = _scores(tmp_path / "teacher", tmp_path)
    calib, ids = random_ids(16, 32, seed=4), random_ids(2, 24, seed=5)
    want = torch.log_softmax(logits_of(teacher, ids), -1)
    errors = {}
    for hidden in ("slice", "pca"):
        repair = RepairConfig(num_samples=16, seq_len=32, hidden=hidden)
        out = tmp_path / hidden
        record = prune_to_dir(tmp_path / "teacher", scores, PruneConfig(hidden_size=keep, repair=repair), out,
                              calibration=calib)
        student = load_model(out)
        assert student.config.hidden_size == keep and student.model.embed_tokens.weight.shape[1] == keep
        got = torch.log_softmax(logits_of(student, ids), -1)
        errors[hidden] = float((got.exp() * (got - want)).sum(-1).mean())  # KL(student || teacher) per token
        saved = json.loads((out / "pruning.json").read_text())
        assert saved.get("hidden_basis") == record.get("hidden_basis")
    assert record["kept_channels"] is None and record["hidden_basis"]["method"] == "pca"
    assert record["hidden_basis"]["energy_kept"] == pytest.approx(1.0, abs=1e-6)
    assert errors["pca"] < 1e-6 < 1e-2 < errors["slice"], errors


@pytest.mark.parametrize("arch, tied, why", [("gemma2", False, "normalizes its sublayer outputs"),
                                              ("olmo2", False, "normalizes its sublayer outputs"),
                                              ("llama", True, "tie_word_embeddings: true")])
def test_pca_on_a_teacher_it_cannot_rotate_fails_before_loading_weights(arch, tied, why, tiny_factory, tmp_path):
    """Norms on the stream itself (Gemma, OLMo2), or a head tied to the embeddings (the final norm's weight has
    nowhere to go): refused, naming the field and the fix."""
    teacher = tiny_factory(arch=arch, tie_word_embeddings=tied)
    scores = _scores(teacher, tmp_path)
    cfg = PruneConfig(hidden_size=64, repair=RepairConfig(num_samples=2, seq_len=16, hidden="pca"))
    with pytest.raises(ValueError, match=rf"prune\.repair\.hidden='pca'.*{why}.*hidden='slice'"):
        prune_to_dir(teacher, scores, cfg, tmp_path / "out", calibration=random_ids(2, 16))
    assert not (tmp_path / "out").exists()
