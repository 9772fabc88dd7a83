"""Property-based fuzzing of the recipe schema: every mutated recipe either validates or fails with one
RecipeError naming the mutated field -- never another exception, never any file written."""

import copy
import os
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compactlm.config import Recipe, RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
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


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
    assert CASES["invalid"] > 50 and CASES["valid"] > 5, CASES
    print(f"recipe fuzzing: {CASES['valid']} valid, {CASES['invalid']} invalid recipes")
