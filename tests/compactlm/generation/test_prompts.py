"""Prompt sources: files, save_to_disk folders, templates, the hub offline."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from compactlm.config import GenerateConfig
from compactlm.generation import generate_dataset
from tests.helpers import FAST


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """One torch thread for the module (see conftest.one_thread)."""
    yield


def test_prompt_sources_and_template(tmp_path):
    """jsonl / csv / parquet / save_to_disk dir give the same prompts; a template builds them from fields."""
    import datasets

    from compactlm.generation.prompts import load_prompts

    rows = [{"instruction": "Translate to French", "input": "good morning"},
            {"instruction": "Name three colors.", "input": ""},
            {"instruction": "Summarize", "input": None}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text("instruction,input\nTranslate to French,good morning\nName three colors.,\n"
                                    "Summarize,\n")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    tpl = "{instruction}\n\n{input}"
    expect = ["Translate to French\n\ngood morning", "Name three colors.", "Summarize"]
    for src in ("p.jsonl", "p.parquet", "p.csv", "saved"):
        assert load_prompts(str(tmp_path / src), template=tpl) == expect, src
        assert load_prompts(str(tmp_path / src), "instruction", max_prompts=2) == [r["instruction"] for r in rows[:2]]
    with pytest.raises(ValueError, match=r"row 0 has no field 'question' used by generate.template.*'input'"):
        load_prompts(str(tmp_path / "p.jsonl"), template="{question}")
    with pytest.raises(ValueError, match="row 1: the prompt is empty"):
        load_prompts(str(tmp_path / "p.jsonl"), "input")
    # a template may only read fields: no attribute / index access, caught when the recipe is validated
    with pytest.raises(ValueError, match="not allowed"):
        GenerateConfig(template="{instruction.__class__}")


def test_hf_dataset_offline_names_the_alternatives(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    cfg = GenerateConfig(**FAST, prompts="hf:compactlm-test/does-not-exist")
    with pytest.raises(ValueError, match=r"cannot load dataset 'hf:compactlm-test/does-not-exist'.*offline.*"
                                         r"\.jsonl/\.json/\.csv/\.parquet file.*save_to_disk.*'builtin'"):
        generate_dataset(tiny_model_dir, cfg, out, progress=False)
    assert not out.exists()
