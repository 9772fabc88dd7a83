"""Vocabularies: a fresh byte-level BPE tokenizer (trained on text with the `tokenizers` library, saved as an HF
tokenizer directory with BOS/EOS/PAD and a chat template), and moving a model onto another vocabulary."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

#: A ChatML template, so a student with this tokenizer formats instructions like SmolLM2 / Qwen do.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 4096) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and save it (tokenizer.json + config) in `out_dir`.

    ``<|endoftext|>`` is BOS, EOS and PAD; ``<|im_start|>`` / ``<|im_end|>`` and a ChatML chat template let it
    format chat prompts. Deterministic for the same texts and size. Returns `out_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[0],
                                   pad_token=SPECIAL[0], additional_special_tokens=list(SPECIAL[1:]))
    fast.chat_template = CHATML
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def _old_pieces(token: str, new_tok, old_tok, old_vocab: dict[str, int]) -> list[int]:
    """The old vocabulary's ids that spell the new token `token`."""
    if token in old_vocab:
        return [old_vocab[token]]
    if token in new_tok.all_special_tokens:
        return []
    try:  # both byte-level BPE: split the token's byte-level symbols with the old BPE model, no UTF-8 decoding
        ids = [old_vocab.get(t.value) for t in old_tok.backend_tokenizer.model.tokenize(token)]
        if ids and None not in ids:
            return ids
    except Exception:  # noqa: BLE001 - not a BPE model or not the same alphabet: fall back to the text
        pass
    return old_tok.encode(new_tok.convert_tokens_to_string([token]), add_special_tokens=False)


def transplant_vocab(model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                     out_dir: str | os.PathLike) -> Path:
    """Save the model in `model_dir` with the tokenizer in `tokenizer_dir`: Fast Vocabulary Transfer.

    Each new token's input embedding (and output row, when untied) is the mean of the old rows of the old
    tokens that spell it (Gee et al., 2022, "Fast Vocabulary Transfer for Language Model Compression"); a token
    in both vocabularies keeps its row exactly; a special token the old vocabulary lacks gets the mean of all
    rows. The transformer blocks are unchanged, so the result is a student of the new vocabulary that starts
    from what the old model knew. Written atomically; returns `out_dir`.
    """
    import torch
    from transformers import AutoTokenizer

    from compactlm.models import _atomic_save, load_model, load_tokenizer

    model, old_tok = load_model(model_dir), load_tokenizer(model_dir)
    new_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    old_vocab, new_vocab = old_tok.get_vocab(), new_tok.get_vocab()
    spell = [_old_pieces(t, new_tok, old_tok, old_vocab) for t, _ in sorted(new_vocab.items(), key=lambda kv: kv[1])]

    def remap(old: torch.Tensor) -> torch.Tensor:
        mean = old.mean(0)
        return torch.stack([old[ids].mean(0) if ids else mean for ids in spell])

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    with torch.no_grad():
        emb = remap(model.get_input_embeddings().weight)
        head = None if tied else remap(model.get_output_embeddings().weight)
        model.resize_token_embeddings(len(spell))
        model.get_input_embeddings().weight.copy_(emb)
        if head is not None:
            model.get_output_embeddings().weight.copy_(head)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(new_tok, name))
        if model.generation_config is not None:
            setattr(model.generation_config, name, getattr(new_tok, name))

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        new_tok.save_pretrained(tmp)

    return _atomic_save(Path(out_dir), write)
