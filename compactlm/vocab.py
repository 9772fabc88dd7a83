"""Vocabularies: a fresh byte-level BPE tokenizer for a student of another vocabulary (trained on text with the
`tokenizers` library, saved as an HF tokenizer directory with BOS/EOS/PAD and a chat template)."""

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
