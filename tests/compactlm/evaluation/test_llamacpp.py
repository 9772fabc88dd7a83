"""GGUF files through llama.cpp score like the HF model they came from (same tasks, same perplexity windows), and the
deployment-speed child measures every format the same way."""

from __future__ import annotations

import pytest

from compactlm.config import EvalConfig, ExportConfig
from compactlm.evaluation.deploy import deploy_rows, deploy_table

CFG = EvalConfig(tasks=["compactlm_facts"], limit=24, batch_size=8, speed=False)


@pytest.fixture(scope="module")
def f16_file(tiny_model_dir, tmp_path_factory):
    from compactlm.export import write_exports

    dest = tmp_path_factory.mktemp("gguf")
    write_exports(tiny_model_dir, ExportConfig(gguf=["f16", "q4_k_m"]), dest, threads=1)
    return dest / "gguf" / "model-f16.gguf"


@pytest.mark.long(17)
@pytest.mark.integration
def test_an_f16_gguf_scores_the_same_as_its_hf_model(tiny_model_dir, f16_file):
    from compactlm.evaluation import evaluate_model
    from compactlm.evaluation.llamacpp import evaluate_gguf

    hf = evaluate_model(tiny_model_dir, CFG)
    gguf = evaluate_gguf(f16_file, CFG, threads=1)
    assert gguf["backend"] == "llama.cpp" and gguf["params"] == hf["params"]
    assert gguf["size_bytes"] == f16_file.stat().st_size < hf["size_bytes"]
    # same requests, same tokenization, same windows: accuracies equal, perplexities equal up to f16 weights
    assert gguf["tasks"]["compactlm_facts"]["acc"] == hf["tasks"]["compactlm_facts"]["acc"]
    assert gguf["tasks"]["compactlm_facts"]["acc_norm"] == hf["tasks"]["compactlm_facts"]["acc_norm"]
    for metric in ("word_perplexity", "byte_perplexity", "token_perplexity"):
        assert gguf["perplexity"][metric] == pytest.approx(hf["perplexity"][metric], rel=1e-3), metric


@pytest.mark.integration  # two child processes: ~15 s
def test_deploy_speed_is_measured_in_a_child_per_format(tiny_model_dir, f16_file):
    from compactlm.evaluation.deploy import measure

    q4 = f16_file.with_name("model-q4_k_m.gguf")
    ballast = bytearray(b"\x01") * (768 << 20)  # this process holds > 768 MiB when it forks the child
    for path, fmt in ((q4, "gguf"), (tiny_model_dir, "hf")):
        r = measure(path, fmt, prompt_tokens=64, decode_tokens=16, threads=1, repeats=1, batch=4)
        assert (r["format"], r["prompt_tokens"], r["decode_tokens"], r["threads"]) == (fmt, 64, 16, 1)
        assert r["engine"] == {"gguf": "llama.cpp", "hf": "transformers"}[fmt]
        assert r["decode_tok_s_b1"] == pytest.approx(16 / r["decode_s"]) and r["prompt_tok_s"] > 0
        assert r["batch_size"] == 4 and r["decode_tok_s_batch"] == pytest.approx(4 * 16 / r["decode_s_batch"])
        assert 30 < r["peak_rss_mib"] < 8192
        if fmt == "gguf":  # the child's own peak (ru_maxrss would carry this process's RSS at fork: > 768 MiB)
            assert r["peak_rss_mib"] < 512 and len(ballast) == 768 << 20
    with pytest.raises(RuntimeError, match="speed of .* failed"):
        measure(tiny_model_dir / "config.json", "gguf", prompt_tokens=8, decode_tokens=4, threads=1, repeats=1)


@pytest.mark.integration
def test_llamacpp_batch_decoding_gives_every_sequence_the_batch_1_tokens(f16_file):
    from compactlm.evaluation.deploy import gguf_batch_decode
    from compactlm.evaluation.llamacpp import GgufRunner, load_gguf

    runner = GgufRunner(load_gguf(f16_file, n_ctx=128, threads=1))
    ids = runner.llm.tokenize(b"The capital of France is Paris. The capital of Spain is", add_bos=False)
    one = runner.greedy(ids, 12)
    seconds, seqs = gguf_batch_decode(runner.llm, ids, 11, batch=3)
    assert seconds > 0 and len(seqs) == 3
    assert all(seq == one for seq in seqs), (one, seqs)  # 3 sequences in one context, each its own KV positions


def test_deploy_rows_relate_each_format_to_the_full_precision_row():
    def result(ppl, acc, tok_s=None):
        speed = None if tok_s is None else {"decode_tok_s_b1": tok_s, "prompt_tok_s": 10 * tok_s, "peak_rss_mib": 99.0}
        return {"size_bytes": 2_000_000, "speed": speed,
                "eval": {"perplexity": {"word_perplexity": ppl},
                         "tasks": {"a": {"acc": acc, "acc_norm": acc + 0.1}, "b": {"acc": acc}}}}

    rows = deploy_rows({"student": {"hf-fp32": result(20.0, 0.5, 10.0), "gguf-q4_k_m": result(21.0, 0.4)}})
    assert [(r["model"], r["format"]) for r in rows] == [("student", "hf-fp32"), ("student", "gguf-q4_k_m")]
    assert rows[0]["ppl_ratio"] == 1.0 and rows[1]["ppl_ratio"] == pytest.approx(1.05)
    assert rows[0]["avg_acc"] == pytest.approx((0.6 + 0.5) / 2)  # acc_norm where a task has it
    assert rows[0]["size_mb"] == 2.0 and rows[0]["prompt_tok_s"] == 100.0 and rows[1]["decode_tok_s_b1"] is None
    table = deploy_table(rows).splitlines()
    assert table[0].startswith("| model | format | size MB | decode tok/s (batch 1) ↑ | decode tok/s (batch n) ↑")
    assert "| student | gguf-q4_k_m | 2.0 | — | — | — | — | 21.00 | 0.450 | 1.050 |" == table[3]
