"""newfuse.reliability on real servers: the breaker against a loopback HTTP server that fails
on purpose (its state changes appended to JetStream), Retry-After from a real 429, and the
Redis token bucket shared by two clients on the session's valkey."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client

from newfuse.agents.circuits import CircuitEvents, circuit_stream
from newfuse.errors import CircuitOpenError, RateLimitExceededError, RetriesExhaustedError
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import connect
from newfuse.reliability import CircuitBreaker, RedisRateLimiter, RetryPolicy
from newfuse.schemas import CircuitChange


class HttpStatusError(ConnectionError):
    """A 5xx or 429 answer; `retry_after` from its Retry-After header."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


class FlakyServer:
    """An HTTP/1.1 server on loopback that answers `status` (503 while failing) and counts
    the requests it got. One request per connection (Connection: close)."""

    def __init__(self) -> None:
        self.status = 200
        self.retry_after: str | None = None
        self.hits = 0
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"GET ")
            self.hits += 1
            body = b"ok" if self.status == 200 else b"failing on purpose"
            extra = f"Retry-After: {self.retry_after}\r\n" if self.retry_after else ""
            writer.write(
                f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(body)}\r\n{extra}"
                f"Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FlakyServer]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self


async def get(port: int) -> str:
    """GET / on loopback; raises HttpStatusError unless 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    if status != 200:
        found = [line.split(":", 1)[1] for line in lines if line.lower().startswith("retry-after")]
        raise HttpStatusError(status, float(found[0]) if found else None)
    return body.decode()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await connect(nats_url, name="reliability-test")
    yield client
    await client.close()


async def test_breaker_opens_on_a_failing_server_refuses_without_calling_and_closes_again(
    nc: Client, prefix: str
) -> None:
    clock = Clock()
    name = f"http loopback {uuid.uuid4().hex[:6]}"
    async with (
        FlakyServer().running() as server,
        JetStreamEventStore(nc, prefix=prefix) as store,
        CircuitEvents(store) as events,
    ):
        breaker = events.watch(CircuitBreaker(name, failures=3, reset_after=30, clock=clock))
        assert await breaker.call(lambda: get(server.port)) == "ok"
        server.status = 503
        for _ in range(3):
            with pytest.raises(HttpStatusError, match="HTTP 503"):
                await breaker.call(lambda: get(server.port))
        assert breaker.state == "open" and server.hits == 4
        for _ in range(5):
            with pytest.raises(CircuitOpenError, match=f"circuit '{name}' is open"):
                await breaker.call(lambda: get(server.port))
        assert server.hits == 4  # refused calls never reached the server

        clock.now += 30
        with pytest.raises(HttpStatusError):  # the trial call fails: open again
            await breaker.call(lambda: get(server.port))
        assert breaker.state == "open" and server.hits == 5

        server.status = 200
        clock.now += 30
        assert breaker.state == "half-open"
        assert await breaker.call(lambda: get(server.port)) == "ok"
        assert breaker.state == "closed" and server.hits == 6
        await events.flush()

        stored = [event async for event in store.read(circuit_stream(name))]
    assert [event.type for event in stored] == [
        "circuit.opened",
        "circuit.half_opened",
        "circuit.opened",
        "circuit.half_opened",
        "circuit.closed",
    ]
    changes = [event.data for event in stored]
    assert all(isinstance(change, CircuitChange) and change.circuit == name for change in changes)
    assert [change.previous for change in changes] == [
        "closed",
        "open",
        "half-open",
        "open",
        "half-open",
    ]
    assert changes[0].failures == 3 and changes[2].failures == 4
    assert events.appended == 5 and events.dropped == 0


async def test_retry_waits_the_retry_after_a_real_server_sends() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        server.status = 200  # the server recovers while we wait

    async with FlakyServer().running() as server:
        server.status, server.retry_after = 429, "7"
        retry = RetryPolicy(attempts=3, first=0.01, deadline=None, sleep=sleep)
        assert await retry.run(lambda: get(server.port), operation="GET /") == "ok"
    assert slept == [7.0] and server.hits == 2


async def test_retry_gives_up_on_a_server_that_keeps_failing_naming_the_last_error() -> None:
    async with FlakyServer().running() as server:
        server.status = 503
        retry = RetryPolicy(attempts=3, first=0.001, most=0.002, deadline=5.0)
        with pytest.raises(RetriesExhaustedError, match=r"GET /: gave up after 3 attempts .*503"):
            await retry.run(lambda: get(server.port), operation="GET /")
    assert server.hits == 3


async def test_the_redis_bucket_is_shared_by_two_clients(redis_url: str, prefix: str) -> None:
    key = f"{prefix}:ratelimit:writer"
    first = aioredis.Redis.from_url(redis_url)
    second = aioredis.Redis.from_url(redis_url)
    try:
        # a rate so slow that nothing refills during the test: the burst is all there is
        a = RedisRateLimiter(first, key, rate=0.001, burst=5)
        b = RedisRateLimiter(second, key, rate=0.001, burst=5)
        granted = [await limiter.try_acquire() for limiter in (a, b) * 5]
        assert granted.count(True) == 5 and granted[:5] == [True] * 5
        assert not await a.try_acquire() and not await b.try_acquire()
        with pytest.raises(RateLimitExceededError, match="6 tokens asked at once"):
            await a.acquire(6)
        assert await first.ttl(key) > 0  # an idle bucket expires
    finally:
        await first.delete(key)
        await first.aclose()
        await second.aclose()


async def test_two_clients_waiting_on_one_redis_bucket_get_the_rate_not_twice_it(
    redis_url: str, prefix: str
) -> None:
    key = f"{prefix}:ratelimit:shared"
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    loop = asyncio.get_running_loop()
    try:
        limiters = [RedisRateLimiter(c, key, rate=20, burst=2) for c in clients]

        async def take(limiter: RedisRateLimiter, count: int) -> None:
            for _ in range(count):
                await limiter.acquire()

        started = loop.time()
        await asyncio.gather(*(take(limiter, 6) for limiter in limiters))
        elapsed = loop.time() - started
    finally:
        await clients[0].delete(key)
        for client in clients:
            await client.aclose()
    # 12 tokens from one bucket of 2 refilled at 20/s take at least (12 - 2) / 20 = 0.5 s by the
    # server's clock, however fast this machine is; two separate buckets would need half that
    print(f"12 tokens in {elapsed:.3f}s")
    assert elapsed >= 0.5 - 0.01


async def test_a_store_that_refuses_circuit_events_never_breaks_the_guarded_call(
    nc: Client, prefix: str
) -> None:
    store = JetStreamEventStore(nc, prefix=prefix)
    await store.close()  # every append now raises StoreClosedError
    async with CircuitEvents(store) as events:
        breaker = events.watch(CircuitBreaker("closed store", failures=1))

        async def boom() -> None:
            raise OSError("down")

        with pytest.raises(OSError, match="down"):
            await breaker.call(boom)
        await events.flush()
    assert breaker.state == "open"
    assert (events.appended, events.dropped) == (0, 1)


def test_circuit_names_become_valid_stream_names() -> None:
    assert circuit_stream("model openai") == "circuit.model-openai"
    assert circuit_stream("agent echo/1") == "circuit.agent-echo-1"
    hashed = circuit_stream("...")
    assert hashed.startswith("circuit.") and len(hashed) == len("circuit.") + 32
