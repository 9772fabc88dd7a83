"""A model directory's safetensors weights read tensor by tensor, without loading the model (streaming pruning and
scoring of teachers larger than memory)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: torch dtype -> safetensors' name, its rank in safetensors' writer (tensors sorted by dtype, descending, then by
#: name) and bytes per element.
DTYPES = {"float16": ("F16", 11, 2), "bfloat16": ("BF16", 12, 2), "float32": ("F32", 15, 4)}


class TeacherTensors:
    """The tensors of a model directory's ``*.safetensors`` files, each read on demand with plain file reads (no
    memory map, whose touched pages would stay resident): memory holds one tensor at a time."""

    _TORCH = {name: dtype for dtype, (name, _, _) in DTYPES.items()}

    def __init__(self, model_dir: str | os.PathLike, setting: str = "prune.streaming"):
        from compactlm.models import safetensors_header

        self.setting = setting
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise ValueError(f"{model_dir} has no .safetensors files: {setting} reads the teacher's weights "
                             f"from them (convert the checkpoint, or set {setting}: false)")
        self.where: dict[str, tuple[Path, int, dict]] = {}
        for f in files:
            n, header = safetensors_header(f)
            for key, info in header.items():
                if key != "__metadata__":
                    self.where[key] = (f, 8 + n, info)

    def keys(self) -> list[str]:
        return sorted(self.where)

    def _stored(self, key: str):
        import torch

        path, _, info = self.where[key]
        if info["dtype"] not in self._TORCH:
            raise ValueError(f"{path}: {key} is stored as {info['dtype']}; {self.setting} reads F32, BF16 and F16 "
                             f"tensors (set {self.setting}: false)")
        return getattr(torch, self._TORCH[info["dtype"]])

    def meta(self, key: str, dtype) -> torch.Tensor:
        """A data-less (meta-device) tensor of `key`'s shape, in `dtype`: slicing it gives the student's shape."""
        import torch

        return torch.empty(self.where[key][2]["shape"], dtype=self._stored(key), device="meta").to(dtype)

    def get(self, key: str, dtype) -> torch.Tensor:
        import torch

        path, base, info = self.where[key]
        stored = self._stored(key)
        start, end = info["data_offsets"]
        with open(path, "rb") as fh:
            fh.seek(base + start)
            data = bytearray(fh.read(end - start))
        t = torch.frombuffer(data, dtype=stored) if data else torch.empty(0, dtype=stored)
        return t.reshape(info["shape"]).to(dtype)
