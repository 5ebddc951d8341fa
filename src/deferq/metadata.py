"""Metadata: a few string pairs stored with an execution, for finding it again."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import NoReturn

MAX_METADATA_PAIRS = 25
MAX_METADATA_LENGTH = 256

_QUOTE_LENGTH = 40


def validate_metadata(value: Mapping[str, str]) -> dict[str, str]:
    """Check `value` and return it as a new plain `dict`.

    Metadata is a mapping of at most `MAX_METADATA_PAIRS` (25) pairs whose keys and values
    are `str`, each 1 to `MAX_METADATA_LENGTH` (256) characters long. Any Unicode text is
    allowed except control characters (such as NUL, tab or newline) and lone surrogates.
    Wrong types raise `TypeError`, wrong lengths and characters `ValueError`, each quoting
    the offending key or value.

    >>> validate_metadata({"user_id": "42", "flow": "sign-in"})
    {'user_id': '42', 'flow': 'sign-in'}
    """
    if type(value) is not dict and not isinstance(value, Mapping):
        raise TypeError(
            f"metadata must be a mapping of str to str, not {type(value).__name__} {_quote(value)}"
        )
    if len(value) > MAX_METADATA_PAIRS:
        raise ValueError(
            f"metadata has {len(value)} pairs, more than the limit of {MAX_METADATA_PAIRS}"
        )
    checked: dict[str, str] = {}
    for key, item in value.items():
        # Inline fast path; the helper below explains what is wrong.
        if type(key) is not str or not 0 < len(key) <= MAX_METADATA_LENGTH:
            _refuse(key, f"metadata key {_quote(key)}")
        if not key.isprintable():
            _check_characters(key, f"metadata key {_quote(key)}")
        if type(item) is not str or not 0 < len(item) <= MAX_METADATA_LENGTH:
            _refuse(item, f"metadata value {_quote(item)} of key {_quote(key)}")
        if not item.isprintable():
            _check_characters(item, f"metadata value {_quote(item)} of key {_quote(key)}")
        checked[key] = item
    return checked


def _refuse(text: object, label: str) -> NoReturn:
    if type(text) is not str:
        raise TypeError(f"{label} must be a str, not {type(text).__name__}")
    raise ValueError(
        f"{label} has {len(text)} characters; keys and values must have 1 to {MAX_METADATA_LENGTH}"
    )


def _check_characters(text: str, label: str) -> None:
    # isprintable() is the fast first pass; it also refuses characters we allow (format
    # characters such as the emoji joiner, unusual spaces), so those get a closer look.
    for position, char in enumerate(text):
        if unicodedata.category(char) in ("Cc", "Cs"):
            kind = "a lone surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
            raise ValueError(
                f"{label} contains {kind} ({char!r}) at position {position}; keys and values "
                "may not contain control characters or lone surrogates"
            )


def _quote(value: object) -> str:
    if isinstance(value, str) and len(value) > _QUOTE_LENGTH:
        return repr(value[:_QUOTE_LENGTH]) + "..."
    text = repr(value)
    return text if len(text) <= _QUOTE_LENGTH + 2 else text[: _QUOTE_LENGTH + 2] + "..."
