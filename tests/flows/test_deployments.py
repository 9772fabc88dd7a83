"""prefect.yaml stays in sync with the recipes, its parameters validate as the flows' parameters, and every
entrypoint's Prefect form (the parameter schema Prefect generates) shows the stage config's fields and bounds."""

import importlib

import pytest
import yaml

from compactlm.config import (
    DataConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    PruneConfig,
    Recipe,
    RunSettings,
    ScoreConfig,
)
from compactlm.recipe import load_recipe
from tests.helpers import REPO

ALL = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
DEPLOYMENTS = {d["name"]: d for d in ALL if d["entrypoint"] == "flows/compress.py:compress"}
STAGES = {d["entrypoint"].rsplit(":", 1)[1]: d for d in ALL if d["entrypoint"].startswith("flows/stages.py:")}
# stage flow -> (its config class, the recipe section holding its defaults)
STAGE_CONFIGS = {"generate": (GenerateConfig, "generate"), "data": (DataConfig, "data"),
                 "score": (ScoreConfig, "score"),
                 "prune": (PruneConfig, "prune"), "distill": (DistillConfig, "distill"),
                 "evaluate": (EvalConfig, "eval"), "export": (ExportConfig, "export")}


def _flow(entrypoint: str):
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def _schema(entrypoint: str) -> dict:
    from prefect.utilities.callables import parameter_schema

    return parameter_schema(_flow(entrypoint).fn).model_dump_for_openapi()


def test_every_deployment_is_known():
    assert len(ALL) == len(DEPLOYMENTS) + len(STAGES)
    assert set(STAGES) == set(STAGE_CONFIGS)
    names = [(d["entrypoint"], d["name"]) for d in ALL]
    assert len(set(names)) == len(names)  # unique per flow: Prefect addresses them as <flow>/<name>


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_parameters_equal_the_recipe(name):
    dep = DEPLOYMENTS[name]
    from_yaml = Recipe.model_validate(dep["parameters"]["recipe"])
    assert from_yaml == load_recipe(REPO / "configs" / f"{name}.yaml")


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_stage_deployment_defaults_equal_the_demo_recipe(stage):
    dep, (cls, section) = STAGES[stage], STAGE_CONFIGS[stage]
    recipe = load_recipe(REPO / "configs" / f"{dep['name']}.yaml")
    params = dep["parameters"]
    assert cls.model_validate(params["config"]) == getattr(recipe, section)
    settings = RunSettings.model_validate(params["settings"])  # one settings group: the recipe's run settings
    assert settings == recipe.settings() and settings.tracking == recipe.tracking
    assert (settings.workdir, settings.seed, settings.device) == (recipe.workdir, recipe.seed, recipe.device)
    assert settings.runner == recipe.runner
    if stage == "evaluate":
        assert params["models"] == {"teacher": recipe.teacher}
    elif stage == "export":  # every export is scored on the recipe's benchmarks
        assert EvalConfig.model_validate(params["eval_config"]) == recipe.eval and params["teacher"] == recipe.teacher
    else:
        assert params["teacher"] == recipe.teacher
    # every given parameter is one of the flow's, and the flow accepts them (as Prefect validates a run's)
    flow = _flow(dep["entrypoint"])
    schema = _schema(dep["entrypoint"])
    assert set(params) <= set(schema["properties"]), set(params) - set(schema["properties"])
    flow.validate_parameters(dict(params, **{p: "x" for p in schema.get("required", []) if p not in params}))


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_stage_flow_form_shows_config_fields_with_bounds(stage):
    """The schema Prefect builds for the UI form: the stage config with every field, its description, default
    and bounds, plus one settings group (workdir / seed / device / runner / tracking)."""
    cls, _ = STAGE_CONFIGS[stage]
    schema = _schema(STAGES[stage]["entrypoint"])
    props, defs = schema["properties"], schema["definitions"]
    assert {"config", "settings"} <= set(props) and not {"workdir", "seed", "device", "tracking"} & set(props)
    assert all(spec.get("description") for spec in props.values()), props  # from the flow's docstring Args
    assert props["config"]["$ref"] == f"#/definitions/{cls.__name__}"
    assert props["config"]["default"] == cls().model_dump(mode="json")
    fields = defs[cls.__name__]["properties"]
    assert set(fields) == set(cls.model_fields)
    for name, info in cls.model_fields.items():
        assert fields[name].get("description") == info.description, name
    assert props["settings"]["$ref"] == "#/definitions/RunSettings"
    settings = defs["RunSettings"]["properties"]
    assert all(spec.get("description") for spec in settings.values()), settings
    assert settings["device"]["enum"] == ["auto", "cpu", "cuda"]
    assert settings["runner"]["enum"] == ["thread", "process", "ray"] and settings["runner"]["default"] == "thread"
    assert defs["TrackingConfig"]["properties"]["experiment"]["minLength"] == 1

    def bound(field: str, key: str):
        spec = fields[field]
        return spec.get(key, next((a[key] for a in spec.get("anyOf", []) if key in a), None))

    if stage == "generate":
        assert (bound("n", "minimum"), bound("n", "maximum")) == (1, 64)
        assert bound("top_p", "exclusiveMinimum") == 0.0
    elif stage == "score":
        assert bound("seq_len", "minimum") == 8
        assert fields["seq_agg"]["enum"] == ["mean", "l2", "var"]
    elif stage == "prune":
        budget = defs["BudgetConfig"]["properties"]["params"]  # the budget section of the form
        assert (budget["exclusiveMinimum"], budget["exclusiveMaximum"]) == (0, 1)
        assert fields["budget"]["description"] and "anyOf" in fields["budget"]  # an optional section
        assert set(schema["required"]) == {"teacher", "scores_dir"}
    elif stage == "data":
        source = defs["DataSource"]["properties"]  # each source of the mixture is a sub-form
        assert source["kind"]["enum"] == ["generated", "text", "instructions"] and source["weight"]["minimum"] == 0
        assert bound("doc_tokens", "minimum") == 8 and set(schema["required"]) == {"teacher"}
    elif stage == "distill":
        assert bound("steps", "minimum") == 1
        assert (bound("lr", "exclusiveMinimum"), bound("lr", "maximum")) == (0.0, 1.0)
        assert set(schema["required"]) == {"teacher", "student_dir", "data_dir"}
    elif stage == "export":
        gguf = fields["gguf"]["items"]  # a multi-select of llama.cpp's types
        assert {"f16", "q8_0", "q4_k_m"} <= set(gguf["enum"]) and fields["vllm"]["items"]["enum"] == ["w8a8", "w4a16"]
        assert bound("group_size", "minimum") == 8 and set(schema["required"]) == {"student_dir"}
    else:
        assert (bound("min_recovery", "minimum"), bound("min_recovery", "maximum")) == (0.0, 1.0)
        assert schema["required"] == ["models"]


def test_compress_form_shows_the_runner():
    schema = _schema("flows/compress.py:compress")
    runner = schema["definitions"]["Recipe"]["properties"]["runner"]
    assert runner["enum"] == ["thread", "process", "ray"] and runner["default"] == "thread"
