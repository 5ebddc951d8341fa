"""Arguments and results as JSON, strictly: what is stored is exactly what the function gets.

Only `None`, `bool`, `int`, finite `float`, `str`, `list` and `dict` with `str` keys pass,
checked by exact type. A tuple, a set, an enum member, a `defaultdict` or any other object
that JSON would change or lose is refused when the call is made, with a message that names
the function, the argument and where inside it the value sits. No pickle.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import math
import sys
import uuid
from collections.abc import Callable
from typing import Any, NoReturn

MAX_ARGUMENTS_BYTES = 1_048_576
"""Largest accepted size of a call's arguments, as UTF-8 encoded JSON."""

MAX_RESULT_BYTES = 1_048_576
"""Largest accepted size of a return value, as UTF-8 encoded JSON."""

MAX_NESTING = 100
"""Deepest accepted nesting of lists and dicts; deeper values (or values that contain
themselves) are refused rather than exhausting the stack."""

# The values are checked before encoding, so the encoder need not look for cycles.
_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False
)


def _make_encode() -> Callable[[Any], str]:
    """The fastest way to run `_ENCODER`: its C core built once, not on every call as
    `JSONEncoder.encode` does. Falls back to `_ENCODER.encode` where that core is missing or
    its signature differs; both give the same text."""
    try:
        from _json import encode_basestring, make_encoder

        # The arguments JSONEncoder.iterencode passes: markers, default, string encoder,
        # indent, key and item separators, sort_keys, skipkeys, allow_nan.
        core = make_encoder(
            None, _ENCODER.default, encode_basestring, None, ":", ",", False, False, False
        )
        if "".join(core([["é", 1.5, None], {"k": True}], 0)) != '[["é",1.5,null],{"k":true}]':
            return _ENCODER.encode
    except (ImportError, TypeError):
        return _ENCODER.encode

    def encode(value: Any) -> str:
        if type(value) is str:  # the C core only takes containers and numbers at the top
            return _ENCODER.encode(value)
        return "".join(core(value, 0))

    return encode


_encode = _make_encode()


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"stored JSON contains {name}, which deferq never writes")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)

_isfinite = math.isfinite


class _Refusal(Exception):
    """A value that cannot be stored; `path` grows (innermost first) as it unwinds."""

    def __init__(self, error: type[Exception], what: str, reason: str) -> None:
        self.error = error
        self.what = what
        self.reason = reason
        self.path: list[str] = []

    def build(self, context: str, root: str) -> Exception:
        steps = self.path[::-1]
        if len(steps) > 12:
            steps = [*steps[:6], "...", *steps[-6:]]
        where = root + "".join(steps)
        return self.error(f"{context}: {self.what} at {where} {self.reason}")


def encode_arguments(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    function_name: str,
    positional_names: tuple[str, ...] = (),
) -> str:
    """Store a call's arguments as compact JSON text: `[args_list, kwargs_dict]`.

    Raises `TypeError` for a value of a type JSON cannot carry exactly, and `ValueError` for
    NaN or infinite floats, strings with a NUL character or a lone surrogate, ints too long
    to write as text, values nested deeper than `MAX_NESTING` or containing themselves, and
    text above `MAX_ARGUMENTS_BYTES`. Messages name the argument: by `positional_names`
    (the function's parameters) where given, else by position.

    >>> encode_arguments(("ada@example.com",), {"retries": 2}, function_name="app.send")
    '[["ada@example.com"],{"retries":2}]'
    """
    if type(args) is not tuple and type(args) is not list:
        raise TypeError(f"positional arguments of {function_name} must be a tuple, not {args!r}")
    if type(kwargs) is not dict:
        raise TypeError(f"keyword arguments of {function_name} must be a dict, not {kwargs!r}")

    for index, value in enumerate(args):
        try:
            _check(value, 1)
        except _Refusal as refusal:
            context = f"cannot store {_positional(index, positional_names)} of {function_name}"
            raise refusal.build(context, f"args[{index}]") from None
    for name, value in kwargs.items():
        if type(name) is not str:
            raise TypeError(f"cannot store keyword {name!r} of {function_name}: not a str")
        if "\x00" in name:
            raise ValueError(f"cannot store keyword {name!r} of {function_name}: NUL character")
        try:
            _check(value, 1)
        except _Refusal as refusal:
            raise refusal.build(
                f"cannot store argument {name!r} of {function_name}", name
            ) from None

    try:
        text = _encode((args, kwargs))
    except ValueError:  # an int too long to write as text; found and named below
        raise _locate_arguments(args, kwargs, function_name, positional_names) from None
    size = _encoded_size(text)
    if size < 0:
        raise _locate_arguments(args, kwargs, function_name, positional_names)
    if size > MAX_ARGUMENTS_BYTES:
        raise ValueError(
            f"cannot store the arguments of {function_name}: they take {size:,} bytes as JSON, "
            f"more than the limit of {MAX_ARGUMENTS_BYTES:,}{_largest_argument(args, kwargs)}; "
            "store large data elsewhere and pass a reference to it"
        )
    return text


def decode_arguments(text: str) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments `encode_arguments` stored."""
    data = _DECODER.decode(text)
    if type(data) is not list or len(data) != 2:
        raise ValueError(f"stored arguments are not [args, kwargs]: {text[:80]!r}")
    args, kwargs = data
    if type(args) is not list or type(kwargs) is not dict:
        raise ValueError(f"stored arguments are not [args, kwargs]: {text[:80]!r}")
    return args, kwargs


def encode_result(value: Any, *, function_name: str) -> str:
    """Store a return value as compact JSON text, by the rules of `encode_arguments` and
    within `MAX_RESULT_BYTES`."""
    context = f"cannot store the result of {function_name}"
    try:
        _check(value, 0)
    except _Refusal as refusal:
        raise refusal.build(context, "result") from None

    try:
        text = _encode(value)
    except ValueError:  # an int too long to write as text; found and named below
        raise _locate(value, context, "result") from None
    size = _encoded_size(text)
    if size < 0:
        raise _locate(value, context, "result")
    if size > MAX_RESULT_BYTES:
        raise ValueError(
            f"{context}: it takes {size:,} bytes as JSON, more than the limit of "
            f"{MAX_RESULT_BYTES:,}; store large data elsewhere and return a reference to it"
        )
    return text


def decode_result(text: str) -> Any:
    """The return value `encode_result` stored."""
    return _DECODER.decode(text)


# Checking, fast path: exact types, no copies, the path built only when something is refused.


def _check(value: Any, depth: int) -> None:
    kind = type(value)
    if kind is str:
        if "\x00" in value:
            _refuse_nul(value, "str")
    elif kind is int or kind is bool or value is None:
        pass
    elif kind is float:
        if not _isfinite(value):
            raise _Refusal(ValueError, "float", f"is {value!r}, which JSON cannot carry")
    elif kind is list:
        if depth >= MAX_NESTING:
            _refuse_depth()
        depth += 1
        for index, item in enumerate(value):
            try:
                _check(item, depth)
            except _Refusal as refusal:
                refusal.path.append(f"[{index}]")
                raise
    elif kind is dict:
        if depth >= MAX_NESTING:
            _refuse_depth()
        depth += 1
        for key, item in value.items():
            if type(key) is not str:
                raise _Refusal(
                    TypeError,
                    f"dict key {key!r} ({_describe(key)})",
                    "is not a str; JSON object keys are strings",
                )
            if "\x00" in key:
                _refuse_nul(key, "dict key")
            try:
                _check(item, depth)
            except _Refusal as refusal:
                refusal.path.append(f"[{key!r}]")
                raise
    else:
        raise _Refusal(TypeError, _describe(value), f"is not JSON ({_hint(value)})")


def _refuse_nul(text: str, what: str) -> NoReturn:
    raise _Refusal(
        ValueError,
        f"{what} {_short(text)}",
        f"contains a NUL character at position {text.index(chr(0))}, which the store refuses",
    )


def _refuse_depth() -> NoReturn:
    raise _Refusal(
        ValueError,
        "value",
        f"is nested more than {MAX_NESTING} levels deep (or contains itself)",
    )


def _describe(value: object) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _hint(value: object) -> str:
    """A way to pass `value`, for the error message."""
    hints: list[tuple[type | tuple[type, ...], str]] = [
        ((set, frozenset), "use a list"),
        ((bytes, bytearray, memoryview), "encode it as a str, e.g. with base64"),
    ]
    for kinds, hint in hints:
        if isinstance(value, kinds):
            return hint
    if isinstance(value, tuple):
        return "use a list or a dict" if hasattr(value, "_fields") else "use a list"

    if isinstance(value, datetime.date | datetime.time | datetime.timedelta):
        return "pass value.isoformat() or a number and convert it back"
    if isinstance(value, enum.Enum):
        return "pass its .value"
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return "pass str(value)"
    for base in (bool, int, float, str, list, dict):
        if isinstance(value, base):
            return f"pass a plain {base.__name__}, e.g. {base.__name__}(value)"
    if callable(value):
        return "pass data, not code; a worker looks functions up by name"
    return "pass its data as a dict"


def _short(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


# Slow paths, only on the way to an error.


def _encoded_size(text: str) -> int:
    """Bytes of `text` as UTF-8, or -1 when a lone surrogate makes it unencodable."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return -1


def _positional(index: int, names: tuple[str, ...]) -> str:
    if index < len(names):
        return f"argument {names[index]!r} (positional argument {index})"
    return f"positional argument {index}"


def _locate_arguments(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    function_name: str,
    positional_names: tuple[str, ...] = (),
) -> Exception:
    for index, value in enumerate(args):
        context = f"cannot store {_positional(index, positional_names)} of {function_name}"
        error = _find_surrogate(value, context, f"args[{index}]")
        if error is not None:
            return error
    for name, value in kwargs.items():
        context = f"cannot store argument {name!r} of {function_name}"
        error = _find_surrogate(name, context, "its name", "keyword")
        error = error or _find_surrogate(value, context, name)
        if error is not None:
            return error
    return ValueError(
        f"cannot store the arguments of {function_name}: they cannot be written as UTF-8 JSON"
    )


def _locate(value: Any, context: str, root: str) -> Exception:
    error = _find_surrogate(value, context, root)
    return error or ValueError(f"{context}: it cannot be written as UTF-8 JSON")


def _find_surrogate(value: Any, context: str, root: str, what: str = "str") -> Exception | None:
    """The error for the first lone surrogate or overlong int in `value`, or None."""
    try:
        _check_surrogates(value, what)
    except _Refusal as refusal:
        return refusal.build(context, root)
    return None


def _check_surrogates(value: Any, what: str = "str") -> None:
    kind = type(value)
    if kind is int:
        _check_int_length(value)
    elif kind is str:
        for position, char in enumerate(value):
            if "\ud800" <= char <= "\udfff":
                raise _Refusal(
                    ValueError,
                    f"{what} {_short(value)}",
                    f"contains a lone surrogate ({char!r}) at position {position}, which "
                    "UTF-8 cannot carry",
                )
    elif kind is list:
        for index, item in enumerate(value):
            try:
                _check_surrogates(item)
            except _Refusal as refusal:
                refusal.path.append(f"[{index}]")
                raise
    elif kind is dict:
        for key, item in value.items():
            _check_surrogates(key, "dict key")
            try:
                _check_surrogates(item)
            except _Refusal as refusal:
                refusal.path.append(f"[{key!r}]")
                raise


def _check_int_length(value: int) -> None:
    try:
        str(value)
    except ValueError:
        raise _Refusal(
            ValueError,
            f"int of about {int(value.bit_length() * 0.30103):,} digits",
            f"is longer than the {sys.get_int_max_str_digits():,} digits JSON text may hold "
            "here; pass it as a str",
        ) from None


def _largest_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    sizes = [(len(_encode(value).encode()), f"{index}") for index, value in enumerate(args)]
    sizes += [(len(_encode(value).encode()), repr(name)) for name, value in kwargs.items()]
    if not sizes:
        return ""
    size, label = max(sizes)
    return f" (largest: argument {label}, {size:,} bytes)"
