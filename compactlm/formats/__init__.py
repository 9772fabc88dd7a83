"""The file formats stages hand each other, one owner module per format.

* :mod:`compactlm.formats.generated` — a generated (or converted) dataset: parquet shards + manifest;
* :mod:`compactlm.formats.scores` — importance scores: ``scores.safetensors`` + ``scores.json``;
* :mod:`compactlm.formats.pruning` — the pruning record ``pruning.json`` that travels with a pruned student.

Stage outputs as a whole (keyed directories, ``manifest.json`` written last) are :mod:`compactlm.artifacts`.
These modules import no stage, so every stage can read what another wrote without importing it.
"""
