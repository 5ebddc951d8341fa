from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pytest

from deferq.durations import MAX_DURATION
from deferq.retry import DEFAULT_RETRIES, RetryPolicy, resolve_retry


def test_defaults() -> None:
    policy = RetryPolicy(3)
    assert policy.max_retries == 3
    assert policy.initial_interval == timedelta(seconds=30)
    assert policy.multiplier == 1.5
    assert policy.randomization_factor == 0.5
    assert policy.max_interval == timedelta(minutes=10)


def test_intervals_accept_any_duration() -> None:
    policy = RetryPolicy(1, initial_interval="1.5s", max_interval=3600)
    assert policy.initial_interval == timedelta(seconds=1.5)
    assert policy.max_interval == timedelta(hours=1)
    same = RetryPolicy(1, initial_interval=timedelta(seconds=1.5), max_interval="1h")
    assert same == policy


def test_explicit_zeros_are_honoured() -> None:
    policy = RetryPolicy(4, initial_interval=0, randomization_factor=0)
    assert policy.initial_interval == timedelta(0)
    assert policy.randomization_factor == 0.0
    assert [policy.delay_before_retry(n) for n in (1, 2, 100)] == [timedelta(0)] * 3

    no_spread = RetryPolicy(2, initial_interval="10s", randomization_factor=0)
    assert no_spread.delay_before_retry(1, rand=0.0) == timedelta(seconds=10)
    assert no_spread.delay_before_retry(1, rand=0.99) == timedelta(seconds=10)

    assert RetryPolicy(0).max_retries == 0
    assert RetryPolicy(1, max_interval=0).delay_before_retry(5) == timedelta(0)


@pytest.mark.parametrize(
    ("kwargs", "error", "quoted"),
    [
        ({"max_retries": -1}, ValueError, "-1"),
        ({"max_retries": True}, TypeError, "True"),
        ({"max_retries": 1.0}, TypeError, "1.0"),
        ({"max_retries": "3"}, TypeError, "'3'"),
        ({"max_retries": 1, "multiplier": 0.5}, ValueError, "0.5"),
        ({"max_retries": 1, "multiplier": math.inf}, ValueError, "inf"),
        ({"max_retries": 1, "multiplier": "2"}, TypeError, "'2'"),
        ({"max_retries": 1, "multiplier": True}, TypeError, "True"),
        ({"max_retries": 1, "randomization_factor": -0.1}, ValueError, "-0.1"),
        ({"max_retries": 1, "randomization_factor": 1.5}, ValueError, "1.5"),
        ({"max_retries": 1, "randomization_factor": math.nan}, ValueError, "nan"),
        ({"max_retries": 1, "initial_interval": "-1s"}, ValueError, "'-1s'"),
        ({"max_retries": 1, "initial_interval": "30 secondz"}, ValueError, "'30 secondz'"),
        ({"max_retries": 1, "max_interval": None}, TypeError, "None"),
    ],
)
def test_bad_policies_are_refused(
    kwargs: dict[str, object], error: type[Exception], quoted: str
) -> None:
    with pytest.raises(error) as caught:
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
    assert quoted in str(caught.value)


def test_policies_are_frozen() -> None:
    policy = RetryPolicy(1)
    with pytest.raises(AttributeError):
        policy.max_retries = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (6, 10.0), (50, 10.0)],
)
def test_delay_grows_then_is_capped(n: int, expected: float) -> None:
    policy = RetryPolicy(
        99, initial_interval="1s", multiplier=2, randomization_factor=0, max_interval="10s"
    )
    assert policy.delay_before_retry(n) == timedelta(seconds=expected)


def test_middle_of_the_spread_is_the_base_delay() -> None:
    policy = RetryPolicy(13)
    assert policy.delay_before_retry(1, rand=0.5) == timedelta(seconds=30)
    assert policy.delay_before_retry(2, rand=0.5) == timedelta(seconds=45)
    assert policy.delay_before_retry(3, rand=0.5) == timedelta(seconds=67.5)


@pytest.mark.parametrize("factor", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("rand", [0.0, 0.1, 0.5, 0.9, 0.999999])
def test_randomization_stays_within_bounds(factor: float, rand: float) -> None:
    policy = RetryPolicy(5, initial_interval="20s", randomization_factor=factor)
    delay = policy.delay_before_retry(1, rand=rand).total_seconds()
    assert 20 * (1 - factor) - 1e-6 <= delay <= 20 * (1 + factor) + 1e-6
    assert delay == pytest.approx(20 * (1 + factor * (2 * rand - 1)), abs=1e-6)


def test_random_delays_cover_the_spread() -> None:
    policy = RetryPolicy(5, initial_interval="100s", randomization_factor=0.5)
    delays = [policy.delay_before_retry(1).total_seconds() for _ in range(500)]
    assert all(50 <= delay <= 150 for delay in delays)
    assert min(delays) < 70 and max(delays) > 130


def test_full_randomization_is_never_negative() -> None:
    policy = RetryPolicy(5, initial_interval="10s", randomization_factor=1)
    assert policy.delay_before_retry(1, rand=0.0) == timedelta(0)


@pytest.mark.parametrize("n", [10_000, 10**9, 10**30])
@pytest.mark.parametrize("multiplier", [1.0, 1.5, 10.0, 1e300])
def test_huge_retry_numbers_never_overflow(n: int, multiplier: float) -> None:
    policy = RetryPolicy(n, multiplier=multiplier, randomization_factor=0.5)
    cap = policy.max_interval.total_seconds()
    for rand in (0.0, 0.5, 0.9999):
        delay = policy.delay_before_retry(n, rand=rand).total_seconds()
        assert math.isfinite(delay)
        assert 0 <= delay <= cap * 1.5
    if multiplier > 1.0:
        assert policy.delay_before_retry(n, rand=0.5) == policy.max_interval


def test_largest_interval_does_not_overflow() -> None:
    policy = RetryPolicy(1, "1d", multiplier=10, randomization_factor=1, max_interval=MAX_DURATION)
    assert policy.delay_before_retry(10**9, rand=0.999999) == MAX_DURATION


@pytest.mark.parametrize("n", [1, 2, 10_000, 10**30])
@pytest.mark.parametrize("rand", [0.5, 0.999999, 1.0])
def test_the_wait_is_clamped_at_the_longest_duration(n: int, rand: float) -> None:
    policy = RetryPolicy(
        10,
        initial_interval=MAX_DURATION,
        multiplier=1e300,
        randomization_factor=1.0,
        max_interval=MAX_DURATION,
    )
    wait = policy.delay_before_retry(n, rand=rand)
    assert wait == MAX_DURATION
    assert datetime.now(UTC) + wait < datetime.max.replace(tzinfo=UTC)


@pytest.mark.parametrize("field", ["initial_interval", "max_interval"])
@pytest.mark.parametrize("value", [timedelta.max, "999999w", 10**12, MAX_DURATION * 2])
def test_intervals_over_100_years_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError) as caught:
        RetryPolicy(3, **{field: value})  # type: ignore[arg-type]
    assert str(caught.value).startswith(f"invalid {field} ")
    assert "100 years" in str(caught.value)


def test_a_stored_policy_with_a_huge_interval_still_loads_clamped() -> None:
    stored = {"max_retries": 3, "initial_interval": 1e15, "max_interval": 1e300}
    policy = RetryPolicy.from_dict(stored)
    assert policy.initial_interval == MAX_DURATION
    assert policy.delay_before_retry(10_000, rand=1.0) == MAX_DURATION


@pytest.mark.parametrize("n", [0, -1, 1.0, True, "1"])
def test_retry_numbers_start_at_one(n: object) -> None:
    with pytest.raises(ValueError, match=repr(n)):
        RetryPolicy(3).delay_before_retry(n)  # type: ignore[arg-type]


@pytest.mark.parametrize("rand", [-0.1, 1.1, math.nan])
def test_rand_outside_zero_one_is_refused(rand: float) -> None:
    with pytest.raises(ValueError, match="rand must be"):
        RetryPolicy(3).delay_before_retry(1, rand=rand)


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(0),
        RetryPolicy(13),
        RetryPolicy(3, initial_interval="1.234567s", multiplier=2.5, max_interval="3d"),
        RetryPolicy(2, initial_interval=0, randomization_factor=0, max_interval=0),
    ],
)
def test_dict_round_trip_through_json(policy: RetryPolicy) -> None:
    data = json.loads(json.dumps(policy.to_dict()))
    assert RetryPolicy.from_dict(data) == policy


def test_to_dict_stores_seconds() -> None:
    assert RetryPolicy(2, initial_interval="1min").to_dict() == {
        "max_retries": 2,
        "initial_interval": 60.0,
        "multiplier": 1.5,
        "randomization_factor": 0.5,
        "max_interval": 600.0,
    }


def test_from_dict_fills_defaults_and_ignores_unknown_keys() -> None:
    policy = RetryPolicy.from_dict({"max_retries": 4, "jitter_mode": "full"})
    assert policy == RetryPolicy(4)


@pytest.mark.parametrize("data", [{}, [], {"max_retries": -2}, {"initial_interval": 3}])
def test_from_dict_refuses_bad_data(data: object) -> None:
    with pytest.raises(ValueError):
        RetryPolicy.from_dict(data)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (False, RetryPolicy(0)),
        (None, RetryPolicy(0)),
        (True, RetryPolicy(DEFAULT_RETRIES)),
        (0, RetryPolicy(0)),
        (5, RetryPolicy(5)),
    ],
)
def test_resolve_retry(value: object, expected: RetryPolicy) -> None:
    assert resolve_retry(value) == expected  # type: ignore[arg-type]


def test_resolve_retry_true_means_thirteen_retries() -> None:
    assert resolve_retry(True).max_retries == 13


def test_resolve_retry_keeps_a_policy() -> None:
    policy = RetryPolicy(2, initial_interval="1s")
    assert resolve_retry(policy) is policy


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, ValueError), (1.5, TypeError), ("3", TypeError), ([3], TypeError)],
)
def test_resolve_retry_refuses_other_values(value: object, error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        resolve_retry(value)  # type: ignore[arg-type]
    assert repr(value) in str(caught.value)
