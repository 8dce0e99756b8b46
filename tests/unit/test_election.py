"""ride_out: a retryable failure is retried under one deadline, then ElectionTimeoutError; a
permanent one is raised at once; each attempt waits a little longer for its answer."""

from __future__ import annotations

import asyncio

import pytest

from newfuse.errors import ElectionTimeoutError, FuseError, StoreUnavailableError, StreamConfigError
from newfuse.nats.election import FIRST_ATTEMPT_WAIT, ride_out


async def test_retryable_failures_are_ridden_out_until_a_success() -> None:
    waits: list[float] = []
    retried: list[FuseError] = []

    async def step(wait: float) -> str:
        waits.append(wait)
        if len(waits) < 3:
            raise StoreUnavailableError(operation="append", reason="no stream leader")
        return "stored"

    loop = asyncio.get_running_loop()
    found = await ride_out(
        step, operation="append", deadline=loop.time() + 5, timeout=5, on_retry=retried.append
    )
    assert found == "stored" and len(retried) == 2
    assert waits == [FIRST_ATTEMPT_WAIT, 2 * FIRST_ATTEMPT_WAIT, 4 * FIRST_ATTEMPT_WAIT]


async def test_past_the_deadline_the_caller_gets_a_retryable_election_timeout() -> None:
    async def step(wait: float) -> None:
        raise StoreUnavailableError(operation="append", reason="no stream leader")

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(
        ElectionTimeoutError, match=r"append to 'a\.b'.*no stream leader; still so after .*FUSE_"
    ) as caught:
        await ride_out(step, operation="append to 'a.b'", deadline=started + 0.3, timeout=5)
    assert caught.value.retryable and caught.value.attempts >= 3
    assert 0.3 <= loop.time() - started < 1.0


async def test_a_permanent_error_is_raised_at_once() -> None:
    calls = 0

    async def step(wait: float) -> None:
        nonlocal calls
        calls += 1
        raise StreamConfigError(stream="S", field="storage", wanted="file", actual="memory")

    loop = asyncio.get_running_loop()
    with pytest.raises(StreamConfigError):
        await ride_out(step, operation="provision", deadline=loop.time() + 5, timeout=5)
    assert calls == 1
