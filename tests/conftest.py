"""Shared fixtures: tiny random decoders with the real SmolLM2 tokenizer, offline settings."""

import os

# No network here or in CI: fail fast instead of waiting on the hub, and keep Prefect from phoning home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from compactlm.models import make_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """make(arch="llama", **shape) -> path of a tiny random model dir, built once per distinct shape."""
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def make(arch: str = "llama", **kw) -> Path:
        key = arch + "-" + "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
        if key not in built:
            built[key] = make_tiny_model(root / key, arch=arch, **kw)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_factory) -> Path:
    """Llama, hidden 128, 2 heads x 64 (1 KV head), 4 layers, MLP 256, tied embeddings: vLLM-compatible."""
    return tiny_factory()


@pytest.fixture(scope="session")
def tiny_gqa_model_dir(tiny_factory) -> Path:
    """Llama with real GQA: hidden 256, 4 query heads in 2 KV groups, 4 layers, MLP 512, untied."""
    return tiny_factory(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=512, tie_word_embeddings=False)
