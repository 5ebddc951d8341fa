from __future__ import annotations

import types
from collections import OrderedDict

import pytest

from deferq.metadata import MAX_METADATA_LENGTH, MAX_METADATA_PAIRS, validate_metadata


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"user_id": "42", "flow": "sign-in"},
        {"emoji 👍🏽": "👨‍👩‍👧", "中文": "字符", "עברית": "مرحبا"},
        {"space inside": "non\u00a0breaking", "zwj": "a\u200db"},
        {"k" * MAX_METADATA_LENGTH: "v" * MAX_METADATA_LENGTH},
        {str(i): "v" for i in range(MAX_METADATA_PAIRS)},
        {"a": "\U0001f600" * MAX_METADATA_LENGTH},
    ],
)
def test_valid_metadata_is_returned_unchanged(value: dict[str, str]) -> None:
    assert validate_metadata(value) == value


def test_returns_a_new_plain_dict() -> None:
    original = {"a": "1"}
    result = validate_metadata(original)
    assert result is not original
    result["b"] = "2"
    assert original == {"a": "1"}

    proxied = validate_metadata(types.MappingProxyType({"a": "1"}))
    assert type(proxied) is dict and proxied == {"a": "1"}
    assert type(validate_metadata(OrderedDict(a="1"))) is dict


@pytest.mark.parametrize(
    ("value", "error", "fragment"),
    [
        ({"user\nid": "1"}, ValueError, "metadata key 'user\\nid' contains a control character"),
        ({"k": "a\x00b"}, ValueError, "value 'a\\x00b' of key 'k' contains a control"),
        ({"k": "tab\there"}, ValueError, "control character ('\\t') at position 3"),
        ({"k": "\x7f"}, ValueError, "control character"),
        ({"k": "\u0085"}, ValueError, "control character"),
        ({"k": "x\ud800"}, ValueError, "lone surrogate ('\\ud800') at position 1"),
        ({"\udfff": "v"}, ValueError, "metadata key '\\udfff' contains a lone surrogate"),
        ({"": "v"}, ValueError, "metadata key '' has 0 characters"),
        ({"k": ""}, ValueError, "value '' of key 'k' has 0 characters"),
        ({"k" * 257: "v"}, ValueError, "has 257 characters; keys and values must have 1 to 256"),
        ({"k": "v" * 257}, ValueError, "has 257 characters"),
        ({1: "v"}, TypeError, "metadata key 1 must be a str, not int"),
        ({"k": 1}, TypeError, "metadata value 1 of key 'k' must be a str, not int"),
        ({"k": None}, TypeError, "value None of key 'k' must be a str"),
        ({"k": ["v"]}, TypeError, "must be a str, not list"),
        ({str(i): "v" for i in range(26)}, ValueError, "26 pairs, more than the limit of 25"),
        ([("k", "v")], TypeError, "not list [('k', 'v')]"),
        ("k=v", TypeError, "not str 'k=v'"),
        (None, TypeError, "not NoneType"),
    ],
)
def test_bad_metadata_is_refused(value: object, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as caught:
        validate_metadata(value)  # type: ignore[arg-type]
    assert fragment in str(caught.value)


def test_str_subclasses_are_refused() -> None:
    class Tag(str):
        pass

    with pytest.raises(TypeError, match="must be a str, not Tag"):
        validate_metadata({"k": Tag("v")})


def test_long_values_are_quoted_shortened() -> None:
    long_value = "é" * 300
    with pytest.raises(ValueError) as caught:
        validate_metadata({"k": long_value})
    message = str(caught.value)
    assert repr("é" * 40) + "..." in message
    assert long_value not in message
    assert len(message) < 200
