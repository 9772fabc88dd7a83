"""The recipe's export section: a quantization type llama.cpp does not know, an unknown vLLM scheme and a missing
llama.cpp fail at once naming the field and the fix; an architecture llama.cpp's converter cannot take fails at
preflight, before generation starts."""

from __future__ import annotations

import pytest

from compactlm.preflight import preflight
from compactlm.recipe import RecipeError, load_recipe
from tests.helpers import REPO

TINY = REPO / "configs" / "tiny-test.yaml"


def test_export_is_off_by_default_and_types_are_normalised():
    assert not load_recipe(TINY).export.enabled
    recipe = load_recipe(TINY, ["export.gguf=[F16, Q4_K_M]", "export.vllm=[W8A8]"])
    assert recipe.export.gguf == ["f16", "q4_k_m"] and recipe.export.vllm == ["w8a8"] and recipe.export.enabled
    assert load_recipe(REPO / "configs" / "smollm2-demo.yaml").export.gguf == ["f16", "q8_0", "q4_k_m"]


@pytest.mark.parametrize(("override", "message"), [
    ("export.gguf=[f16, q4_k_x]", "export.gguf: 'q4_k_x' is not a GGUF type llama.cpp's quantizer knows; did you "
                                  "mean 'q4_k_s'? known: f32, f16, bf16, q8_0"),
    ("export.gguf=[iq2_xxs]", "export.gguf: 'iq2_xxs' is not a GGUF type llama.cpp's quantizer knows"),
    ("export.gguf=[q8_0, Q8_0]", "export.gguf: ['q8_0', 'q8_0'] lists a type twice"),
    ("export.vllm=[w4a61]", "export.vllm: 'w4a61' is not a vLLM export scheme; did you mean 'w4a16'? known: w8a8"),
    ("export.group_size=4", "export.group_size: Input should be greater than or equal to 8"),
])
def test_bad_export_settings_fail_naming_the_field(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, [override])
    assert message in str(err.value)


def test_preflight_stops_an_unconvertible_teacher_and_a_missing_llama_cpp(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from compactlm.models import smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, ffn_dim=128,
                             num_attention_heads=1, word_embed_proj_dim=64)).save_pretrained(tmp_path / "opt")
    tok.save_pretrained(tmp_path / "opt")
    recipe = load_recipe(TINY, ["export.gguf=[q4_k_m]"])
    with pytest.raises(RecipeError, match=r"export\.gguf: OPTForCausalLM .*cannot be converted to GGUF"):
        preflight(recipe, tmp_path / "opt")

    monkeypatch.setenv("COMPACTLM_LLAMA_CPP_CONVERTER", str(tmp_path / "nowhere"))
    with pytest.raises(RecipeError, match=r"export\.gguf: llama\.cpp's converter is not installed .*make install"):
        preflight(recipe)
