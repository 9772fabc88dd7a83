"""GGUF export through llama.cpp's own converter and quantizer: the files load back in transformers (gguf_file=) and
in llama.cpp, the f16 file decodes the HF model's greedy tokens, tokenizer and chat template travel inside, and
what cannot be exported fails before anything is written, naming the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compactlm.config import ExportConfig
from compactlm.export import ExportError, ToolchainError, check_export, write_exports
from tests.helpers import peaked_tiny_model

PROMPT = "The capital of France is"
STEPS = 24


@pytest.fixture(scope="module")
def peaked(tmp_path_factory) -> Path:
    return peaked_tiny_model(tmp_path_factory.mktemp("peaked") / "model")


@pytest.fixture(scope="module")
def exported(peaked, tmp_path_factory) -> tuple[Path, list[dict]]:
    dest = tmp_path_factory.mktemp("gguf")
    return dest, write_exports(peaked, ExportConfig(gguf=["f16", "q8_0", "q4_k_m"]), dest, threads=1)


def _hf_greedy(model_dir: Path):
    """HF greedy tokens after PROMPT and the top-1 / top-2 logit gap at each step."""
    import torch

    from compactlm.models import load_model, load_tokenizer

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        seq = model.generate(torch.tensor([prompt]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        top2 = model(seq).logits[0, len(prompt) - 1:-1].topk(2, -1).values
    return prompt, seq[0, len(prompt):].tolist(), (top2[:, 0] - top2[:, 1]).min().item()


@pytest.mark.integration  # two conversions and two quantizations of the tiny model: ~25 s
@pytest.mark.long(29)
def test_gguf_files_load_in_llama_cpp_and_transformers_and_f16_decodes_the_hf_tokens(peaked, exported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compactlm.evaluation.llamacpp import GgufRunner, load_gguf
    from compactlm.models import load_tokenizer

    dest, records = exported
    assert [r["name"] for r in records] == ["gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]
    assert sorted(p.name for p in (dest / "gguf").iterdir()) == ["model-f16.gguf", "model-q4_k_m.gguf",
                                                                 "model-q8_0.gguf"]
    assert json.loads((dest / "exports.json").read_text())["exports"] == records
    by = {r["type"]: r for r in records}
    assert by["f16"]["tensor_types"].keys() == {"F16", "F32"}  # norms stay f32
    assert "Q8_0" in by["q8_0"]["tensor_types"] and "F16" not in by["q8_0"]["tensor_types"]
    # k-quants need rows of 256: the tiny model's 128-wide tensors fall back (recorded), the 256-wide use Q4_K/Q6_K
    assert {"Q4_K", "Q6_K"} & by["q4_k_m"]["tensor_types"].keys() and "Q5_0" in by["q4_k_m"]["tensor_types"]
    assert by["f16"]["size_bytes"] > by["q8_0"]["size_bytes"] > by["q4_k_m"]["size_bytes"]
    tok = load_tokenizer(peaked)
    assert all(r["vocab_size"] == len(tok) and r["chat_template"] and r["architecture"] == "llama" for r in records)

    prompt, hf_tokens, min_gap = _hf_greedy(peaked)
    assert len(set(hf_tokens)) > STEPS // 2 and min_gap > 0.05, "the fixture model must decode decisively"
    f16 = GgufRunner(load_gguf(dest / "gguf" / "model-f16.gguf", n_ctx=128, threads=1))
    assert f16.llm.tokenize(PROMPT.encode(), add_bos=False, special=True) == prompt  # the embedded tokenizer
    assert f16.greedy(prompt, STEPS) == hf_tokens
    q4 = GgufRunner(load_gguf(dest / "gguf" / "model-q4_k_m.gguf", n_ctx=128, threads=1))
    assert len(q4.greedy(prompt, STEPS)) == STEPS  # loads and decodes (its tokens may differ: 4-5 bit weights)

    gguf_tok = AutoTokenizer.from_pretrained(dest / "gguf", gguf_file="model-f16.gguf")
    assert gguf_tok(PROMPT, add_special_tokens=False)["input_ids"] == prompt
    assert gguf_tok.chat_template == tok.chat_template
    back = AutoModelForCausalLM.from_pretrained(dest / "gguf", gguf_file="model-f16.gguf", dtype=torch.float32)
    with torch.no_grad():
        seq = back.generate(torch.tensor([prompt]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    assert seq[0, len(prompt):].tolist() == hf_tokens


@pytest.mark.integration  # builds and checks a tiny OPT model: ~10 s
def test_an_architecture_llama_cpp_cannot_convert_fails_before_writing(tmp_path):
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from compactlm.models import smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    model = OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, ffn_dim=128,
                                     num_attention_heads=1, word_embed_proj_dim=64))
    model.to(torch.float32).save_pretrained(tmp_path / "opt")
    tok.save_pretrained(tmp_path / "opt")
    with pytest.raises(ExportError, match=r"export\.gguf: OPTForCausalLM .*cannot be converted to GGUF.*export\.vllm"):
        write_exports(tmp_path / "opt", ExportConfig(gguf=["q4_k_m"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.integration  # one converter run that fails on the tokenizer: ~10 s
def test_a_tokenizer_llama_cpp_cannot_embed_is_a_clear_error_and_leaves_no_file(other_student_dir, tmp_path):
    with pytest.raises(ExportError, match=r"export\.gguf: the tokenizer of .* cannot be embedded"):
        write_exports(other_student_dir, ExportConfig(gguf=["f16"]), tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.gguf"))


def test_a_model_without_tokenizer_fails_before_converting(tiny_model_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy2(tiny_model_dir / f, bare / f)
    with pytest.raises(ExportError, match=r"export\.gguf: .* has no tokenizer to embed .*save_pretrained"):
        check_export(bare, ExportConfig(gguf=["f16"]))


def test_a_missing_converter_says_how_to_install_it(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTLM_LLAMA_CPP_CONVERTER", str(tmp_path / "nowhere"))
    with pytest.raises(ToolchainError, match=r"converter is not installed .*make install"):
        check_export(tiny_model_dir, ExportConfig(gguf=["f16"]))
    check_export(tiny_model_dir, ExportConfig(vllm=["w8a8"]))  # no GGUF asked: llama.cpp is not needed
