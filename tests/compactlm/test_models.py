"""Model references: aliases, local dirs, GGUF conversion, clear errors."""

import json

import pytest
import torch

from compactlm.models import (
    ModelRefError,
    check_model_ref,
    count_params,
    load_model,
    load_tokenizer,
    resolve_model,
    stored_dtype,
)


def test_stored_dtype_reads_either_config_form(tiny_model_dir):
    """One rule for the dtype a model is stored in, whether pruning reads a transformers config or distillation
    the config.json dict (older files say torch_dtype); what compactlm cannot store is float32."""
    from transformers import AutoConfig

    assert stored_dtype({"torch_dtype": "bfloat16"}) == stored_dtype({"dtype": "bfloat16"}) == "bfloat16"
    assert stored_dtype({}) == stored_dtype({"dtype": "int8"}) == "float32"
    assert stored_dtype(AutoConfig.for_model("llama", dtype="float16")) == "float16"
    assert stored_dtype(AutoConfig.from_pretrained(tiny_model_dir)) == "float32"


def test_check_model_ref(tmp_path, tiny_model_dir):
    check_model_ref("smollm2-135m-instruct")
    check_model_ref("HuggingFaceTB/SmolLM2-135M-Instruct")  # hub id: valid, resolved when online
    check_model_ref(str(tiny_model_dir))
    for bad, words in [("llama-7b", "unknown model"), ("/nope/model", "not found"), ("x.gguf", "not found"),
                       ("", "empty")]:
        with pytest.raises(ModelRefError, match=words):
            check_model_ref(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelRefError, match="config.json"):
        check_model_ref(str(tmp_path / "empty"))


def test_hub_id_offline_gives_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelRefError, match="Offline, give a local HF dir"):
        resolve_model("nobody-here/no-such-model")


def test_model_without_tokenizer_is_a_clear_error(tmp_path, tiny_model_dir):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelRefError, match="no tokenizer"):
        load_tokenizer(d)


def test_tiny_model_has_real_tokenizer_and_vllm_head_dim(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["head_dim"] == 64 and len(tok) == model.config.vocab_size == 49152
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok("Hello world", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 49152)
    assert count_params(model) == sum(p.numel() for p in model.parameters())  # tied weights counted once


@pytest.mark.long(17)
def test_smollm2_alias_converts_gguf_to_safetensors():
    d = resolve_model("smollm2-135m-instruct")
    assert (d / "model.safetensors").is_file() and not list(d.glob("*.gguf"))
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30
    assert resolve_model("smollm2-135m-instruct") == d  # cached
    tok = load_tokenizer(d)
    model = load_model(d)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert count_params(model) == 134_515_008
    assert model.dtype == torch.float32


def test_truncated_weights_give_a_clear_error(tmp_path, tiny_model_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(1_000_000)
    with pytest.raises(ModelRefError, match="truncated, corrupt or missing"):
        load_model(bad)


def test_weight_headers_are_checked_in_milliseconds(tmp_path, tiny_model_dir):
    """check_weights reads headers and sizes only: a truncated, a corrupt and a missing shard fail naming the file;
    resolve_model of a local dir runs it, so every stage gets a checked teacher."""
    import json
    import shutil
    import time

    from compactlm.models import check_weights, resolve_model

    assert check_weights(tiny_model_dir) > 0
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    weights = bad / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    t0 = time.perf_counter()
    with pytest.raises(ModelRefError, match=r"model.safetensors is truncated or corrupt: its header declares"):
        check_weights(bad)
    assert time.perf_counter() - t0 < 1
    with pytest.raises(ModelRefError, match="re-create or re-download"):
        resolve_model(str(bad))
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelRefError, match="truncated or corrupt"):
        check_weights(bad)
    weights.unlink()
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(ModelRefError, match=r"lacks weight shards \['model-00001.safetensors'\]"):
        check_weights(bad)
