"""The HTTP provider's calls go through a rate limiter, a circuit breaker and a retry policy
(the API of newfuse.reliability: `acquire()`, `call(fn)`, `run(fn, operation=, retryable=)`),
against the loopback server failing on purpose.

newfuse.reliability is on another branch; until it is on main these small implementations of
its three methods stand in for it (what is tested is the provider's side: what it passes, in
which order, what it retries).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from newfuse.agents.models import ChatMessage, OpenAICompatibleProvider, collect
from newfuse.errors import ModelRequestError, ModelUnavailableError
from openai_server import Failure, OpenAIServer

T = TypeVar("T")
HELLO = [ChatMessage(role="user", content="hi")]


class Attempts:
    """A retry policy of `attempts` tries with no wait, keeping the waits asked for."""

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts
        self.asked: list[float | None] = []
        self.operations: list[str] = []

    async def run(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        operation: str,
        retryable: Callable[[BaseException], bool] | None = None,
    ) -> T:
        self.operations.append(operation)
        for attempt in range(1, self.attempts + 1):
            try:
                return await fn()
            except Exception as error:
                if retryable is None or not retryable(error) or attempt == self.attempts:
                    raise
                self.asked.append(getattr(error, "retry_after", None))
        raise AssertionError("unreachable")


class OpenAfter:
    """A breaker that opens after `failures` failures in a row and then refuses calls."""

    class Open(Exception):
        pass

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.failed = 0
        self.calls = 0

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self.failed >= self.failures:
            raise OpenAfter.Open("circuit open")
        self.calls += 1
        try:
            result = await fn()
        except Exception:
            self.failed += 1
            raise
        self.failed = 0
        return result


class Counter:
    """A limiter that lets everything through and counts."""

    def __init__(self) -> None:
        self.acquired = 0

    async def acquire(self) -> None:
        self.acquired += 1


@pytest.fixture
async def server() -> AsyncIterator[OpenAIServer]:
    async with OpenAIServer() as running:
        yield running


@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "stream"])
async def test_failures_are_retried_through_limiter_and_breaker_with_retry_after(
    server: OpenAIServer, streamed: bool
) -> None:
    retry, breaker, limiter = Attempts(4), OpenAfter(5), Counter()
    server.fail(Failure(status=429, retry_after="3"))
    server.fail(Failure(status=503))
    async with OpenAICompatibleProvider(
        server.url, retry=retry, breaker=breaker, limiter=limiter
    ) as provider:
        if streamed:
            result = await collect(provider.stream(HELLO, model="m"))
        else:
            result = await provider.chat(HELLO, model="m")
    assert result.content == "m says: hi"
    assert len(server.requests) == 3
    assert limiter.acquired == 3 and breaker.calls == 3
    assert retry.asked == [3.0, None]
    verb = "stream from" if streamed else "chat with"
    assert retry.operations == [f"{verb} 'm' at {server.url}/chat/completions"]


async def test_a_refusal_is_not_retried(server: OpenAIServer) -> None:
    retry = Attempts(4)
    server.fail(Failure(status=400, body=b'{"error": {"message": "bad"}}'))
    async with OpenAICompatibleProvider(server.url, retry=retry) as provider:
        with pytest.raises(ModelRequestError, match="HTTP 400"):
            await provider.chat(HELLO, model="m")
    assert len(server.requests) == 1 and retry.asked == []


async def test_the_breaker_opens_on_a_failing_server_and_stops_calling_it(
    server: OpenAIServer,
) -> None:
    breaker = OpenAfter(3)
    server.fail(Failure(status=500), times=10)
    async with OpenAICompatibleProvider(server.url, breaker=breaker) as provider:
        for _ in range(3):
            with pytest.raises(ModelUnavailableError):
                await provider.chat(HELLO, model="m")
        with pytest.raises(OpenAfter.Open):
            await provider.chat(HELLO, model="m")
    assert len(server.requests) == 3
