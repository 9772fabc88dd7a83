"""prefect.yaml stays in sync with the recipes, and its parameters validate as the flow's Recipe."""

from pathlib import Path

import pytest
import yaml

from compactlm.config import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_parameters_equal_the_recipe(name):
    dep = DEPLOYMENTS[name]
    assert dep["entrypoint"] == "flows/compress.py:compress"
    from_yaml = Recipe.model_validate(dep["parameters"]["recipe"])
    assert from_yaml == load_recipe(REPO / "configs" / f"{name}.yaml")
