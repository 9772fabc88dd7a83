"""The recipe schema: bounds, descriptions for the UI form, grouped sections, moved keys."""

from __future__ import annotations

import pytest

from compactlm.config import EvalConfig, GenerateConfig, PruneConfig, Recipe
from tests.helpers import REPO


def test_schema_has_descriptions_for_the_ui_form():
    schema = Recipe.model_json_schema()
    distill = schema["$defs"]["DistillConfig"]["properties"]
    assert distill["steps"]["minimum"] == 1 and distill["steps"]["description"]


def test_config_bad_values_name_the_field():
    from pydantic import ValidationError

    for kw, field in [({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"prompts": "x.txt"}, "prompts"),
                      ({"prompts": "hf:"}, "prompts"),
                      ({"filters": {"near_dup_threshold": 0}}, "filters.near_dup_threshold"),
                      ({"self_instruct": {"num_instructions": 0}}, "self_instruct.num_instructions"),
                      ({"self_instruct": {"min_words": 5, "max_words": 2}}, "self_instruct"),
                      ({"filters": {"min_tokens": 5, "max_completion_tokens": 2}}, "filters")]:
        with pytest.raises(ValidationError) as e:
            GenerateConfig(**kw)
        assert ".".join(map(str, e.value.errors()[0]["loc"])) == field, kw


def test_budget_config_is_exclusive_with_shape_fields():
    from pydantic import ValidationError

    from compactlm.recipe import RecipeError, load_recipe

    assert PruneConfig(budget=dict(params=0.5)).budget.params == 0.5
    with pytest.raises(ValidationError, match="either a budget or an explicit shape.*unset num_hidden_layers"):
        PruneConfig(budget=dict(params=0.5), num_hidden_layers=3)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValidationError, match="params"):
            PruneConfig(budget=dict(params=bad))
    with pytest.raises(ValidationError, match="proxy"):
        PruneConfig(budget=dict(params=0.5, proxy="ppl"))
    recipe = REPO / "configs/tiny-test.yaml"  # it sets an explicit shape
    with pytest.raises(RecipeError, match="  prune: give either a budget"):
        load_recipe(recipe, ["prune.budget.params=0.5"])
    r = load_recipe(recipe, ["prune.budget.params=0.5", "prune.num_hidden_layers=null", "prune.intermediate_size=null",
                             "prune.budget.proxy=kl", "prune.budget.candidates=2"])
    assert (r.prune.budget.params, r.prune.budget.proxy, r.prune.budget.candidates) == (0.5, "kl", 2)


def test_eval_config_new_fields():
    cfg = EvalConfig()
    assert (cfg.backend, cfg.speed, cfg.min_recovery) == ("hf", True, None)
    assert EvalConfig(backend="vllm", min_recovery=0.8).min_recovery == 0.8
    for bad in ({"backend": "tgi"}, {"min_recovery": 1.2}, {"min_recovery": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EvalConfig(**bad)
    assert EvalConfig(backend="vllm", tensor_parallel_size=8).tensor_parallel_size == 8
    with pytest.raises(ValueError, match="tensor_parallel_size: 2 splits a model over GPUs with vLLM; set backend: "
                                         "vllm"):
        EvalConfig(tensor_parallel_size=2)


def test_form_groups_the_sections_and_shares_the_run_settings():
    """generate.filters and prune.budget are sections of the form; the stage flows take the recipe's run settings
    as one RunSettings, whose fields are the recipe's own (one definition each)."""
    from compactlm.config import FilterConfig, RunSettings

    schema = Recipe.model_json_schema()
    defs = schema["$defs"]
    assert set(FilterConfig.model_fields) <= set(defs["FilterConfig"]["properties"])
    assert not set(FilterConfig.model_fields) & set(defs["GenerateConfig"]["properties"])
    assert defs["GenerateConfig"]["properties"]["filters"]["description"]
    prune = defs["PruneConfig"]["properties"]
    assert "budget" in prune and not {"params", "search", "proxy"} & set(prune)
    assert defs["BudgetConfig"]["required"] == ["params"]
    for name in RunSettings.model_fields:
        assert schema["properties"][name] == RunSettings.model_json_schema()["properties"][name], name
    recipe = Recipe(teacher="tiny-random-llama", workdir="w", seed=3, device="cpu", runner="process")
    assert recipe.settings() == RunSettings(workdir="w", seed=3, device="cpu", runner="process")


def test_descriptions_are_written_for_users():
    """No development details in the form: repository paths, benchmark citations, internal module names."""
    texts = []

    def walk(model) -> None:
        for info in model.model_fields.values():
            texts.append(info.description or "")
            for arg in getattr(info.annotation, "__args__", (info.annotation,)):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    walk(arg)

    from pydantic import BaseModel

    walk(Recipe)
    assert all(texts) and len(texts) > 90
    for bad in ("../shared", "benchmarks/", "compactlm.", ".py"):
        assert not [t for t in texts if bad in t], bad
    assert EvalConfig().data_dir is None  # no development folder as a default


@pytest.mark.parametrize("section, key, value, new", [("generate", "min_tokens", "3", "filters"),
                                                      ("generate", "near_dup_threshold", "0.8", "filters"),
                                                      ("prune", "params", "0.5", "budget"),
                                                      ("prune", "proxy", "kl", "budget")])
def test_a_moved_key_names_its_new_place(section, key, value, new):
    """Recipes written before the form was grouped fail with the new place of the key, not 'unknown key'."""
    from compactlm.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe(REPO / "configs/tiny-test.yaml", [f"{section}.{key}={value}"])
    msg = str(e.value)
    assert f"  {section}: '{key}' moved into the '{new}' section: write it as {new}: {{{key}: ...}}" in msg, msg
    shape = ["prune.num_hidden_layers=null", "prune.intermediate_size=null", "prune.budget.params=0.5"]
    r = load_recipe(REPO / "configs/tiny-test.yaml", (shape if section == "prune" else []) +
                    [f"{section}.{new}.{key}={value}"])
    assert str(getattr(getattr(getattr(r, section), new), key)) == value
