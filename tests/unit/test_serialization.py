from __future__ import annotations

import collections
import datetime
import decimal
import enum
import json
import uuid
from typing import Any, NamedTuple

import pytest

from deferq.serialization import (
    MAX_ARGUMENTS_BYTES,
    MAX_NESTING,
    MAX_RESULT_BYTES,
    decode_arguments,
    decode_result,
    encode_arguments,
    encode_result,
)


class Color(enum.IntEnum):
    RED = 1


class Flavor(enum.StrEnum):
    SWEET = "sweet"


class Point(NamedTuple):
    x: int
    y: int


class MyInt(int):
    pass


def _encode(*args: Any, **kwargs: Any) -> str:
    return encode_arguments(args, kwargs, function_name="app.send")


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        (("ada@example.com",), {}),
        ((None, True, False, 0, -1, 10**30, 1.5, -0.0, 1e-300), {}),
        (([1, [2, [3]]], {"a": {"b": {"c": []}}}), {"flag": None}),
        ((), {"width": 640, "tags": ["a", "b"]}),
        (("emoji 👍🏽 👨‍👩‍👧", "中文字符", "עברית مرحبا"), {"名前": "値"}),
        (('tab\tnewline\nquote" backslash\\ \u2028',), {}),
        (("\U0010ffff",), {}),
    ],
)
def test_arguments_round_trip_exactly(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    text = encode_arguments(args, kwargs, function_name="app.send")
    decoded_args, decoded_kwargs = decode_arguments(text)
    assert decoded_args == list(args)
    assert decoded_kwargs == kwargs
    assert [type(value) for value in decoded_args] == [type(value) for value in args]


def test_encoding_is_compact_utf8_json() -> None:
    text = _encode("ada@example.com", "中文", n=1)
    assert text == '[["ada@example.com","中文"],{"n":1}]'
    assert text == json.dumps(
        [["ada@example.com", "中文"], {"n": 1}], ensure_ascii=False, separators=(",", ":")
    )


def test_negative_zero_and_big_ints_survive() -> None:
    [value, big], _ = decode_arguments(_encode(-0.0, 2**100))
    assert str(value) == "-0.0"
    assert big == 2**100


def test_the_top_level_args_may_be_a_tuple_or_list() -> None:
    assert encode_arguments([1], {}, function_name="f") == encode_arguments(
        (1,), {}, function_name="f"
    )


def _fn() -> None:
    return None


@pytest.mark.parametrize(
    ("value", "described", "hint"),
    [
        ({1, 2}, "set", "use a list"),
        (frozenset({1}), "frozenset", "use a list"),
        ((1, 2), "tuple", "use a list"),
        (Point(1, 2), "Point", "use a list or a dict"),
        (b"raw", "bytes", "base64"),
        (bytearray(b"x"), "bytearray", "base64"),
        (datetime.datetime(2030, 1, 1), "datetime.datetime", "isoformat"),
        (datetime.date(2030, 1, 1), "datetime.date", "isoformat"),
        (decimal.Decimal("1.5"), "decimal.Decimal", "str(value)"),
        (uuid.UUID(int=1), "uuid.UUID", "str(value)"),
        (Color.RED, "Color", ".value"),
        (Flavor.SWEET, "Flavor", ".value"),
        (MyInt(3), "MyInt", "plain int"),
        (collections.defaultdict(list), "collections.defaultdict", "plain dict"),
        (collections.OrderedDict(), "collections.OrderedDict", "plain dict"),
        (lambda: 1, "function", "not code"),
        (_fn, "function", "not code"),
        (object(), "object", "is not JSON"),
        (1j, "complex", "is not JSON"),
    ],
)
def test_values_json_cannot_carry_exactly_are_refused(
    value: object, described: str, hint: str
) -> None:
    with pytest.raises(TypeError) as caught:
        _encode(value)
    message = str(caught.value)
    assert message.startswith("cannot store positional argument 0 of app.send: ")
    assert described in message
    assert " at args[0] " in message
    assert hint in message


def test_error_names_keyword_and_path() -> None:
    with pytest.raises(TypeError) as caught:
        _encode(tags=["a", "b", {"c"}])
    assert str(caught.value) == (
        "cannot store argument 'tags' of app.send: set at tags[2] is not JSON (use a list)"
    )


def test_error_path_goes_through_dicts_and_lists() -> None:
    with pytest.raises(TypeError, match=r"tuple at args\[1\]\['a'\]\[0\]\['b'\] "):
        _encode(1, {"a": [{"b": (1,)}]})


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        ("a\x00b", "NUL character at position 1"),
        ("x\ud800y", "lone surrogate"),
        ("\udfff", "lone surrogate"),
    ],
)
def test_values_json_would_damage_are_refused(value: object, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        _encode("ok", meta={"items": ["fine", value]})
    message = str(caught.value)
    assert message.startswith("cannot store argument 'meta' of app.send: ")
    assert "meta['items'][1]" in message
    assert reason in message


@pytest.mark.parametrize(
    ("key", "error", "reason"),
    [
        (1, TypeError, "dict key 1 (int)"),
        (None, TypeError, "dict key None"),
        (("a",), TypeError, "dict key ('a',)"),
        ("k\x00", ValueError, "dict key 'k\\x00' at args[0]['outer'] contains a NUL"),
        ("k\ud800", ValueError, "dict key 'k\\ud800' at args[0]['outer'] contains a lone"),
    ],
)
def test_bad_dict_keys_are_refused(key: object, error: type[Exception], reason: str) -> None:
    with pytest.raises(error) as caught:
        _encode({"outer": {key: 1}})
    assert reason in str(caught.value)


def test_bad_keyword_names_are_refused() -> None:
    with pytest.raises(TypeError, match="keyword 1 of app.send"):
        encode_arguments((), {1: "x"}, function_name="app.send")  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="keyword 'a\\\\x00' of app.send"):
        encode_arguments((), {"a\x00": "x"}, function_name="app.send")
    with pytest.raises(ValueError, match="argument 'a\\\\ud800' of app.send: keyword"):
        encode_arguments((), {"a\ud800": "x"}, function_name="app.send")


def test_surrogate_in_a_positional_argument_names_it() -> None:
    with pytest.raises(ValueError) as caught:
        _encode("fine", "\ud83d")
    assert "positional argument 1 of app.send: str '\\ud83d' at args[1]" in str(caught.value)


def test_a_value_containing_itself_is_refused_without_recursion_error() -> None:
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(ValueError, match="contains itself"):
        _encode(looped)
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    with pytest.raises(ValueError, match="contains itself"):
        encode_result(cycle, function_name="app.f")


def test_nesting_limit() -> None:
    deep: Any = "leaf"
    for _ in range(MAX_NESTING - 1):
        deep = [deep]
    assert decode_arguments(_encode(deep))[0] == [deep]

    too_deep = [deep]
    with pytest.raises(ValueError) as caught:
        _encode(too_deep)
    assert f"more than {MAX_NESTING} levels" in str(caught.value)
    assert len(str(caught.value)) < 300  # the path is shortened


def test_size_limit_on_arguments() -> None:
    exact = "x" * (MAX_ARGUMENTS_BYTES - len('[[""],{}]'))
    assert len(_encode(exact)) == MAX_ARGUMENTS_BYTES

    with pytest.raises(ValueError) as caught:
        _encode("small", body=exact)
    message = str(caught.value)
    assert "arguments of app.send" in message
    assert f"limit of {MAX_ARGUMENTS_BYTES:,}" in message
    assert "largest: argument 'body'" in message


def test_size_limit_counts_utf8_bytes() -> None:
    three_bytes_each = "中" * (MAX_ARGUMENTS_BYTES // 3)
    with pytest.raises(ValueError, match="bytes as JSON"):
        _encode(three_bytes_each)


def test_wrong_container_types_for_the_call() -> None:
    with pytest.raises(TypeError, match="positional arguments of f"):
        encode_arguments("abc", {}, function_name="f")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="keyword arguments of f"):
        encode_arguments((), [("a", 1)], function_name="f")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [None, True, 3, 2.5, "done 🎉", ["a", 1], {"ok": True, "items": [1, 2]}, {"中": "文"}],
)
def test_results_round_trip(value: Any) -> None:
    assert decode_result(encode_result(value, function_name="app.f")) == value


@pytest.mark.parametrize(
    ("value", "error", "reason"),
    [
        ({"a": {1}}, TypeError, "set at result['a'] is not JSON"),
        ((1, 2), TypeError, "tuple at result is not JSON"),
        (float("nan"), ValueError, "float at result is nan"),
        ("\x00", ValueError, "NUL"),
        (["\ud800"], ValueError, "lone surrogate"),
        (Color.RED, TypeError, "Color at result"),
    ],
)
def test_bad_results_are_refused(value: Any, error: type[Exception], reason: str) -> None:
    with pytest.raises(error) as caught:
        encode_result(value, function_name="app.f")
    assert str(caught.value).startswith("cannot store the result of app.f: ")
    assert reason in str(caught.value)


def test_size_limit_on_results() -> None:
    with pytest.raises(ValueError, match=f"limit of {MAX_RESULT_BYTES:,}"):
        encode_result("x" * MAX_RESULT_BYTES, function_name="app.f")


@pytest.mark.parametrize("text", ['{"a":1}', "[[1]]", "[{},[]]", "[[],{},3]", "[NaN,{}]"])
def test_decode_arguments_refuses_malformed_text(text: str) -> None:
    with pytest.raises(ValueError):
        decode_arguments(text)


def test_decode_result_refuses_constants_deferq_never_writes() -> None:
    with pytest.raises(ValueError, match="Infinity"):
        decode_result("[Infinity]")


# Ints longer than Python writes as text (4,300 digits by default) are refused by name.


def test_an_overlong_int_keyword_argument_is_named() -> None:
    with pytest.raises(ValueError) as caught:
        encode_arguments((), {"n": 10**5000}, function_name="app.count")
    message = str(caught.value)
    assert message.startswith("cannot store argument 'n' of app.count: int of about 5,000")
    assert "pass it as a str" in message


def test_an_overlong_int_deep_in_a_positional_argument_is_located() -> None:
    with pytest.raises(ValueError) as caught:
        encode_arguments(("ok", [1, {"x": -(10**6000)}]), {}, function_name="app.count")
    assert "positional argument 1 of app.count" in str(caught.value)
    assert "args[1][1]['x']" in str(caught.value)


def test_an_overlong_int_result_is_refused() -> None:
    with pytest.raises(ValueError, match=r"result of app\.count: int .* at result\['n'\]"):
        encode_result({"n": 10**5000}, function_name="app.count")


def test_an_int_just_within_the_text_limit_survives() -> None:
    big = 10**4299
    [value], _ = decode_arguments(encode_arguments((big,), {}, function_name="app.count"))
    assert value == big
