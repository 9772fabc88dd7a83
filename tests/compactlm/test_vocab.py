"""Vocabularies: the trained BPE tokenizer and moving a model onto it (Fast Vocabulary Transfer)."""

from __future__ import annotations

import torch

from compactlm.models import load_model, load_tokenizer
from compactlm.vocab import transplant_vocab


def test_the_trained_tokenizer_round_trips_text_and_formats_chat(other_tokenizer_dir):
    tok = load_tokenizer(other_tokenizer_dir)
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé, 数字 42!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"


def test_transplanted_rows_are_the_mean_of_the_old_pieces(tiny_gqa_model_dir, other_tokenizer_dir, tmp_path):
    old, old_tok = load_model(tiny_gqa_model_dir), load_tokenizer(tiny_gqa_model_dir)
    out = transplant_vocab(tiny_gqa_model_dir, other_tokenizer_dir, tmp_path / "moved")
    new, new_tok = load_model(out), load_tokenizer(out)
    assert new.config.vocab_size == len(new_tok) and new.config.eos_token_id == new_tok.eos_token_id
    e_old, e_new = old.get_input_embeddings().weight, new.get_input_embeddings().weight
    h_old, h_new = old.get_output_embeddings().weight, new.get_output_embeddings().weight  # untied model
    old_vocab = old_tok.get_vocab()
    shared = [t for t in new_tok.get_vocab() if t in old_vocab][:50]
    assert len(shared) == 50
    for t in shared:  # a token in both vocabularies keeps its rows
        assert torch.equal(e_new[new_tok.convert_tokens_to_ids(t)], e_old[old_vocab[t]])
        assert torch.equal(h_new[new_tok.convert_tokens_to_ids(t)], h_old[old_vocab[t]])
    def old_pieces(token: str) -> list:  # the old BPE's split of the new token's byte-level symbols
        return [old_vocab.get(p.value) for p in old_tok.backend_tokenizer.model.tokenize(token)]

    # in id order (get_vocab's order changes between processes): the first new-only token the old BPE spells
    # with several of its own tokens
    only_new = next(t for t, _ in sorted(new_tok.get_vocab().items(), key=lambda kv: kv[1])
                    if t not in old_vocab and t not in new_tok.all_special_tokens
                    and len(old_pieces(t)) > 1 and None not in old_pieces(t))
    pieces = old_pieces(only_new)
    assert torch.allclose(e_new[new_tok.convert_tokens_to_ids(only_new)], e_old[pieces].mean(0))
    # the blocks are the old model's: same hidden states for the same old-vocabulary embeddings
    sd_old, sd_new = old.state_dict(), new.state_dict()
    blocks = [k for k in sd_old if ".layers." in k]
    assert blocks and all(torch.equal(sd_old[k], sd_new[k]) for k in blocks)
    assert new.generate(**new_tok("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False).shape[1] > 1
