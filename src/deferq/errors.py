"""The exceptions deferq raises. Every one derives from `DeferqError`.

    DeferqError
    ├── ConfigurationError        a bad store URL, an unknown option value
    ├── FunctionNotRegistered     no background function has this name
    ├── ExecutionNotFound         no execution has this id
    ├── ExecutionNotCancellable   cancel of an execution that is not created/started
    ├── ExecutionNotReschedulable reschedule of an execution that is not created
    ├── ResultNotReady            the execution has not reached a final state yet
    ├── ExecutionFailed           the execution ended failed, aborted, cancelled or discarded
    └── ResultTimeout             await_result gave up waiting (also a TimeoutError)

Argument errors at call time are the built-in `TypeError` and `ValueError`, as Python users
expect; they quote the bad input and nothing is stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deferq.models import Execution


class DeferqError(Exception):
    """Root of every error deferq raises on purpose."""


class ConfigurationError(DeferqError):
    """The store URL or a setting is not usable."""


class FunctionNotRegistered(DeferqError):
    """No background function is registered under this name."""


class ExecutionNotFound(DeferqError):
    """No execution has this id."""

    def __init__(self, execution_id: str) -> None:
        super().__init__(f"no execution with id {execution_id!r}")
        self.execution_id = execution_id


class _StateError(DeferqError):
    verb = "change"

    def __init__(self, execution: Execution) -> None:
        super().__init__(
            f"cannot {self.verb} execution {execution.id}: it is {execution.state.value}"
        )
        self.execution = execution


class ExecutionNotCancellable(_StateError):
    """Only `created` executions can be cancelled, and `started` ones aborted (force=True)."""

    verb = "cancel"


class ExecutionNotReschedulable(_StateError):
    """Only `created` executions can be rescheduled."""

    verb = "reschedule"


class ResultNotReady(_StateError):
    """The execution has not reached a final state yet."""

    verb = "read the result of"


class ExecutionFailed(DeferqError):
    """The execution ended without a result: failed, aborted, cancelled or discarded."""

    def __init__(self, execution: Execution) -> None:
        detail = f" ({execution.error_code}: {execution.error_message})"
        super().__init__(
            f"execution {execution.id} of {execution.function_name} ended "
            f"{execution.state.value}" + (detail if execution.error_code else "")
        )
        self.execution = execution
        self.error_code = execution.error_code
        self.error_message = execution.error_message


class ResultTimeout(DeferqError, TimeoutError):
    """`await_result` waited longer than its timeout."""

    def __init__(self, execution: Execution, timeout: float) -> None:
        super().__init__(
            f"execution {execution.id} of {execution.function_name} is still "
            f"{execution.state.value} after {timeout:g}s"
        )
        self.execution = execution
