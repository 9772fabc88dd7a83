"""A model's weights without a whole copy of them: a model directory's safetensors read tensor by tensor, without
loading the model (streaming pruning and scoring of teachers larger than memory), and a model loaded in the dtype it
is stored in run as if loaded in fp32, one module's converted weights at a time (:func:`computing_in`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def computing_in(model: torch.nn.Module, dtype: str = "float32") -> Iterator[torch.nn.Module]:
    """Within the block, `model`'s forward computes in `dtype` though its weights stay as loaded: each module with
    weights of another dtype gets them converted just before its own forward and its loaded tensors back just after.
    A model loaded in the dtype it is stored in (a bf16 checkpoint: the file's pages, shared by every process that
    maps it) then gives exactly the outputs of a copy loaded in fp32 (the conversion is exact either way), holding
    one module's converted weights at a time; the buffers a model computes when it is built (Gemma's embedding
    scale, made in bf16 by a bf16 load) are those of a `dtype` build meanwhile. Reading a weight directly (not
    through a forward) sees it as loaded. Nothing is done when every weight already is in `dtype`."""
    import torch

    target = getattr(torch, dtype)
    owners = [m for m in model.modules() if any(p.dtype != target for p in m.parameters(recurse=False))]
    loaded: dict[torch.nn.Module, list[torch.Tensor]] = {}

    def convert(module, *_):
        params = list(module.parameters(recurse=False))
        loaded[module] = [p.data for p in params]
        for p in params:
            p.data = p.data.to(target)

    def restore(module, *_):
        for p, data in zip(module.parameters(recurse=False), loaded.pop(module, []), strict=False):
            p.data = data

    handles = [h for m in owners for h in (m.register_forward_pre_hook(convert),
                                           m.register_forward_hook(restore, always_call=True))]
    buffers = _swap_buffers(model, _built_buffers(model, target)) if owners else {}
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for module in list(loaded):  # a forward stopped inside a module (an exception) leaves nothing converted
            restore(module)
        _swap_buffers(model, buffers)


def _built_buffers(model: torch.nn.Module, target: torch.dtype) -> dict[str, torch.Tensor]:
    """The floating-point buffers of `model` in another dtype than `target`, as a `target` build of its class
    computes them (its parameters on the meta device: no weights allocated)."""
    import torch
    from accelerate import init_empty_weights

    from compactlm.models import MODEL_BUILD_LOCK

    names = [n for n, b in model.named_buffers() if b.is_floating_point() and b.dtype != target]
    if not names:
        return {}
    with MODEL_BUILD_LOCK:  # transformers sets the default dtype while it loads: build under the same lock
        default = torch.get_default_dtype()
        torch.set_default_dtype(target)
        try:
            with init_empty_weights(include_buffers=False):
                built = dict(type(model)(model.config).named_buffers())
        finally:
            torch.set_default_dtype(default)
    return {n: built[n].to(model.get_buffer(n).device) for n in names if n in built}


def _swap_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put `buffers` (name -> tensor) in `model`; returns the ones they replaced."""
    old = {}
    for name, tensor in buffers.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        old[name] = getattr(module, attr)
        setattr(module, attr, tensor)  # an existing buffer's name: nn.Module stores it as that buffer
    return old
