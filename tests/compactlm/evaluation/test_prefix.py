"""Shared-prefix scoring: the same log-likelihoods and greedy flags as lm-eval's HFLM for every model family, with
fewer tokens through the model; the grouping and batching on their own; whole evaluations with identical scores."""

from __future__ import annotations

import itertools

import pytest

from compactlm.config import EvalConfig
from compactlm.evaluation.prefix import model_input, plan_groups, split_sorted
from tests.helpers import SHARED_DATA

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"]

#: (context, choices) per question: every case where lm-eval's tokenization or truncation could trip a prefix cache.
QUESTIONS = [
    ("Question: What is the capital of France?\nAnswer:", [" Paris", " London", " Berlin is a city", " Rome"]),
    ("The cat sat on the ", ["mat.", "dog, which was sleeping", "m"]),  # trailing space joins the continuation
    ("Question: Pick one\nAnswer:", [" A", " B", " C"]),  # one-token choices: nothing runs after the prefix
    ("", [" hello world", " goodbye"]),  # empty context: lm-eval conditions on the prefix token
    ("A question with a single choice:", [" only"]),  # nothing to share
    ("The same start, then", [" the same start, then more", " the same start, but not"]),  # choices share tokens
    ("word " * 90 + "end:", [" one", " two three four"]),  # longer than max_length: left-truncated like lm-eval
]
PARTIAL = ("Sarah was a much better surgeon than Maria so {} always got the harder cases.", ["Sarah", "Maria"])


def _requests():
    """lm-eval Instances: the questions above and one WinoGrande-style partial-scoring question (the contexts
    differ, the continuation is shared)."""
    from lm_eval.api.instance import Instance

    def inst(ctx, cont, doc, idx):
        return Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=idx,
                        metadata=("task", doc, 1))

    reqs = [inst(ctx, c, d, i) for d, (ctx, choices) in enumerate(QUESTIONS) for i, c in enumerate(choices)]
    sentence, options = PARTIAL
    head, tail = sentence.split("{}")
    reqs += [inst(head + o, tail.rstrip("."), len(QUESTIONS), i) for i, o in enumerate(options)]
    return reqs


def _count_tokens(model) -> list[int]:
    """Tokens fed to the model so far (a forward pre-hook on its input embeddings)."""
    seen = [0]

    def count(_module, args) -> None:
        seen[0] += args[0].numel()

    model.get_input_embeddings().register_forward_pre_hook(count)
    return seen


def _assert_same_as_hflm(model, tokenizer, *, batch_size: int, max_length: int) -> None:
    from lm_eval.models.huggingface import HFLM

    from compactlm.evaluation.prefix import SharedPrefixHFLM

    reqs = _requests()
    tokens = _count_tokens(model)
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    want = plain.loglikelihood(reqs, disable_tqdm=True)
    plain_tokens, tokens[0] = tokens[0], 0
    shared = SharedPrefixHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    got = shared.loglikelihood(reqs, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want]  # the same greedy flags
    for (ll_got, _), (ll_want, _), req in zip(got, want, reqs, strict=True):
        assert ll_got == pytest.approx(ll_want, abs=1e-4, rel=1e-5), req.args
    assert tokens[0] < 0.9 * plain_tokens  # the shared prefixes really ran once (padding included)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_loglikelihoods_as_hflm_every_family(arch, tiny_factory):
    from compactlm.models import load_model, load_tokenizer

    model_dir = tiny_factory(arch=arch)
    # batch 3: several prefix batches and suffix batches; max_length 64 truncates the long question
    _assert_same_as_hflm(load_model(model_dir), load_tokenizer(model_dir), batch_size=3, max_length=64)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_same_loglikelihoods_with_eager_attention(arch, tiny_factory):
    """Eager attention adds the packed rows' mask to its scores (SDPA takes it as booleans)."""
    from compactlm.models import load_model, load_tokenizer

    model_dir = tiny_factory(arch=arch)
    model = load_model(model_dir)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    _assert_same_as_hflm(model, load_tokenizer(model_dir), batch_size=3, max_length=64)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3_text"])
def test_same_loglikelihoods_with_a_sliding_window_shorter_than_the_prompts(arch, tiny_model_dir):
    """An 8-token sliding window (every layer for Mistral, every other one for Gemma): the cache keeps only the
    window, and the left-padded prefixes must see the same window as the unpadded sequences."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from compactlm.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    kind = {"mistral": "MistralConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig"}[arch]
    extra = {} if arch == "mistral" else {"query_pre_attn_scalar": 64,
                                          "layer_types": ["sliding_attention", "full_attention"] * 2}
    cfg = getattr(transformers, kind)(vocab_size=len(tok), hidden_size=128, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=64, num_hidden_layers=4, intermediate_size=256,
                                      sliding_window=8, pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert model.config.sliding_window == 8
    _assert_same_as_hflm(model, tok, batch_size=4, max_length=64)


def test_plan_groups_shares_the_context_or_the_common_start():
    # (context, continuation) token lists as TemplateLM hands them over; keys = the question of each request
    reqs = [(("", ""), [1, 2, 3], [4, 5]), (("", ""), [1, 2, 3], [6]), (("", ""), [1, 2, 3], [7, 8, 9]),  # q0
            (("", ""), [1, 2, 10], [11, 12]), (("", ""), [1, 2, 13, 14], [11, 12]),  # q1: partial scoring
            (("", ""), [20, 21], [22])]  # q2: alone
    keys = ["q0", "q0", "q0", "q1", "q1", "q2"]
    groups, alone = plan_groups(reqs, keys, max_length=100)
    assert alone == [5]
    q0, q1 = sorted(groups, key=lambda g: g.members[0])
    assert q0.prefix == [1, 2, 3] and q0.members == [0, 1, 2]
    assert q0.suffixes == [[4], [], [7, 8]] and q0.starts == [0, 0, 0]  # scored from the prefix's last position
    assert q1.prefix == [1, 2] and q1.suffixes == [[10, 11], [13, 14, 11]] and q1.starts == [1, 2]
    for g in (q0, q1):  # [last prefix logit] + suffix logits, from `start`, cover exactly the continuation
        for i, s, start in zip(g.members, g.suffixes, g.starts, strict=True):
            assert g.prefix + s == model_input(reqs[i][1], reqs[i][2], 100)
            assert len(s) + 1 - start == len(reqs[i][2])
    # Truncation: the inputs lose their first tokens; the shared prefix is what remains in common.
    groups, _ = plan_groups(reqs[:3], keys[:3], max_length=3)
    assert [model_input(r[1], r[2], 3) for r in reqs[:3]] == [[2, 3, 4], [1, 2, 3], [3, 7, 8]]
    assert groups == []  # nothing in common any more: every request is scored alone


def test_split_sorted_minimises_padding_plus_forward_cost():
    def cost(lengths, spans, c):
        return sum(lengths[a] * (b - a) + c for a, b in spans)

    def brute(lengths, max_rows, c):  # every way to cut the sorted list
        n, best = len(lengths), float("inf")
        for cuts in itertools.product([0, 1], repeat=n - 1):
            bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [n]
            spans = list(itertools.pairwise(bounds))
            if all(b - a <= max_rows for a, b in spans):
                best = min(best, cost(lengths, spans, c))
        return best

    for lengths, max_rows, c in [([9, 9, 8, 3, 3, 2, 1], 3, 2), ([50, 10, 10, 10, 9, 1], 4, 0),
                                 ([5] * 7, 2, 1), ([40, 39, 20, 5, 4, 4, 4, 1], 8, 16)]:
        spans = split_sorted(lengths, max_rows, c)
        assert spans[0][0] == 0 and spans[-1][1] == len(lengths)
        assert all(a < b and b - a <= max_rows for a, b in spans)
        assert all(x[1] == y[0] for x, y in itertools.pairwise(spans))
        assert cost(lengths, spans, c) == brute(lengths, max_rows, c)
    assert split_sorted([], 4, 1) == []


@pytest.fixture(scope="module")
def both_paths(tiny_model_dir):
    from compactlm.evaluation import evaluate_model

    cfg = EvalConfig(limit=30, batch_size=8, speed=False)
    return [evaluate_model(tiny_model_dir, cfg.model_copy(update={"shared_prefix": s}), seed=0) for s in (False, True)]


def test_evaluate_model_same_scores_either_way(both_paths):
    plain, shared = both_paths
    assert shared["tasks"] == plain["tasks"]  # acc, acc_norm: identical
    assert shared["lm_eval"]["n-samples"] == plain["lm_eval"]["n-samples"]
    assert shared["perplexity"] == plain["perplexity"]  # perplexity windows share nothing: lm-eval's own path


@pytest.mark.integration  # four benchmark copies, both paths: ~20 s
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="benchmark copies (shared/data) not present")
def test_standard_tasks_same_scores_either_way(tiny_model_dir):
    from compactlm.evaluation import evaluate_model

    cfg = EvalConfig(tasks=["compactlm_arc_easy", "compactlm_piqa", "compactlm_hellaswag", "compactlm_winogrande"],
                     limit=12, batch_size=8, perplexity=False, speed=False, data_dir=str(SHARED_DATA))
    plain, shared = (evaluate_model(tiny_model_dir, cfg.model_copy(update={"shared_prefix": s}), seed=0)
                     for s in (False, True))
    assert shared["tasks"] == plain["tasks"]
    assert set(shared["tasks"]) == set(cfg.tasks)
