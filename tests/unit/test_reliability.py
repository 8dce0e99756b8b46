"""newfuse.reliability without servers: backoff and jitter, one deadline, Retry-After,
retryable or not, the breaker's states, the token bucket (time driven by a fake clock)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from newfuse.errors import (
    CircuitOpenError,
    ConnectionLostError,
    InvalidNameError,
    RateLimitExceededError,
    ReliabilityConfigError,
    RequestTimeoutError,
    RetriesExhaustedError,
)
from newfuse.reliability import (
    CircuitBreaker,
    RateLimiter,
    RetryPolicy,
    default_retryable,
    retry_after_of,
)


class FakeTime:
    """A monotonic clock that moves only when someone sleeps (records each sleep)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Flaky:
    """Raises the given errors in turn, then returns 'ok'; counts calls."""

    def __init__(self, *errors: BaseException, took: float = 0.0, time: FakeTime | None = None):
        self.errors = list(errors)
        self.calls = 0
        self.took = took
        self.time = time

    async def __call__(self) -> str:
        self.calls += 1
        if self.time is not None:
            self.time.now += self.took
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def unavailable() -> ConnectionLostError:
    return ConnectionLostError(server="model", url="http://127.0.0.1:1", reason="refused")


class AskedToWait(ConnectionError):
    """What an HTTP client might raise on a 429 with a Retry-After header."""

    def __init__(self, retry_after: object) -> None:
        super().__init__(f"429, Retry-After {retry_after}")
        self.retry_after = retry_after


def policy(time: FakeTime, **kwargs: object) -> RetryPolicy:
    return RetryPolicy(clock=time.clock, sleep=time.sleep, **kwargs)  # type: ignore[arg-type]


# -- backoff -----------------------------------------------------------------------------------


def test_backoff_doubles_from_first_up_to_most() -> None:
    retry = RetryPolicy(first=0.1, most=1.0, jitter=0.0)
    assert [retry.delay(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert retry.delay(10_000) == 1.0  # no overflow for a huge attempt count


@pytest.mark.parametrize("jitter", [1.0, 0.5, 0.25])
def test_jittered_delays_stay_within_bounds_and_spread(jitter: float) -> None:
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    source = random.Random(seed)
    retry = RetryPolicy(first=0.1, most=5.0, jitter=jitter, random=source.random)
    for attempt in range(1, 10):
        backoff = retry.backoff(attempt)
        delays = [retry.delay(attempt) for _ in range(200)]
        assert all(backoff * (1 - jitter) <= d <= backoff for d in delays)
        # 200 draws all in one tenth of the range would mean the jitter is not random
        assert max(delays) - min(delays) > backoff * jitter * 0.5


def test_full_jitter_reaches_both_ends_of_the_range() -> None:
    ends = iter([0.0, 0.999999])
    retry = RetryPolicy(first=1.0, most=8.0, jitter=1.0, random=lambda: next(ends))
    assert retry.delay(4) == 8.0
    assert retry.delay(4) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize(
    ("field", "value"),
    [("attempts", 0), ("first", -1.0), ("jitter", 1.5), ("deadline", 0.0), ("multiplier", 0.5)],
)
def test_a_policy_that_cannot_work_is_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ReliabilityConfigError, match=f"retry policy: {field}="):
        RetryPolicy(**{field: value})  # type: ignore[arg-type]


# -- run ---------------------------------------------------------------------------------------


async def test_retries_what_is_retryable_until_it_succeeds_sleeping_the_backoffs() -> None:
    time = FakeTime()
    flaky = Flaky(unavailable(), OSError("reset"), TimeoutError())
    retry = policy(time, attempts=5, first=0.1, most=10.0, jitter=0.0, deadline=None)
    assert await retry.run(flaky, operation="call the model") == "ok"
    assert flaky.calls == 4
    assert time.sleeps == pytest.approx([0.1, 0.2, 0.4])


async def test_a_non_retryable_error_is_raised_at_once_as_it_is() -> None:
    time = FakeTime()
    error = InvalidNameError(kind="agent", name="a.b", reason="no dots")
    flaky = Flaky(unavailable(), error)
    with pytest.raises(InvalidNameError, match="no dots") as raised:
        await policy(time).run(flaky, operation="send")
    assert raised.value is error
    assert flaky.calls == 2 and len(time.sleeps) == 1


async def test_a_custom_retryable_decides() -> None:
    time = FakeTime()
    flaky = Flaky(KeyError("busy"), KeyError("busy"))
    retry = policy(time, jitter=0.0)
    result = await retry.run(flaky, operation="x", retryable=lambda e: isinstance(e, KeyError))
    assert result == "ok" and flaky.calls == 3
    with pytest.raises(OSError, match="refused"):
        await retry.run(Flaky(OSError("refused")), operation="x", retryable=lambda e: False)


def test_default_retryable_follows_the_errors_flag() -> None:
    assert default_retryable(unavailable())
    assert default_retryable(RequestTimeoutError(agent="a", message_type="t", waited=1, path="p"))
    assert not default_retryable(InvalidNameError(kind="agent", name="a.b", reason="dots"))
    assert default_retryable(ConnectionResetError()) and default_retryable(TimeoutError())
    assert not default_retryable(ValueError("bad")) and not default_retryable(KeyError("k"))


async def test_attempts_exhausted_names_operation_attempts_and_last_error() -> None:
    time = FakeTime()
    flaky = Flaky(*(OSError(f"refused {n}") for n in range(9)))
    with pytest.raises(RetriesExhaustedError) as raised:
        await policy(time, attempts=3, deadline=None).run(flaky, operation="call 'writer'")
    error = raised.value
    assert flaky.calls == 3 and len(time.sleeps) == 2
    assert (error.operation, error.attempts) == ("call 'writer'", 3)
    assert "call 'writer': gave up after 3 attempts" in str(error)
    assert "no attempts left" in str(error) and "OSError: refused 2" in str(error)
    assert isinstance(error.__cause__, OSError) and not error.retryable


async def test_one_deadline_spans_all_attempts_and_waits() -> None:
    time = FakeTime()
    # each attempt takes 1 s and fails; backoff 1, 2, 4: attempts end at 1, 4 and 6 s
    flaky = Flaky(*(unavailable() for _ in range(20)), took=1.0, time=time)
    retry = policy(time, attempts=20, first=1.0, most=100.0, jitter=0.0, deadline=6.0)
    with pytest.raises(RetriesExhaustedError, match="past the 6s deadline") as raised:
        await retry.run(flaky, operation="append")
    assert flaky.calls == 3  # at 6 s the next wait (4 s) would end past 6 s: no fourth attempt
    assert time.sleeps == [1.0, 2.0]
    assert raised.value.attempts == 3 and raised.value.elapsed == pytest.approx(6.0)


async def test_the_deadline_cancels_an_attempt_still_running() -> None:
    started = asyncio.Event()

    async def hangs() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    retry = RetryPolicy(attempts=3, deadline=0.05)
    with pytest.raises(RetriesExhaustedError, match="deadline passed during the attempt"):
        await retry.run(hangs, operation="hang")
    assert started.is_set()


async def test_retry_after_is_honoured_instead_of_the_backoff() -> None:
    time = FakeTime()
    flaky = Flaky(AskedToWait(3.5), AskedToWait(0))
    retry = policy(time, first=0.1, jitter=0.0, deadline=10.0)
    assert await retry.run(flaky, operation="chat") == "ok"
    assert time.sleeps == [3.5, 0.0]


async def test_retry_after_past_the_deadline_gives_up_at_once() -> None:
    time = FakeTime()
    flaky = Flaky(AskedToWait(60))
    with pytest.raises(RetriesExhaustedError, match="server asked to wait 60s, past the 10s"):
        await policy(time, deadline=10.0).run(flaky, operation="chat")
    assert time.sleeps == [] and flaky.calls == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2, 2.0),
        (-5, 0.0),
        (float("nan"), None),
        ("7", None),
        (None, None),
        (True, None),
        (1e12, 86400.0),
    ],
)
def test_retry_after_is_bounded_and_checked(value: object, expected: float | None) -> None:
    assert retry_after_of(AskedToWait(value)) == expected


async def test_an_open_circuit_makes_the_retry_wait_until_the_trial() -> None:
    time = FakeTime()
    breaker = CircuitBreaker("svc", failures=1, reset_after=5.0, clock=time.clock)
    flaky = Flaky(OSError("down"))
    retry = policy(time, first=0.1, jitter=0.0, deadline=None)
    assert await retry.run(lambda: breaker.call(flaky), operation="svc") == "ok"
    # OSError opens the circuit; the refusal says 5 s; the trial call succeeds and closes it
    assert time.sleeps == [0.1, pytest.approx(4.9)]
    assert breaker.state == "closed" and flaky.calls == 2


# -- circuit breaker ---------------------------------------------------------------------------


def recorder() -> tuple[list[tuple[str, str, str]], Callable[[str, str, str], None]]:
    changes: list[tuple[str, str, str]] = []
    return changes, lambda name, old, new: changes.append((name, old, new))


async def fail() -> str:
    raise OSError("boom")


async def succeed() -> str:
    return "ok"


async def test_breaker_opens_after_n_failures_in_a_row_and_refuses() -> None:
    time = FakeTime()
    changes, on_change = recorder()
    breaker = CircuitBreaker("m", failures=3, reset_after=10, on_change=on_change, clock=time.clock)
    for _ in range(2):
        with pytest.raises(OSError):
            await breaker.call(fail)
    await breaker.call(succeed)  # a success resets the count
    for _ in range(3):
        assert breaker.state == "closed"
        with pytest.raises(OSError):
            await breaker.call(fail)
    assert breaker.state == "open" and changes == [("m", "closed", "open")]
    time.now += 4
    called = Flaky()
    with pytest.raises(CircuitOpenError, match="circuit 'm' is open after 3 failures") as refused:
        await breaker.call(called)
    assert called.calls == 0 and refused.value.retry_after == pytest.approx(6.0)
    assert refused.value.retryable


async def test_half_open_after_reset_closes_on_success() -> None:
    time = FakeTime()
    changes, on_change = recorder()
    breaker = CircuitBreaker("m", failures=1, reset_after=10, on_change=on_change, clock=time.clock)
    with pytest.raises(OSError):
        await breaker.call(fail)
    time.now += 10
    assert breaker.state == "half-open"
    assert await breaker.call(succeed) == "ok"
    assert breaker.state == "closed" and breaker.failed == 0
    assert [c[1:] for c in changes] == [
        ("closed", "open"),
        ("open", "half-open"),
        ("half-open", "closed"),
    ]


async def test_half_open_reopens_on_failure_for_another_reset_period() -> None:
    time = FakeTime()
    changes, on_change = recorder()
    breaker = CircuitBreaker("m", failures=2, reset_after=5, on_change=on_change, clock=time.clock)
    for _ in range(2):
        with pytest.raises(OSError):
            await breaker.call(fail)
    time.now += 5
    with pytest.raises(OSError):
        await breaker.call(fail)  # the trial fails
    assert breaker.state == "open"
    time.now += 4.9
    with pytest.raises(CircuitOpenError):
        await breaker.call(succeed)
    time.now += 0.1
    assert await breaker.call(succeed) == "ok"
    assert [c[2] for c in changes] == ["open", "half-open", "open", "half-open", "closed"]


async def test_half_open_lets_only_its_trial_calls_through() -> None:
    time = FakeTime()
    breaker = CircuitBreaker("m", failures=1, reset_after=1, half_open_calls=1, clock=time.clock)
    with pytest.raises(OSError):
        await breaker.call(fail)
    time.now += 1
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "ok"

    trial = asyncio.create_task(breaker.call(slow))
    await asyncio.sleep(0)
    with pytest.raises(CircuitOpenError, match="half-open after 1 failures; its trial calls"):
        await breaker.call(succeed)
    gate.set()
    assert await trial == "ok" and breaker.state == "closed"


async def test_errors_the_breaker_does_not_count_pass_through() -> None:
    breaker = CircuitBreaker("m", failures=1, counts=lambda e: isinstance(e, OSError))
    with pytest.raises(KeyError):
        await breaker.call(Flaky(KeyError("mine")))
    assert breaker.state == "closed" and breaker.failed == 0


async def test_a_failing_on_change_never_breaks_the_call() -> None:
    def broken(name: str, old: str, new: str) -> None:
        raise RuntimeError("listener broke")

    breaker = CircuitBreaker("m", failures=1, on_change=broken)
    with pytest.raises(OSError, match="boom"):
        await breaker.call(fail)
    assert breaker.state == "open"


# -- in-process token bucket -------------------------------------------------------------------


async def test_bucket_grants_the_burst_at_once_then_the_rate() -> None:
    time = FakeTime()
    limiter = RateLimiter(rate=10, burst=5, clock=time.clock, sleep=time.sleep)
    for _ in range(5):
        await limiter.acquire()
    assert time.sleeps == []  # the burst costs no wait
    assert not limiter.try_acquire()
    start = time.now
    for _ in range(20):
        await limiter.acquire()
    assert time.now - start == pytest.approx(2.0)  # 20 tokens at 10/s
    time.now += 100  # a long pause refills to the burst, no more
    assert limiter.tokens == 5.0


async def test_bucket_serves_waiters_in_order_and_multi_token_asks() -> None:
    time = FakeTime()
    limiter = RateLimiter(rate=2, burst=4, clock=time.clock, sleep=time.sleep)
    await limiter.acquire(4)
    order: list[str] = []

    async def take(name: str, tokens: int) -> None:
        await limiter.acquire(tokens)
        order.append(name)

    await asyncio.gather(take("a", 3), take("b", 1), take("c", 2))
    assert order == ["a", "b", "c"]
    assert time.now - 1000.0 == pytest.approx(3.0)  # 6 tokens at 2/s
    with pytest.raises(RateLimitExceededError, match="5 tokens asked at once, but its bucket"):
        await limiter.acquire(5)


async def test_bucket_counts_over_a_real_window_stay_under_rate_times_time_plus_burst() -> None:
    loop = asyncio.get_running_loop()
    limiter = RateLimiter(rate=200, burst=10)
    granted = 0
    started = loop.time()
    while loop.time() - started < 0.3:
        await limiter.acquire()
        granted += 1
    elapsed = loop.time() - started
    assert granted <= 10 + 200 * elapsed + 1
    assert granted >= 10  # the burst at least


@pytest.mark.parametrize(
    ("rate", "burst", "field"), [(0, 1, "rate"), (1, 0, "burst"), (float("inf"), 1, "rate")]
)
def test_a_bucket_that_cannot_work_is_refused(rate: float, burst: int, field: str) -> None:
    with pytest.raises(ReliabilityConfigError, match=f"rate limiter: {field}="):
        RateLimiter(rate, burst)
