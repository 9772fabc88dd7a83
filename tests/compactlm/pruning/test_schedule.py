"""Iterative pruning arithmetic: intermediate shapes, the steps of each round, composed layer maps."""

import pytest
from transformers import AutoConfig

from compactlm.config import SHAPE_FIELDS, PruneConfig, Recipe
from compactlm.formats.pruning import compose_root
from compactlm.pruning.schedule import round_shapes, round_steps
from compactlm.pruning.shapes import param_count, target_shape

SMOLLM2 = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)


@pytest.mark.parametrize("final", [
    {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 768, "num_attention_heads": 9},  # MLP only
    {"num_hidden_layers": 18, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9},  # depth
    {"num_hidden_layers": 26, "hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6},  # mixed
    {"num_hidden_layers": 30, "hidden_size": 432, "intermediate_size": 1536, "num_attention_heads": 9},  # hidden
])
@pytest.mark.parametrize("rounds", [2, 3, 4])
def test_round_shapes_shrink_every_round_to_the_final_shape_and_are_valid_students(final, rounds):
    config = AutoConfig.for_model("llama", **SMOLLM2)
    shapes = round_shapes(config, final, rounds)
    assert len(shapes) == rounds and shapes[-1] == final
    teacher = {k: SMOLLM2[k] for k in SHAPE_FIELDS}
    params = [param_count(config)]
    for prev, shape in zip([teacher, *shapes], shapes):
        assert all(final[k] <= shape[k] <= prev[k] for k in SHAPE_FIELDS), (prev, shape)
        assert shape["num_attention_heads"] % 3 == 0 and shape["hidden_size"] % shape["num_attention_heads"] == 0
        target_shape(config, PruneConfig(**shape))  # a valid student of the teacher
        params.append(param_count(config, shape))
    assert params == sorted(params, reverse=True)
    assert params[1] < params[0]  # round 1 cuts (heads and hidden sizes move on coarse grids, so not always both)


def test_round_shapes_of_one_round_is_the_final_shape_and_a_larger_final_is_refused():
    config = AutoConfig.for_model("llama", **SMOLLM2)
    final = {"num_hidden_layers": 20, "hidden_size": 576, "intermediate_size": 1024, "num_attention_heads": 9}
    assert round_shapes(config, final, 1) == [final]
    with pytest.raises(ValueError, match="larger than the teacher"):
        round_shapes(config, {**final, "intermediate_size": 2048}, 2)


@pytest.mark.parametrize(("steps", "rounds", "share", "want"), [
    (100, 2, 0.5, [50, 50]), (100, 3, 0.5, [25, 25, 50]), (100, 2, 0.25, [25, 75]), (3, 3, 0.9, [1, 1, 1]),
    (4, 2, 0.99, [3, 1]), (10, 4, 0.1, [1, 1, 1, 7]),
])
def test_round_steps_add_up_to_the_recipe_steps(steps, rounds, share, want):
    got = round_steps(steps, rounds, share)
    assert got == want and sum(got) == steps and min(got) >= 1


def test_too_few_steps_for_the_rounds_fail_naming_the_fields():
    with pytest.raises(ValueError, match="distill.steps=2 cannot be split between schedule.rounds=3"):
        round_steps(2, 3, 0.5)
    base = {"teacher": "tiny-random-llama", "prune": {"num_hidden_layers": 2}}
    with pytest.raises(ValueError, match=r"distill.steps \(2\) cannot be split between schedule.rounds \(3\)"):
        Recipe(**base, schedule={"rounds": 3}, distill={"steps": 2, "warmup_steps": 0})
    with pytest.raises(ValueError, match="schedule prunes the teacher in rounds: it needs student: pruned"):
        Recipe(**base, schedule={}, student="tiny-random-llama")
    with pytest.raises(ValueError, match="set prune.streaming: false"):
        Recipe(teacher="tiny-random-llama", prune={"num_hidden_layers": 2, "streaming": True}, schedule={})
    assert Recipe(**base, schedule={}).schedule.rounds == 2


def test_a_record_pruned_from_a_pruned_student_maps_to_the_original_teacher():
    round1 = {"teacher_dir": "/t", "kept_layers": [0, 2, 3, 5], "kept_channels": [1, 2, 4, 6, 7]}
    round2 = {"teacher_dir": "/r1", "kept_layers": [0, 2, 3], "kept_channels": [0, 2, 4]}
    root = compose_root(round1, round2)
    assert root == {"teacher_dir": "/t", "kept_layers": [0, 3, 5], "kept_channels": [1, 4, 7]}
    assert compose_root({**round2, "root": root}, {"kept_layers": [1, 2], "kept_channels": [0, 1]}) == \
        {"teacher_dir": "/t", "kept_layers": [3, 5], "kept_channels": [1, 4]}
    assert compose_root(round1, {**round2, "kept_channels": None})["kept_channels"] is None  # a rotated hidden size
    assert compose_root(None, round2) is None  # pruned from a plain model: its own maps are the teacher's
