"""Prompt templates: ``"{instruction}\\n\\n{input}"`` over a dataset row's fields, and nothing more."""

from __future__ import annotations

import re
import string

_TEMPLATE_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def template_fields(template: str) -> list[str]:
    """The row fields a prompt template names, e.g. ``"{instruction}\\n\\n{input}"`` -> [instruction, input].

    Only plain ``{field}`` placeholders are allowed (no attribute/index access, no conversions or format
    specs), so a recipe's template can read a row's values and nothing else. Raises ValueError otherwise.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a valid format string ({e}); "
                         "write literal braces as '{{' and '}}'") from None
    fields = []
    for _, name, spec, conv in parts:
        if name is None:
            continue
        if not _TEMPLATE_FIELD.match(name) or spec or conv:
            raise ValueError(f"template placeholder {{{name}{'!' + conv if conv else ''}"
                             f"{':' + spec if spec else ''}}} is not allowed: use plain {{field}} names")
        fields.append(name)
    if not fields:
        raise ValueError(f"template {template!r} names no field; use e.g. '{{instruction}}\\n\\n{{input}}'")
    return fields
