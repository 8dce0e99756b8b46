"""AgentClient.request with a RetryPolicy and a CircuitBreaker, against real agents."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.aio.client import Client

from newfuse.agents import Agent, AgentClient, Context
from newfuse.agents.circuits import CircuitEvents, circuit_stream
from newfuse.errors import CircuitOpenError, RequestFailedError, RequestTimeoutError
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import MessageStreamSpec
from newfuse.reliability import CircuitBreaker, RetryPolicy


def counting_echo() -> tuple[Agent, list[str]]:
    handled: list[str] = []
    echo = Agent("echo", max_attempts=2, backoff=(0.01, 0.02))

    @echo.handler("ping")
    async def ping(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
        handled.append(ctx.message.message_id or "")
        return {"echo": body}

    @echo.handler("explode")
    async def explode(ctx: Context, body: dict[str, Any]) -> None:
        raise ValueError("cannot")

    return echo, handled


async def test_a_retried_request_is_sent_once_and_answered_when_an_instance_starts(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    echo, handled = counting_echo()
    failed_once = asyncio.Event()

    async def sleep(seconds: float) -> None:
        failed_once.set()
        await asyncio.sleep(min(seconds, 0.05))

    retry = RetryPolicy(attempts=20, first=0.05, most=0.05, deadline=30, sleep=sleep)
    async with AgentClient(nc, prefix=prefix, stream=stream) as client:
        request = asyncio.create_task(
            client.request("echo", "ping", {"n": 1}, timeout=0.3, retry=retry)
        )
        await asyncio.wait_for(failed_once.wait(), 10)  # no instance: the first attempt timed out
        async with echo.run(nc, key="1", prefix=prefix, stream=stream):
            reply = await asyncio.wait_for(request, 30)
    assert reply.payload == {"echo": {"n": 1}}
    assert len(handled) == 1  # every attempt sent the same message id: stored once


async def test_requests_through_a_breaker_open_it_refuse_and_close_when_the_agent_is_back(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    now = [0.0]
    echo, _ = counting_echo()
    async with (
        AgentClient(nc, prefix=prefix, stream=stream) as client,
        JetStreamEventStore(nc, prefix=prefix) as store,
        CircuitEvents(store) as events,
    ):
        breaker = events.watch(
            CircuitBreaker("agent echo", failures=2, reset_after=60, clock=lambda: now[0])
        )
        for _ in range(2):
            with pytest.raises(RequestTimeoutError):
                await client.request("echo", "ping", {}, timeout=0.2, breaker=breaker)
        with pytest.raises(CircuitOpenError, match="circuit 'agent echo' is open after 2"):
            await client.request("echo", "ping", {}, timeout=5, breaker=breaker)
        async with echo.run(nc, key="1", prefix=prefix, stream=stream):
            now[0] += 60
            reply = await client.request("echo", "ping", {"n": 2}, timeout=10, breaker=breaker)
            assert reply.payload == {"echo": {"n": 2}} and breaker.state == "closed"
            # an agent that gives up counts as a failure too (and is not retried)
            for _ in range(2):
                with pytest.raises(RequestFailedError, match="cannot"):
                    await client.request(
                        "echo", "explode", {}, timeout=30, breaker=breaker, retry=RetryPolicy()
                    )
            assert breaker.state == "open"
        await events.flush()
        types = [event.type async for event in store.read(circuit_stream("agent echo"))]
    assert types == ["circuit.opened", "circuit.half_opened", "circuit.closed", "circuit.opened"]
