"""Seed prompts: loading them from a file (or the built-in set) and formatting them for the teacher.

Formatting happens once, here, with the teacher's own tokenizer: the exact text (chat template included) and
the exact token ids are stored in the dataset and handed to the engine as token ids, so what is stored is
what the model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.records import read_file_records, read_hf_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from compactlm.config import GenerateConfig

BUILTIN_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "seed_prompts.jsonl"


@dataclass(frozen=True)
class FormattedPrompt:
    """One seed prompt ready for the engine. `prompt_id` is its position in the (truncated) prompt list."""

    prompt_id: int
    prompt: str
    prompt_text: str
    prompt_token_ids: tuple[int, ...]


def _rows(path: Path) -> list[dict]:
    return read_file_records(path, "generate.prompts")


def _hf_rows(source: str, split: str, subset: str | None, max_prompts: int | None) -> list[dict]:
    return read_hf_records(source, split, subset, max_prompts, field="generate.prompts",
                           split_field="generate.hf_split",
                           alternatives="a directory written by datasets' save_to_disk, or 'builtin'")


def render_template(template: str, row: dict, where: str) -> str:
    """`template` filled from `row` (None -> ""), stripped. A missing field is a ValueError naming the fields."""
    from compactlm.templates import template_fields

    missing = [f for f in template_fields(template) if f not in row]
    if missing:
        raise ValueError(f"{where} has no field {missing[0]!r} used by generate.template; its fields are "
                         f"{sorted(map(str, row))}")
    return template.format_map({k: "" if v is None else v for k, v in row.items()}).strip()


def load_prompts(source: str, prompt_field: str = "prompt", max_prompts: int | None = None, *,
                 template: str | None = None, split: str = "train", subset: str | None = None) -> list[str]:
    """The raw prompt strings, in source order, truncated to `max_prompts`.

    `source` is 'builtin', a local .jsonl/.json/.csv/.parquet file, a ``save_to_disk`` directory or
    'hf:<dataset id>' (`split`, `subset`). Each prompt is the row's `prompt_field`, or `template` rendered over
    the row's fields when given. Raises ValueError when a row lacks the field, a prompt is empty, no prompt is
    left, or a dataset cannot be loaded (offline: the message names the local alternatives).
    """
    if source.startswith("hf:") or (source != "builtin" and Path(source).expanduser().is_dir()):
        where_src = source
        rows = _hf_rows(source if source.startswith("hf:") else str(Path(source).expanduser()), split, subset,
                        max_prompts)
    else:
        path = BUILTIN_PROMPTS if source == "builtin" else Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"generate.prompts file not found: {str(path)!r} (give an existing file, "
                             "'hf:<dataset id>' or 'builtin')")
        where_src = f"prompts file {path}"
        rows = _rows(path)
    field = "prompt" if source == "builtin" else prompt_field
    if max_prompts is not None:
        rows = rows[:max_prompts]
    prompts = []
    for n, row in enumerate(rows):
        if template is not None:
            text = render_template(template, row, f"{where_src} row {n}")
        else:
            if field not in row or row[field] is None:
                raise ValueError(
                    f"{where_src} row {n} has no field {field!r}; set generate.prompt_field to one of "
                    f"{sorted(map(str, row))} (or build prompts with generate.template)"
                )
            text = str(row[field])
        if not text.strip():
            raise ValueError(f"{where_src} row {n}: the prompt is empty; remove the row")
        prompts.append(text)
    if not prompts:
        raise ValueError(f"prompt set is empty: {where_src} has no rows (add prompts or point generate.prompts "
                         "elsewhere)")
    return prompts


def use_chat_template(tokenizer: PreTrainedTokenizerBase, chat: str) -> bool:
    """Resolve `chat` (auto/on/off) against the tokenizer; 'on' without a template is a ValueError."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "on" and not has_template:
        raise ValueError(
            "generate.chat is 'on' but the teacher's tokenizer has no chat template; "
            "set generate.chat to 'off' (raw prompts) or 'auto'"
        )
    return chat == "on" or (chat == "auto" and has_template)


def format_prompts(prompts: list[str], tokenizer: PreTrainedTokenizerBase, *, chat: bool,
                   system_prompt: str | None = None, first_id: int = 0) -> list[FormattedPrompt]:
    """Apply the chat template (or not) and tokenize. Chat text already holds its special tokens.

    Prompt ids run from `first_id` in list order."""
    if system_prompt is not None and not chat:
        raise ValueError("generate.system_prompt needs chat mode; set generate.chat to 'on'/'auto' with a "
                         "chat-tuned teacher, or drop system_prompt")
    out = []
    for i, prompt in enumerate(prompts):
        if chat:
            messages = [{"role": "user", "content": prompt}]
            if system_prompt is not None:
                messages.insert(0, {"role": "system", "content": system_prompt})
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text = prompt
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {i} tokenizes to no tokens; remove it from the prompts file")
        out.append(FormattedPrompt(first_id + i, prompt, text, tuple(int(t) for t in ids)))
    return out


def prompts_from_config(cfg: GenerateConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[list[FormattedPrompt], bool]:
    """Load, format and tokenize the prompts a GenerateConfig asks for. Returns (prompts, chat_used)."""
    chat = use_chat_template(tokenizer, cfg.chat)
    raw = load_prompts(cfg.prompts, cfg.prompt_field, cfg.max_prompts, template=cfg.template,
                       split=cfg.hf_split, subset=cfg.hf_subset)
    return format_prompts(raw, tokenizer, chat=chat, system_prompt=cfg.system_prompt), chat
