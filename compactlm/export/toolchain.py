"""Where llama.cpp lives: the ``llama_cpp`` package (llama-cpp-python, built from its sdist by ``make install``) and
llama.cpp's own HF -> GGUF converter, taken from the same sdist (``convert_hf_to_gguf.py``, its ``conversion``
package and the ``gguf-py`` it was written against, which is newer than the ``gguf`` wheel transformers reads).

The converter runs as a child process with that ``gguf-py`` first on its path, exactly as llama.cpp ships it, so
compactlm writes no GGUF itself and the ``gguf`` package transformers imports is left alone.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

#: The llama-cpp-python release the Makefile builds (constraints/cpu.txt pins the same).
LLAMA_CPP_PYTHON = "0.3.36"
#: Environment variable naming another converter folder (one holding convert_hf_to_gguf.py).
CONVERTER_ENV = "COMPACTLM_LLAMA_CPP_CONVERTER"
_INSTALL_HINT = ("run `make install` (it builds llama-cpp-python {v} from its sdist and keeps llama.cpp's converter "
                 "in {d}), or drop export.gguf")


class ExportError(ValueError):
    """An export cannot be made from this input (a format the architecture cannot take, a tokenizer that cannot be
    embedded, a shape the quantized kernels reject). The message names the recipe field and the fix."""


class ToolchainError(ExportError):
    """llama.cpp (the Python package or its converter) is missing. The message says how to install it."""


def converter_dir() -> Path:
    """The folder holding llama.cpp's ``convert_hf_to_gguf.py`` (``$COMPACTLM_LLAMA_CPP_CONVERTER``, else
    ``<venv>/share/compactlm/llama-cpp-python-<version>``, where ``make install`` puts it)."""
    env = os.environ.get(CONVERTER_ENV)
    if env:
        return Path(env).expanduser()
    return Path(sys.prefix) / "share" / "compactlm" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"


def converter_script() -> Path:
    """``convert_hf_to_gguf.py``; ToolchainError naming the fix when it is not installed."""
    d = converter_dir()
    script = d / "convert_hf_to_gguf.py"
    if not (script.is_file() and (d / "conversion").is_dir() and (d / "gguf-py").is_dir()):
        raise ToolchainError(f"llama.cpp's converter is not installed (no {script}): "
                             + _INSTALL_HINT.format(v=LLAMA_CPP_PYTHON, d=d))
    return script


def check_llama_cpp() -> str:
    """The importable llama_cpp's version; ToolchainError naming the fix when it cannot be imported."""
    try:
        import llama_cpp
    except Exception as e:  # ImportError, or OSError when its shared library does not load
        raise ToolchainError(f"llama-cpp-python cannot be imported ({type(e).__name__}: {e}): "
                             + _INSTALL_HINT.format(v=LLAMA_CPP_PYTHON, d=converter_dir())) from None
    return llama_cpp.__version__


@functools.cache
def _registered(conversion: Path) -> frozenset[str]:
    names: set[str] = set()
    pattern = re.compile(r"@ModelBase\.register\(([^)]*)\)", re.S)
    for path in sorted(conversion.glob("*.py")):
        for args in pattern.findall(path.read_text(encoding="utf-8")):
            names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
    return frozenset(names)


def convertible_architectures() -> frozenset[str]:
    """HF ``architectures`` names llama.cpp's converter registers (read from its source: milliseconds)."""
    return _registered(converter_script().parent / "conversion")
