"""Declaring background functions: `@defer`, their options, and per-call options."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from deferq.durations import parse_duration, parse_when
from deferq.metadata import validate_metadata
from deferq.retry import RetryPolicy, resolve_retry

if TYPE_CHECKING:
    from deferq.app import App
    from deferq.cron import CronSchedule
    from deferq.models import Execution

logger = logging.getLogger("deferq")

P = ParamSpec("P")
R = TypeVar("R")

MAX_CONCURRENCY_ACTIONS = ("keep", "cancel")
DEFAULT_MAX_DURATION = timedelta(minutes=30)

registry: dict[str, BackgroundFunction[Any, Any]] = {}
"""Every background function declared in this process, by name."""


@dataclass(frozen=True, slots=True)
class FunctionOptions:
    """Options of a background function, fixed where it is declared."""

    retry: RetryPolicy
    concurrency: int | None
    max_concurrency_action: str
    max_duration: timedelta


@dataclass(frozen=True, slots=True)
class CallOptions:
    """Options of one call, set by wrapping: `delay`, `discard_after`, `metadata`."""

    delay: timedelta | datetime | None = None
    discard_after: timedelta | datetime | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


class BackgroundFunction(Generic[P, R]):
    """A function decorated with `defer`: calling it stores an execution and returns it."""

    def __init__(
        self,
        fn: Callable[P, R],
        options: FunctionOptions,
        call_options: CallOptions | None = None,
        cron: CronSchedule | None = None,
        app: App | None = None,
        name: str | None = None,
    ) -> None:
        self.__wrapped__ = fn
        self.name = name or function_name(fn)
        self.options = options
        self.call_options = call_options or CallOptions()
        self.cron = cron
        self.is_async = inspect.iscoroutinefunction(fn)
        try:
            self._signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):  # some builtins have none: nothing to check
            self._signature = None
        self.positional_names = _positional_names(self._signature)
        """Names of the parameters positional arguments fill, for error messages."""
        self._app = app
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<background function {self.name}>"

    @property
    def app(self) -> App:
        if self._app is not None:
            return self._app
        from deferq.app import default_app

        return default_app()

    def check_arguments(self, args: Any, kwargs: Any) -> None:
        """Refuse, before anything is stored, a call the function could not accept."""
        if self._signature is None:
            return
        try:
            self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"cannot call {self.name}: {exc}") from None

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Execution:
        """Store an execution of this function with these arguments; return it at once."""
        return self.app.enqueue(self, args, kwargs)

    async def call_async(self, *args: P.args, **kwargs: P.kwargs) -> Execution:
        """As calling it, for async code: the store is written from a thread, never the loop."""
        return await asyncio.to_thread(self.app.enqueue, self, args, kwargs)

    def enqueue_many(self, calls: Iterable[Any]) -> list[Execution]:
        """Store many executions in one transaction. Each item is a tuple of positional
        arguments, a dict of keyword arguments, or an `(args, kwargs)` pair from `call_args`."""
        return self.app.enqueue_many(self, calls)

    def with_call_options(self, **changes: Any) -> BackgroundFunction[P, R]:
        """A copy of this function with other per-call options; this one is unchanged."""
        copy = BackgroundFunction.__new__(BackgroundFunction)
        copy.__dict__.update(self.__dict__)
        copy.call_options = replace(self.call_options, **changes)
        return copy


def _positional_names(signature: inspect.Signature | None) -> tuple[str, ...]:
    if signature is None:
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in signature.parameters.values() if p.kind in kinds)


def call_args(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One call's arguments for `enqueue_many`: `fn.enqueue_many([call_args(1, x=2)])`."""
    return args, kwargs


def function_name(fn: Callable[..., Any]) -> str:
    """`module.qualname`, the name a worker finds the function by."""
    module = getattr(fn, "__module__", None) or "__main__"
    if module == "__main__":
        spec = getattr(__import__("__main__"), "__spec__", None)
        if spec is not None and spec.name:
            module = spec.name
    return f"{module}.{fn.__qualname__}"


def _function_options(
    retry: Any, concurrency: Any, max_concurrency_action: Any, max_duration: Any
) -> FunctionOptions:
    if concurrency is not None and (type(concurrency) is not int or concurrency < 1):
        raise ValueError(f"concurrency must be a positive integer or None, not {concurrency!r}")
    if max_concurrency_action not in MAX_CONCURRENCY_ACTIONS:
        raise ValueError(
            f"max_concurrency_action must be 'keep' or 'cancel', not {max_concurrency_action!r}"
        )
    duration = parse_duration(max_duration, name="max_duration")
    if duration <= timedelta(0):
        raise ValueError(f"max_duration must be longer than zero, not {max_duration!r}")
    return FunctionOptions(
        retry=resolve_retry(retry),
        concurrency=concurrency,
        max_concurrency_action=max_concurrency_action,
        max_duration=duration,
    )


class _Defer:
    """`@defer`, `@defer(...)` and `@defer.cron(...)`."""

    @overload
    def __call__(self, fn: Callable[P, R], /) -> BackgroundFunction[P, R]: ...

    @overload
    def __call__(
        self,
        fn: None = None,
        /,
        *,
        retry: bool | int | RetryPolicy | None = False,
        concurrency: int | None = None,
        max_concurrency_action: str = "keep",
        max_duration: Any = DEFAULT_MAX_DURATION,
        name: str | None = None,
        app: App | None = None,
    ) -> Callable[[Callable[P, R]], BackgroundFunction[P, R]]: ...

    def __call__(
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        retry: bool | int | RetryPolicy | None = False,
        concurrency: int | None = None,
        max_concurrency_action: str = "keep",
        max_duration: Any = DEFAULT_MAX_DURATION,
        name: str | None = None,
        app: App | None = None,
    ) -> Any:
        options = _function_options(retry, concurrency, max_concurrency_action, max_duration)

        def decorate(fn: Callable[P, R]) -> BackgroundFunction[P, R]:
            return register(BackgroundFunction(fn, options, app=app, name=name))

        return decorate if fn is None else decorate(fn)

    def cron(
        self,
        expression: str,
        *,
        tz: str = "UTC",
        catch_up: str = "one",
        retry: bool | int | RetryPolicy | None = False,
        concurrency: int | None = None,
        max_concurrency_action: str = "keep",
        max_duration: Any = DEFAULT_MAX_DURATION,
        name: str | None = None,
        app: App | None = None,
    ) -> Callable[[Callable[[], R]], BackgroundFunction[[], R]]:
        """Run a function that takes no arguments on a cron schedule (UTC unless `tz`)."""
        from deferq.cron import CronSchedule

        schedule = CronSchedule(expression, tz=tz, catch_up=catch_up)
        options = _function_options(retry, concurrency, max_concurrency_action, max_duration)

        def decorate(fn: Callable[[], R]) -> BackgroundFunction[[], R]:
            required = [
                p
                for p in inspect.signature(fn).parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
            if required:
                raise TypeError(
                    f"cron function {function_name(fn)} must take no arguments, "
                    f"but requires {', '.join(p.name for p in required)}"
                )
            return register(BackgroundFunction(fn, options, cron=schedule, app=app, name=name))

        return decorate


defer = _Defer()


def register(function: BackgroundFunction[P, R]) -> BackgroundFunction[P, R]:
    """Make a background function findable by name, as workers need."""
    existing = registry.get(function.name)
    if existing is not None and existing.__wrapped__ is not function.__wrapped__:
        logger.debug(
            "Replacing background function",
            extra={"action": "replace_function", "function": function.name},
        )
    registry[function.name] = function
    return function


def _background(fn: Any) -> BackgroundFunction[Any, Any]:
    if not isinstance(fn, BackgroundFunction):
        raise TypeError(f"expected a function decorated with @defer, got {fn!r}")
    return fn


def delay(fn: BackgroundFunction[P, R], when: Any) -> BackgroundFunction[P, R]:
    """A copy of `fn` whose executions start no earlier than `when` (a duration from the call,
    or an aware datetime)."""
    return _background(fn).with_call_options(delay=parse_when(when, name="delay"))


def discard_after(fn: BackgroundFunction[P, R], when: Any) -> BackgroundFunction[P, R]:
    """A copy of `fn` whose executions are discarded if not started by `when` (a duration
    counted from the call, or an aware datetime)."""
    return _background(fn).with_call_options(discard_after=parse_when(when, name="discard_after"))


def add_metadata(
    fn: BackgroundFunction[P, R], metadata: Mapping[str, str]
) -> BackgroundFunction[P, R]:
    """A copy of `fn` whose executions carry `metadata` (replacing earlier metadata)."""
    return _background(fn).with_call_options(metadata=validate_metadata(metadata))


_UNSET: Any = object()


def assign_options(
    fn: BackgroundFunction[P, R],
    *,
    delay: Any = _UNSET,
    discard_after: Any = _UNSET,
    metadata: Any = _UNSET,
) -> BackgroundFunction[P, R]:
    """A copy of `fn` with several per-call options set at once; `None` clears one."""
    changes: dict[str, Any] = {}
    if delay is not _UNSET:
        changes["delay"] = None if delay is None else parse_when(delay, name="delay")
    if discard_after is not _UNSET:
        changes["discard_after"] = (
            None if discard_after is None else parse_when(discard_after, name="discard_after")
        )
    if metadata is not _UNSET:
        changes["metadata"] = {} if metadata is None else validate_metadata(metadata)
    return _background(fn).with_call_options(**changes)
