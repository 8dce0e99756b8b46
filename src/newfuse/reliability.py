"""Reliability on the edges: a retry policy, a circuit breaker and token-bucket rate limiters.

A leaf module: it imports nothing of newfuse but `errors`, so every layer may use it (the
projection runner's backoff, agent-to-agent requests, model providers). Redis is reached
through the client passed in (`redis.asyncio.Redis`), never imported here.

Written here rather than taken from tenacity, aiobreaker or aiolimiter: each piece is a page,
the retry policy needs one deadline across attempts that also bounds the attempt running and
honours a `retry_after` the error carries (both custom hooks in tenacity), the breaker's state
changes must reach our event store (a callback), and the shared limiter is a Redis script that
none of them has. Time and sleep are injectable, so the tests drive them without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, TypeVar

from newfuse.errors import (
    CircuitOpenError,
    FuseError,
    RateLimitExceededError,
    ReliabilityConfigError,
    RetriesExhaustedError,
)

T = TypeVar("T")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
CircuitState = Literal["closed", "open", "half-open"]

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half-open"

log = logging.getLogger(__name__)

_LONGEST_RETRY_AFTER = 24 * 3600.0
"""A `retry_after` beyond a day is taken as a day (a hostile or broken header must not park a
caller for ever; without a deadline, that is the longest wait)."""


def _positive(what: str, field: str, value: float, *, zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        need = "a finite number >= 0" if zero else "a finite number > 0"
        raise ReliabilityConfigError(what=what, field=field, value=value, reason=f"must be {need}")


def backoff(attempt: int, *, first: float, most: float, multiplier: float = 2.0) -> float:
    """Exponential backoff without jitter: after `attempt` failed tries (>= 1), `first` times
    `multiplier` ** (attempt - 1), at most `most` (never an overflow, however many attempts)."""
    try:
        grown = first * multiplier ** max(attempt - 1, 0)
    except OverflowError:
        return most
    return min(most, grown)


def default_retryable(error: BaseException) -> bool:
    """What the retry policy retries unless told otherwise: a FuseError when it says it is
    retryable, an OSError (connection refused, reset) and a TimeoutError; nothing else."""
    if isinstance(error, FuseError):
        return error.retryable
    return isinstance(error, OSError | TimeoutError)


def retry_after_of(error: BaseException) -> float | None:
    """The wait an error asks for (its `retry_after` attribute, e.g. from an HTTP Retry-After
    header): None when it has none or a value that is no number; below 0 is 0; at most a day."""
    value = getattr(error, "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return min(max(float(value), 0.0), _LONGEST_RETRY_AFTER)


def _describe(error: BaseException) -> str:
    text = str(error)
    name = type(error).__name__
    if not text:
        return name
    return f"{name}: {text[:300]}" + ("..." if len(text) > 300 else "")


class RetryPolicy:
    """Retries an async operation with exponential backoff and jitter, within one deadline.

    Args:
        attempts: tries in all, the first included (>= 1).
        first: seconds of the backoff after the first failure, before jitter.
        most: the longest backoff, before jitter.
        deadline: seconds for all attempts and waits together (None: only `attempts` bounds
            it). It also bounds the attempt running: one still running at the deadline is
            cancelled.
        jitter: the share of each backoff that is random: 1.0 is "full jitter" (uniform in
            [0, backoff]), 0.0 none (exactly the backoff).
        multiplier: each backoff is the previous one times this (>= 1).
        clock, sleep, random: injectable for tests (monotonic seconds, asyncio.sleep, a float
            in [0, 1)).
    """

    def __init__(
        self,
        *,
        attempts: int = 5,
        first: float = 0.1,
        most: float = 10.0,
        deadline: float | None = 30.0,
        jitter: float = 1.0,
        multiplier: float = 2.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        random: Callable[[], float] = random.random,
    ) -> None:
        what = "retry policy"
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ReliabilityConfigError(
                what=what, field="attempts", value=attempts, reason="must be an integer >= 1"
            )
        _positive(what, "first", first, zero=True)
        _positive(what, "most", most, zero=True)
        if deadline is not None:
            _positive(what, "deadline", deadline)
        if not 0.0 <= jitter <= 1.0:
            raise ReliabilityConfigError(
                what=what, field="jitter", value=jitter, reason="must be within [0, 1]"
            )
        if not math.isfinite(multiplier) or multiplier < 1.0:
            raise ReliabilityConfigError(
                what=what, field="multiplier", value=multiplier, reason="must be >= 1"
            )
        self.attempts = attempts
        self.first = first
        self.most = max(first, most)
        self.deadline = deadline
        self.jitter = jitter
        self.multiplier = multiplier
        self._clock = clock
        self._sleep = sleep
        self._random = random

    def backoff(self, attempt: int) -> float:
        """The backoff after `attempt` failed tries (>= 1), before jitter (see `backoff`)."""
        return backoff(attempt, first=self.first, most=self.most, multiplier=self.multiplier)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after `attempt` failed tries (>= 1): the backoff less a random share
        of it (`jitter`), so within [backoff * (1 - jitter), backoff]."""
        backoff = self.backoff(attempt)
        return backoff - self.jitter * self._random() * backoff

    async def run(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        operation: str,
        retryable: Callable[[BaseException], bool] | None = None,
    ) -> T:
        """Await `fn()` until it returns, retrying what `retryable` accepts.

        An error with a `retry_after` (seconds) is retried after that long instead of the
        backoff. When the next wait would end at or past the deadline, the policy gives up at
        once rather than start an attempt with no time left.

        Args:
            fn: makes and awaits one attempt (called anew each time).
            operation: what is tried, for the error ("request to 'researcher'").
            retryable: which errors to retry (default: `default_retryable`); any other is
                raised as it is, at once.

        Raises:
            RetriesExhaustedError: every attempt failed, or the deadline passed; its cause is
                the last error.
        """
        retryable = retryable or default_retryable
        started = self._clock()
        attempt = 0
        while True:
            attempt += 1
            left = None if self.deadline is None else self.deadline - (self._clock() - started)
            try:
                if left is None:
                    return await fn()
                async with asyncio.timeout(left) as scope:
                    return await fn()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if left is not None and scope.expired():
                    raise self._exhausted(
                        operation,
                        attempt,
                        started,
                        error,
                        f"the {self.deadline:g}s deadline passed during the attempt",
                    ) from error
                if not retryable(error):
                    raise
                if attempt >= self.attempts:
                    raise self._exhausted(
                        operation, attempt, started, error, "no attempts left"
                    ) from error
                asked = retry_after_of(error)
                wait = self.delay(attempt) if asked is None else asked
                if self.deadline is not None:
                    left = self.deadline - (self._clock() - started)
                    if wait >= left:
                        why = (
                            f"the server asked to wait {asked:g}s"
                            if asked is not None
                            else (f"the next backoff is {wait:.3g}s")
                        )
                        raise self._exhausted(
                            operation,
                            attempt,
                            started,
                            error,
                            f"{why}, past the {self.deadline:g}s deadline",
                        ) from error
                log.debug(
                    "%s: attempt %d failed (%s); again in %.3gs",
                    operation,
                    attempt,
                    _describe(error),
                    wait,
                )
                await self._sleep(wait)

    def _exhausted(
        self, operation: str, attempts: int, started: float, error: BaseException, reason: str
    ) -> RetriesExhaustedError:
        return RetriesExhaustedError(
            operation=operation,
            attempts=attempts,
            elapsed=self._clock() - started,
            last_error=_describe(error),
            reason=reason,
        )


class CircuitBreaker:
    """Stops calling what keeps failing: closed -> open after `failures` failures in a row;
    open refuses calls (CircuitOpenError) for `reset_after` seconds; then half-open lets
    `half_open_calls` trial calls through: when they all succeed it closes, when one fails it
    opens again.

    Args:
        name: what the circuit guards, in errors and events ("model openai", "agent writer").
        failures: failures in a row that open it (>= 1).
        reset_after: seconds it stays open before a trial.
        half_open_calls: trial calls let through at once when half-open (>= 1).
        on_change: called as on_change(name, old_state, new_state) on every change; an error
            it raises is logged, never raised into the call.
        counts: which errors count as failures (default: every Exception); others pass
            through and count as neither failure nor success.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        name: str,
        *,
        failures: int = 5,
        reset_after: float = 30.0,
        half_open_calls: int = 1,
        on_change: Callable[[str, str, str], None] | None = None,
        counts: Callable[[BaseException], bool] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        what = f"circuit breaker {name!r}"
        for field, value in (("failures", failures), ("half_open_calls", half_open_calls)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ReliabilityConfigError(
                    what=what, field=field, value=value, reason="must be an integer >= 1"
                )
        _positive(what, "reset_after", reset_after, zero=True)
        self.name = name
        self.failures = failures
        self.reset_after = reset_after
        self.half_open_calls = half_open_calls
        self.on_change = on_change
        self._counts = counts or (lambda error: isinstance(error, Exception))
        self._clock = clock
        self._state: CircuitState = CLOSED
        self._failed = 0  # failures in a row
        self._opened_at = 0.0
        self._trials = 0  # trial calls under way (half-open)
        self._passed = 0  # trial calls that succeeded (half-open)

    @property
    def state(self) -> CircuitState:
        """closed, open or half-open (open turns half-open once `reset_after` has passed)."""
        if self._state == OPEN and self._clock() - self._opened_at >= self.reset_after:
            self._move(HALF_OPEN)
        return self._state

    @property
    def failed(self) -> int:
        """Failures in a row so far."""
        return self._failed

    def _move(self, new: CircuitState) -> None:
        old, self._state = self._state, new
        if new == OPEN:
            self._opened_at = self._clock()
        if new != CLOSED:
            self._trials = self._passed = 0
        if self.on_change is not None:
            try:
                self.on_change(self.name, old, new)
            except Exception:
                log.exception("circuit %r: on_change(%s -> %s) failed", self.name, old, new)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await `fn()` unless the circuit is open.

        Raises:
            CircuitOpenError: open, or half-open with every trial call taken (`retry_after`
                says how long until a trial; retryable, so a RetryPolicy waits that long).
        """
        state = self.state
        if state == OPEN:
            left = self.reset_after - (self._clock() - self._opened_at)
            raise CircuitOpenError(
                name=self.name, state=OPEN, failures=self._failed, retry_after=max(left, 0.0)
            )
        trial = state == HALF_OPEN
        if trial:
            if self._trials >= self.half_open_calls:
                raise CircuitOpenError(
                    name=self.name, state=HALF_OPEN, failures=self._failed, retry_after=0.0
                )
            self._trials += 1
        try:
            result = await fn()
        except BaseException as error:
            if trial and self._state == HALF_OPEN:
                self._trials -= 1
            if isinstance(error, Exception) and self._counts(error):
                self._failure()
            raise
        self._success(trial)
        return result

    def _failure(self) -> None:
        self._failed += 1
        if self._state == HALF_OPEN or (self._state == CLOSED and self._failed >= self.failures):
            self._move(OPEN)

    def _success(self, trial: bool) -> None:
        if self._state == HALF_OPEN and trial:
            self._trials -= 1
            self._passed += 1
            if self._passed >= self.half_open_calls:
                self._failed = 0
                self._move(CLOSED)
        elif self._state == CLOSED:
            self._failed = 0


def _check_bucket(what: str, rate: float, burst: int) -> None:
    _positive(what, "rate", rate)
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ReliabilityConfigError(
            what=what, field="burst", value=burst, reason="must be an integer >= 1"
        )


def _check_tokens(what: str, tokens: int, burst: int) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ReliabilityConfigError(
            what=what, field="tokens", value=tokens, reason="must be an integer >= 1"
        )
    if tokens > burst:
        raise RateLimitExceededError(limiter=what, tokens=tokens, burst=burst)


_ROUNDING: Final = 1e-9
"""Tokens short of a whole one that still count as it: a refill computed from float seconds
can land a hair below, and a wait for that hair may not move a clock at all (a busy loop)."""


class RateLimiter:
    """A token bucket in this process: `burst` tokens at most, refilled at `rate` per second.
    Waiters are served in the order they came (one waits at a time, the others queue behind).

    Args:
        rate: tokens added per second (> 0).
        burst: the bucket's size (>= 1), which is also what a quiet limiter grants at once.
        clock, sleep: injectable for tests.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        _check_bucket("rate limiter", rate, burst)
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._at = clock()
        self._turn = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
            self._at = now

    @property
    def tokens(self) -> float:
        """Tokens in the bucket now."""
        self._refill()
        return self._tokens

    def try_acquire(self, tokens: int = 1) -> bool:
        """Take `tokens` if the bucket holds them now (and nobody waits before us)."""
        _check_tokens("in process", tokens, self.burst)
        if self._turn.locked():
            return False
        self._refill()
        if self._tokens >= tokens - _ROUNDING:
            self._tokens -= tokens
            return True
        return False

    async def acquire(self, tokens: int = 1) -> None:
        """Wait until the bucket holds `tokens`, then take them.

        Raises:
            RateLimitExceededError: `tokens` is more than `burst` (it could never be granted).
        """
        _check_tokens("in process", tokens, self.burst)
        async with self._turn:
            while True:
                self._refill()
                if self._tokens >= tokens - _ROUNDING:
                    self._tokens -= tokens
                    return
                await self._sleep((tokens - self._tokens) / self.rate)


_BUCKET_SCRIPT: Final = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1])
local at = tonumber(held[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate)
  at = now
end
local wait = 0
if tokens >= want then
  tokens = tokens - want
else
  wait = (want - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at',
  string.format('%.17g', at))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return string.format('%.17g', wait)
"""
"""The token bucket in one script, so concurrent instances never both take the last token:
refill from the server's clock (one clock for every instance), take or say how long to wait.
The key expires once a full bucket would have refilled: an idle limiter leaves nothing."""


class RedisRateLimiter:
    """The token bucket of `RateLimiter` kept in Redis under `key`, shared by every instance
    that uses the same key (all instances of an agent type, say).

    Args:
        redis: a `redis.asyncio.Redis` client (any client with `register_script`).
        key: the Redis key of the bucket (a hash: tokens, at).
        rate: tokens added per second (> 0).
        burst: the bucket's size (>= 1).
    """

    def __init__(
        self, redis: Any, key: str, rate: float, burst: int, *, sleep: Sleep = asyncio.sleep
    ) -> None:
        _check_bucket(f"rate limiter {key!r}", rate, burst)
        self.key = key
        self.rate = float(rate)
        self.burst = burst
        self._sleep = sleep
        self._script = redis.register_script(_BUCKET_SCRIPT)

    async def _take(self, tokens: int) -> float:
        answer = await self._script(keys=[self.key], args=[repr(self.rate), self.burst, tokens])
        text = answer.decode() if isinstance(answer, bytes) else str(answer)
        try:
            wait = float(text)
        except ValueError:
            wait = math.nan
        if not math.isfinite(wait) or wait < 0:
            raise ReliabilityConfigError(
                what=f"rate limiter {self.key!r}",
                field="script answer",
                value=text[:80],
                reason="the bucket script answered something that is no wait in seconds "
                "(is the key used by something else?)",
            )
        return wait

    async def try_acquire(self, tokens: int = 1) -> bool:
        """Take `tokens` if the shared bucket holds them now."""
        _check_tokens(f"{self.key!r}", tokens, self.burst)
        return await self._take(tokens) == 0.0

    async def acquire(self, tokens: int = 1) -> None:
        """Wait until the shared bucket holds `tokens`, then take them.

        Raises:
            RateLimitExceededError: `tokens` is more than `burst`.
        """
        _check_tokens(f"{self.key!r}", tokens, self.burst)
        while (wait := await self._take(tokens)) > 0.0:
            await self._sleep(wait)
