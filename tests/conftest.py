"""Shared fixtures: tiny random decoders with the real SmolLM2 tokenizer, the small teacher / student / datasets
the stage tests share, Prefect's temporary server, offline settings."""

import os

# No network here or in CI: fail fast instead of waiting on the hub, and keep Prefect from phoning home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share two cores: one OpenMP thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from compactlm.models import make_tiny_model  # noqa: E402
from tests.helpers import (  # noqa: E402
    FANOUT_TEXT,
    FAST,
    GEN,
    SCORE,
    texts,
    tiny_model_with_tokenizer,
    torch_threads,
    write_generated,
)


def pytest_collection_modifyitems(config, items):
    """Files in decreasing order of their expected seconds (the sum of their tests' `long` marks, 1 s for an unmarked
    test), the rest keeping their order. `make test` passes --no-loadscope-reorder, so its two workers (pytest-xdist,
    one file per worker at a time) take the files in this order, longest first: the minutes-long files start at
    once, the many short ones fill in around them, and the workers finish together."""
    seconds: dict[str, float] = {}
    for item in items:
        mark = item.get_closest_marker("long")
        path = str(item.path)
        seconds[path] = seconds.get(path, 0.0) + (float(mark.args[0]) if mark and mark.args else 1.0)
    first_seen = {f: i for i, f in reversed(list(enumerate(str(item.path) for item in items)))}
    items.sort(key=lambda item: (-seconds[str(item.path)], first_seen[str(item.path)]))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole module (request it from a module-scoped autouse fixture): the 2 cores are
    shared, and oversubscribed OpenMP barriers make tiny matmuls ~100x slower."""
    with torch_threads(1):
        yield


@pytest.fixture
def single_thread():
    """One torch thread for one test: fault tests compare in-process results with subprocesses that run one
    thread (tests.helpers.SUB_ENV) and with the one-thread reference fixtures (gen_dir, scores_dir)."""
    with torch_threads(1):
        yield


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


@pytest.fixture(scope="session")
def student_dir(tiny_factory) -> Path:
    """The tiny Llama with 2 layers: a student of tiny_model_dir / teacher_dir's tokenizer."""
    return tiny_factory(num_hidden_layers=2)


@pytest.fixture(scope="session")
def teacher_dir(tiny_gqa_model_dir, tmp_path_factory) -> Path:
    """The GQA tiny model with a 5x sharper output head, so the teacher has opinions worth distilling."""
    import torch

    from compactlm.models import load_model, load_tokenizer

    out = tmp_path_factory.mktemp("sharp-teacher")
    model = load_model(tiny_gqa_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    model.save_pretrained(out)
    load_tokenizer(tiny_gqa_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, student_dir) -> Path:
    """40 chat-formatted sentences as a generated dataset (distillation training data)."""
    from compactlm.models import load_tokenizer

    return write_generated(tmp_path_factory.mktemp("gen") / "ds", load_tokenizer(student_dir), texts(40))


@pytest.fixture(scope="session")
def other_tokenizer_dir(tmp_path_factory) -> Path:
    """A second, real tokenizer: byte-level BPE (1,024 tokens, ChatML template) trained on English text."""
    from compactlm.evaluation.registry import BUILTIN_HELDOUT
    from compactlm.vocab import train_bpe_tokenizer

    corpus = [p + " " + c for p, c in texts(200)] + BUILTIN_HELDOUT.read_text().split("\n\n")
    return train_bpe_tokenizer(corpus * 2, tmp_path_factory.mktemp("bpe") / "tok", vocab_size=1024)


@pytest.fixture(scope="session")
def other_student_dir(other_tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny random Qwen2 with that tokenizer: another family and another vocabulary than the teachers."""
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("other-student") / "qwen2", other_tokenizer_dir)


@pytest.fixture(scope="session")
def gen_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A small generated dataset (HF engine, one thread): calibration data for scoring, training data for
    distillation, the reference of the generation fault tests."""
    from compactlm.generation import generate_dataset

    out = tmp_path_factory.mktemp("faults-gen") / "gen"
    with torch_threads(1):
        generate_dataset(tiny_model_dir, GEN, out, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def scores_dir(tiny_model_dir, gen_dir, tmp_path_factory) -> Path:
    """Importance scores of tiny_model_dir on gen_dir (one thread)."""
    from compactlm.importance import score_model

    out = tmp_path_factory.mktemp("faults-score") / "scores"
    with torch_threads(1):
        score_model(tiny_model_dir, gen_dir, SCORE, out, seed=0)
    return out


@pytest.fixture(scope="session")
def sampled(tiny_model_dir, tmp_path_factory):
    """One sampled dataset with top-k log-probs (one thread): 5 prompts x 2 samples in shards of 2 prompts.
    Returns (config, directory, manifest)."""
    from compactlm.config import GenerateConfig
    from compactlm.generation import generate_dataset

    cfg = GenerateConfig(**FAST, max_prompts=5, n=2, shard_size=2, topk_logprobs=4)
    out = tmp_path_factory.mktemp("gen") / "sampled"
    with torch_threads(1):
        manifest = generate_dataset(tiny_model_dir, cfg, out, seed=7, progress=False)
    return cfg, out, manifest


@pytest.fixture(scope="session")
def fanout_calib(tmp_path_factory) -> Path:
    """A calibration text file for the budget fan-out tests."""
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(FANOUT_TEXT)
    return p


@pytest.fixture(scope="session")
def fanout_scores(tiny_gqa_model_dir, fanout_calib, tmp_path_factory) -> Path:
    """Importance scores of the GQA tiny model on fanout_calib."""
    from compactlm.config import ScoreConfig
    from compactlm.importance import score_model

    out = tmp_path_factory.mktemp("stage-scores") / "scores"
    score_model(tiny_gqa_model_dir, fanout_calib, ScoreConfig(num_samples=2, seq_len=16, batch_size=2), out)
    return out


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's temporary local server (what `compactlm run` uses without PREFECT_API_URL), one per test process;
    yields its API URL, for subprocesses (PREFECT_API_URL) that need not start their own."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # a loaded 2-core box starts it slowly
        yield PREFECT_API_URL.value()
