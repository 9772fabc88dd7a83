"""Helpers referenced by the task YAMLs here (`!function utils.<name>`); loaded by lm-eval's YAML loader."""

from __future__ import annotations

import json
import re
from typing import Any


def load_piqa(data_file: str, labels_file: str, **_: Any):
    """PIQA validation: the goal/sol1/sol2 rows of `data_file` joined line by line with `labels_file`."""
    import datasets

    with open(data_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(labels_file, encoding="utf-8") as f:
        labels = [int(line) for line in f if line.strip()]
    if len(rows) != len(labels):
        raise ValueError(f"PIQA: {data_file} has {len(rows)} rows but {labels_file} has {len(labels)} labels")
    for row, label in zip(rows, labels):
        row["label"] = label
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def _hellaswag_preprocess(text: str) -> str:
    # Same as lm_eval/tasks/hellaswag/utils.py: brackets are WikiHow artifacts.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def process_hellaswag(dataset):
    def _process(doc):
        return {
            "query": _hellaswag_preprocess(doc["query"]),
            "choices": [_hellaswag_preprocess(e) for e in doc["endings"]],
            "label": int(doc["label"]),
        }

    return dataset.map(_process)


def winogrande_doc_to_text(doc) -> int:
    return int(doc["gold"])


def winogrande_doc_to_target(doc) -> str:
    return doc["continuation"].strip()


def winogrande_doc_to_choice(doc) -> list[str]:
    return list(doc["context_options"])


def boolq_doc_to_text(doc) -> str:
    query = doc["query"]
    return query.removeprefix("Passage: ") + "\nAnswer:"
