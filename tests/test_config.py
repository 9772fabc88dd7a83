"""Recipe validation: every bad recipe fails fast, before any model loads, naming the field."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from compactlm.config import Recipe, RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]


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
])
def test_bad_recipe_names_the_field(override, field, words):
    with pytest.raises(RecipeError) as e:
        load_recipe(REPO / "configs/tiny-test.yaml", override)
    msg = str(e.value)
    assert f"  {field}:" in msg and words in msg, msg


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


def test_cli_rejects_bad_recipe_fast_without_loading_models(tmp_path):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(REPO / "configs/tiny-test.yaml"),
                           "--set", "prune.num_hidden_layers=-2", "--set", f"workdir={tmp_path}/w"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    elapsed = time.time() - t0
    assert proc.returncode == 2
    assert "prune.num_hidden_layers" in proc.stderr and proc.stderr.count("\n") <= 3, proc.stderr
    assert elapsed < 5, elapsed
    assert not (tmp_path / "w").exists()  # nothing written


def test_schema_has_descriptions_for_the_ui_form():
    schema = Recipe.model_json_schema()
    distill = schema["$defs"]["DistillConfig"]["properties"]
    assert distill["steps"]["minimum"] == 1 and distill["steps"]["description"]


def test_unknown_eval_task_fails_in_preflight_naming_the_field():
    from compactlm.config import preflight

    recipe = load_recipe(REPO / "configs/tiny-test.yaml", ["eval.tasks=[compactlm_factz]"])
    with pytest.raises(RecipeError, match=r"eval.tasks: .*compactlm_factz"):
        preflight(recipe)


def test_prune_target_larger_than_teacher_fails_before_compute(tmp_path, tiny_model_dir):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(REPO / "configs/tiny-test.yaml"),
                           "--set", f"teacher={tiny_model_dir}", "--set", "prune.intermediate_size=99999",
                           "--set", f"workdir={tmp_path}/w"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "prune: prune.intermediate_size=99999 is larger than the teacher's 256" in proc.stderr, proc.stderr
    # Rejected before generation starts: nothing written. (It reads the teacher's config, so it imports
    # transformers; the sub-5 s bound for schema errors is asserted above, where nothing heavy is imported.)
    assert time.time() - t0 < 60 and not (tmp_path / "w").exists()
