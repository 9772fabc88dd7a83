"""Export a model, pausing once llama.cpp's converter has written the first GGUF file into the publish temp
directory (before the quantizer, exports.json and the manifest).

    python tests/scripts/pause_export.py MODEL OUT EXPORT_CONFIG_JSON
"""

import sys

import compactlm.export.llamacpp as L
from compactlm.config import ExportConfig
from compactlm.export import export_model
from tests.scripts.faults import pause_after

L.convert = pause_after(L.convert, "IN-EXPORT")
model, out, cfg = sys.argv[1:4]
export_model(model, ExportConfig.model_validate_json(cfg), out)
