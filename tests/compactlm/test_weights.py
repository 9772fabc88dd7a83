"""A model loaded in the dtype it is stored in, run as if loaded in fp32 one module at a time (computing_in)."""

from __future__ import annotations

import pytest
import torch

from compactlm.arch import SUPPORTED_ARCHS
from compactlm.models import load_model
from compactlm.weights import computing_in
from tests.helpers import bf16_copy


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_a_bf16_model_computing_in_fp32_gives_the_fp32_copys_outputs_exactly(tiny_factory, tmp_path, arch):
    stored = bf16_copy(tiny_factory(arch), tmp_path / "bf16")
    fp32, as_stored = load_model(stored, dtype="float32"), load_model(stored, dtype="bfloat16")
    loaded = {n: p.data_ptr() for n, p in as_stored.named_parameters()}
    buffers = {n: b.dtype for n, b in as_stored.named_buffers()}
    ids = torch.randint(0, as_stored.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = fp32(input_ids=ids).logits
        with computing_in(as_stored):
            got = as_stored(input_ids=ids).logits
        plain = as_stored(input_ids=ids).logits  # outside the block: bf16 again
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert plain.dtype == torch.bfloat16
    # the loaded tensors themselves (the file's pages) are back, none converted or copied, and no hook is left
    assert all(p.data_ptr() == loaded[n] and p.dtype == torch.bfloat16 for n, p in as_stored.named_parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in as_stored.modules())
    assert {n: b.dtype for n, b in as_stored.named_buffers()} == buffers  # Gemma's bf16 embedding scale is back


def test_a_forward_that_raises_leaves_nothing_converted(tiny_model_dir, tmp_path):
    model = load_model(bf16_copy(tiny_model_dir, tmp_path / "bf16"), dtype="bfloat16")

    def boom(*_):
        raise RuntimeError("stop")

    model.model.layers[0].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="stop"), computing_in(model):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
