"""GGUF files for llama.cpp: llama.cpp's own converter (HF -> f32 / f16 / bf16 GGUF, tokenizer and chat template
inside) and llama.cpp's quantizer (``llama_model_quantize`` in llama-cpp-python's libllama) for q8_0, q4_k_m, ....

Both run as child processes: the converter needs its own ``gguf-py`` (see :mod:`compactlm.export.toolchain`), and
a quantizer that aborts takes only its child down. Every check that can fail on the input runs before a file is
written (:func:`check_gguf`); what only the converter can tell (a tokenizer whose pre-tokenizer llama.cpp does
not know) becomes the same kind of error, naming the field and the fix.

    python -m compactlm.export.llamacpp quantize SRC.gguf DST.gguf TYPE [THREADS]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from compactlm.export.toolchain import (
    ExportError,
    check_llama_cpp,
    converter_script,
    convertible_architectures,
)

#: GGUF types the converter writes itself; the others are quantized from the f16 file (llama.cpp's own recipe).
FLOAT_TYPES = ("f32", "f16", "bf16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"export: {model_dir} is not a Hugging Face model directory (no config.json)")
    return json.loads(path.read_text())


def check_gguf(model_dir: str | os.PathLike, types: list[str]) -> None:
    """Everything that can be checked before converting: the toolchain is installed, llama.cpp's converter knows
    the architecture, a tokenizer is there to embed. Raises ExportError (a ValueError) naming ``export.gguf``."""
    if not types:
        return
    model_dir = Path(model_dir)
    arch = (_config(model_dir).get("architectures") or ["?"])[0]
    known = convertible_architectures()  # also: the converter is installed
    if arch not in known:
        raise ExportError(f"export.gguf: {arch} ({model_dir}) cannot be converted to GGUF: llama.cpp's converter "
                          f"does not know this architecture ({len(known)} known, e.g. LlamaForCausalLM, "
                          "Qwen3ForCausalLM, Gemma2ForCausalLM). Export it for vLLM instead (export.vllm) or drop "
                          "export.gguf")
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise ExportError(f"export.gguf: {model_dir} has no tokenizer to embed in the GGUF file (no "
                          f"{' or '.join(_TOKENIZER_FILES)}): save the tokenizer beside the weights "
                          "(tokenizer.save_pretrained) or drop export.gguf")
    if any(t not in FLOAT_TYPES for t in types):
        check_llama_cpp()


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:].strip()


def convert(model_dir: str | os.PathLike, out_file: str | os.PathLike, outtype: str, log: Path) -> None:
    """``convert_hf_to_gguf.py MODEL --outfile OUT --outtype TYPE`` in a child process, its output in `log`.

    A tokenizer llama.cpp cannot embed (unknown BPE pre-tokenizer, no vocabulary it can read) raises ExportError
    naming the cause; any other failure RuntimeError with the converter's last output."""
    cmd = [sys.executable, str(converter_script()), str(model_dir), "--outfile", str(out_file), "--outtype", outtype]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py, always
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    text = log.read_text(errors="replace")
    if proc.returncode == 0 and Path(out_file).is_file():
        return
    Path(out_file).unlink(missing_ok=True)
    error = _last_error(text)
    if "pre-tokenizer was not recognized" in text or "tokenizer" in error.lower():
        raise ExportError(f"export.gguf: the tokenizer of {model_dir} cannot be embedded in a GGUF file ({error}): "
                          "llama.cpp's converter only embeds tokenizers it knows. Use a tokenizer llama.cpp supports "
                          "(e.g. the teacher's) or drop export.gguf")
    raise RuntimeError(f"llama.cpp's converter failed on {model_dir} (exit {proc.returncode}); last output:\n"
                       f"{_tail(text)}")


def _last_error(text: str) -> str:
    """The exception line of a Python traceback in `text` (``NotImplementedError: ...``), else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (errors or lines or ["no output"])[-1][:500]


def quantize(src: str | os.PathLike, dst: str | os.PathLike, gguf_type: str, log: Path,
             threads: int | None = None) -> None:
    """llama.cpp's quantizer on `src` (an f16 GGUF) -> `dst` of `gguf_type`, in a child process."""
    cmd = [sys.executable, "-m", "compactlm.export.llamacpp", "quantize", str(src), str(dst), gguf_type,
           str(threads or os.cpu_count() or 1)]
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(Path(__file__).resolve().parents[2]))
    if proc.returncode != 0 or not Path(dst).is_file():
        Path(dst).unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp's quantizer failed ({gguf_type}, exit {proc.returncode}); last output:\n"
                           f"{_tail(log.read_text(errors='replace'))}")


def _quantize_main(src: str, dst: str, gguf_type: str, threads: int) -> int:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = threads
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """What a GGUF file holds: architecture, file type, tensor types (count per type), vocabulary size, whether a
    chat template is inside. Read with the ``gguf`` package's reader (no model load)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {
        "architecture": value("general.architecture"),
        "file_type": value("general.file_type"),
        "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())),
        "tensors": len(reader.tensors),
        "vocab_size": len(tokens.data) if tokens is not None else 0,
        "tokenizer_model": value("tokenizer.ggml.model"),
        "chat_template": value("tokenizer.chat_template") is not None,
    }


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    cfg = model_dir / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))


def check_written(path: Path, model_dir: Path) -> dict[str, Any]:
    """The converted file carries the tokenizer (and the chat template when the model has one); ExportError
    otherwise. Returns :func:`inspect`'s facts."""
    facts = inspect(path)
    if not facts["vocab_size"]:
        raise ExportError(f"export.gguf: {path.name} holds no tokenizer vocabulary: the tokenizer of {model_dir} "
                          "could not be embedded; use a tokenizer llama.cpp supports or drop export.gguf")
    if _has_chat_template(model_dir) and not facts["chat_template"]:
        raise ExportError(f"export.gguf: {path.name} lost the chat template of {model_dir}: put it in "
                          "tokenizer_config.json (chat_template) or chat_template.jinja, or drop export.gguf")
    return facts


def write_gguf(model_dir: str | os.PathLike, dest: str | os.PathLike, types: list[str],
               threads: int | None = None) -> list[dict[str, Any]]:
    """Write ``gguf/model-<type>.gguf`` for each of `types` into `dest` (conversion and quantizer logs in
    ``logs/``) and return one record per file: name, format, type, path (relative to `dest`), size_bytes and
    :func:`inspect`'s facts. Quantized types come from the f16 file, which is kept only when asked for."""
    model_dir, dest = Path(model_dir), Path(dest)
    check_gguf(model_dir, types)
    (dest / "gguf").mkdir(parents=True, exist_ok=True)
    (dest / "logs").mkdir(parents=True, exist_ok=True)
    paths = {t: dest / "gguf" / f"model-{t}.gguf" for t in [*types, "f16"]}
    floats = [t for t in types if t in FLOAT_TYPES]
    quants = [t for t in types if t not in FLOAT_TYPES]
    for t in floats + (["f16"] if quants and "f16" not in floats else []):
        convert(model_dir, paths[t], t, dest / "logs" / f"convert-{t}.log")
        check_written(paths[t], model_dir)
    for t in quants:
        quantize(paths["f16"], paths[t], t, dest / "logs" / f"quantize-{t}.log", threads)
    if "f16" not in types:
        paths["f16"].unlink(missing_ok=True)
    return [{"name": f"gguf-{t}", "format": "gguf", "type": t, "path": f"gguf/model-{t}.gguf",
             "size_bytes": paths[t].stat().st_size, **inspect(paths[t])} for t in types]


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] != "quantize":
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        sys.exit(2)
    rc = _quantize_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else 1)
    sys.exit(1 if rc else 0)
