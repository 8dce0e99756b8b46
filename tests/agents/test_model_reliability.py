"""The HTTP provider's calls go through newfuse.reliability's rate limiter, circuit breaker
and retry policy, against the loopback server failing on purpose (429 with Retry-After, 5xx)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from newfuse.agents.models import ChatMessage, OpenAICompatibleProvider, collect
from newfuse.errors import CircuitOpenError, ModelRequestError, ModelUnavailableError
from newfuse.reliability import CircuitBreaker, RateLimiter, RetryPolicy
from openai_server import Failure, OpenAIServer

HELLO = [ChatMessage(role="user", content="hi")]


def retry_policy(waits: list[float]) -> RetryPolicy:
    """Four attempts without jitter; the waits it asks for are kept, not slept."""

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    return RetryPolicy(attempts=4, first=0.25, most=5.0, jitter=0.0, sleep=sleep)


@pytest.fixture
async def server() -> AsyncIterator[OpenAIServer]:
    async with OpenAIServer() as running:
        yield running


@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "stream"])
async def test_failures_are_retried_through_limiter_and_breaker_honouring_retry_after(
    server: OpenAIServer, streamed: bool
) -> None:
    waits: list[float] = []
    limiter = RateLimiter(rate=0.001, burst=10, clock=lambda: 0.0)  # a frozen clock: no refill
    breaker = CircuitBreaker("model", failures=5)
    server.fail(Failure(status=429, retry_after="3"))
    server.fail(Failure(status=503))
    async with OpenAICompatibleProvider(
        server.url, retry=retry_policy(waits), breaker=breaker, limiter=limiter
    ) as provider:
        if streamed:
            result = await collect(provider.stream(HELLO, model="m"))
        else:
            result = await provider.chat(HELLO, model="m")
    assert result.content == "m says: hi"
    assert len(server.requests) == 3
    assert limiter.tokens == 7  # one token per attempt
    assert waits[0] == 3.0  # the Retry-After, not the backoff
    assert len(waits) == 2 and waits[1] != 3.0
    assert breaker.state == "closed"


async def test_a_refusal_is_not_retried(server: OpenAIServer) -> None:
    waits: list[float] = []
    server.fail(Failure(status=400, body=b'{"error": {"message": "bad"}}'))
    async with OpenAICompatibleProvider(server.url, retry=retry_policy(waits)) as provider:
        with pytest.raises(ModelRequestError, match="HTTP 400"):
            await provider.chat(HELLO, model="m")
    assert len(server.requests) == 1 and waits == []


async def test_the_breaker_opens_on_a_failing_server_and_stops_calling_it(
    server: OpenAIServer,
) -> None:
    changes: list[tuple[str, str, str]] = []
    breaker = CircuitBreaker(
        "model", failures=3, reset_after=60.0, on_change=lambda *c: changes.append(c)
    )
    server.fail(Failure(status=500), times=10)
    async with OpenAICompatibleProvider(server.url, breaker=breaker) as provider:
        for _ in range(3):
            with pytest.raises(ModelUnavailableError):
                await provider.chat(HELLO, model="m")
        with pytest.raises(CircuitOpenError):
            await provider.chat(HELLO, model="m")
        with pytest.raises(CircuitOpenError):
            await collect(provider.stream(HELLO, model="m"))
    assert len(server.requests) == 3
    assert breaker.state == "open"
    assert [change[1:] for change in changes] == [("closed", "open")]
