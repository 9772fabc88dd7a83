"""Loading recipes: every bad recipe fails fast, before any model loads, naming the field; property-based fuzzing of
the schema."""

from __future__ import annotations

import copy
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compactlm.config import Recipe
from compactlm.recipe import RecipeError, load_recipe
from tests.helpers import REPO


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    assert isinstance(load_recipe(recipe), Recipe)


@pytest.mark.parametrize("override, field, words", [
    (["bogus=1"], "bogus", "unknown key"),
    (["distill.stepz=3"], "distill.stepz", "unknown key"),
    (["distill.steps=-5"], "distill.steps", "greater than or equal to 1"),
    (["prune.intermediate_size=-1"], "prune.intermediate_size", "greater than or equal to 1"),
    (["generate.prompts=/no/such/prompts.jsonl"], "generate.prompts", "not found"),
    (["teacher=not-a-model"], "teacher", "unknown model"),
    (["teacher=/no/such/model.gguf"], "teacher", "not found"),
    (["eval.tasks=[]"], "eval.tasks", "at least one task"),
    (["distill.warmup_steps=99"], "distill", "must not exceed steps"),
    (["distill_then=[{steps: 4}, {on_policy: {fraction: 2}}]"], "distill_then.1.on_policy.fraction",
     "less than or equal to 1"),
    (["distill_then=[{mode: offline, on_policy: {}}]"], "distill_then.0", "on_policy needs the teacher"),
    (["correct={steps: 2, warmup_steps: 5}"], "correct", "warmup_steps (5) must not exceed steps (2)"),
    (["correct={lr: 0}"], "correct.lr", "greater than 0"),
    (["correct={}", "distill_then=[{mode: offline}]"], "(top level)", "distill_then.0.mode: offline learns"),
])
def test_bad_recipe_names_the_field(override, field, words):
    with pytest.raises(RecipeError) as e:
        load_recipe(REPO / "configs/tiny-test.yaml", override)
    msg = str(e.value)
    assert f"  {field}:" in msg and words in msg, msg


@pytest.mark.parametrize("override, field, hint", [
    (["distill.stepz=3"], "distill.stepz", "did you mean 'steps'?"),
    (["distil.steps=3"], "distil", "did you mean 'distill'?"),
    (["generate.filters.min_tokenz=3"], "generate.filters.min_tokenz", "did you mean 'min_tokens'?"),
    (["prune.budget.parmas=0.5", "prune.num_hidden_layers=null", "prune.intermediate_size=null"],
     "prune.budget.parmas", "did you mean 'params'?"),
    (["eval.zzz=1"], "eval.zzz", "unknown key (check the spelling"),
    (["distill_then=[{stepz: 3}]"], "distill_then.0.stepz", "did you mean 'steps'?"),
])
def test_a_misspelled_key_or_section_gets_a_suggestion(override, field, hint):
    with pytest.raises(RecipeError) as e:
        load_recipe(REPO / "configs/tiny-test.yaml", override)
    assert f"  {field}: unknown key" in str(e.value) and hint in str(e.value), str(e.value)


def test_override_types_are_parsed():
    r = load_recipe(REPO / "configs/tiny-test.yaml", ["distill.steps=7", "distill.lr=3e-4", "eval.limit=null"])
    assert (r.distill.steps, r.distill.lr, r.eval.limit) == (7, 3e-4, None)


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "nots.yaml").write_text("name: x\n")
    with pytest.raises(RecipeError, match="teacher: required field is missing"):
        load_recipe(tmp_path / "nots.yaml")


def test_unknown_eval_task_fails_in_preflight_naming_the_field():
    from compactlm.preflight import preflight

    recipe = load_recipe(REPO / "configs/tiny-test.yaml", ["eval.tasks=[compactlm_factz]"])
    with pytest.raises(RecipeError, match=r"eval.tasks: .*compactlm_factz"):
        preflight(recipe)


# ---------------------------------------------------------------------------------------------- fuzzing


BASE = yaml.safe_load((REPO / "configs/tiny-test.yaml").read_text())


SECTIONS = ["generate", "score", "prune", "distill", "eval", "tracking"]


FIELDS = {s: sorted(Recipe.model_fields[s].annotation.model_fields) for s in SECTIONS}


TOP = sorted(k for k in Recipe.model_fields if k not in SECTIONS)


values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


field_paths = st.one_of(
    st.sampled_from(TOP).map(lambda k: (k,)),
    st.sampled_from(SECTIONS).flatmap(lambda s: st.sampled_from(FIELDS[s]).map(lambda f: (s, f))),
    st.tuples(st.sampled_from(SECTIONS), st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)),
)


CASES = {"valid": 0, "invalid": 0}


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(field_paths, values), min_size=1, max_size=3))
def test_mutated_recipes_validate_or_fail_clearly(mutations, tmp_path_factory):
    data = copy.deepcopy(BASE)
    workdir = tmp_path_factory.mktemp("w") / "work"
    data["workdir"] = str(workdir)
    for path, value in mutations:
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    cwd_before = set(os.listdir("."))
    try:
        recipe = load_recipe(data=data)
    except RecipeError as e:
        CASES["invalid"] += 1
        msg = str(e)
        assert msg.startswith("invalid recipe")
        named = [".".join(p) for p, _ in mutations]
        assert any(n in msg or n.split(".")[0] in msg for n in named) or "workdir" in msg, (named, msg)
    else:
        CASES["valid"] += 1
        assert isinstance(recipe, Recipe)
    assert not workdir.exists() and set(os.listdir(".")) == cwd_before  # validation writes nothing


def test_fuzz_ran_both_kinds_of_cases():
    # Runs after the property test in file order: both outcomes must have been exercised.
    assert CASES["invalid"] > 50 and CASES["valid"] >= 3, CASES  # derandomized: the same 400 cases each run
    print(f"recipe fuzzing: {CASES['valid']} valid, {CASES['invalid']} invalid recipes")


def test_a_student_larger_than_the_teacher_is_a_warning_naming_both_sizes(tiny_model_dir, tiny_gqa_model_dir):
    from compactlm.preflight import student_size_warning

    assert student_size_warning(tiny_model_dir, tiny_gqa_model_dir) is None
    warning = student_size_warning(tiny_gqa_model_dir, tiny_model_dir)
    assert warning.startswith("student: ") and "larger than the teacher" in warning and "swapped" in warning
