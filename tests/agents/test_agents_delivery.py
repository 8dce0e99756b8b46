"""Agent delivery on a real server: addressing, competing consumers, topics, dead letters."""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec
import pytest
from messages import payload, stored
from nats.aio.client import Client

from newfuse.agents import Agent, AgentClient, AgentId, Context
from newfuse.errors import HandlerRegistrationError, InvalidNameError
from newfuse.nats import MessageStreamSpec, Subjects, headers
from support import wait_for


class Greet(msgspec.Struct, frozen=True):
    name: str


async def test_a_typed_handler_gets_its_payload_struct_and_each_address_reaches_its_instances(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    seen: list[tuple[str, str]] = []
    greeter = Agent("greeter", topics=("news",))

    @greeter.handler("greet")
    async def greet(ctx: Context, hello: Greet) -> None:
        assert isinstance(hello, Greet)
        seen.append((ctx.consumer, hello.name))

    async with (
        greeter.run(nc, key="a", prefix=prefix, stream=stream),
        greeter.run(nc, key="b", prefix=prefix, stream=stream),
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        await client.send(AgentId("greeter", "b"), "greet", Greet("to-b"))
        await client.send("greeter", "greet", {"name": "to-any"})
        await client.publish("news", "greet", {"name": "to-topic"})

        async def three() -> bool:
            return len(seen) == 3

        await wait_for(three)
    assert sorted(seen) == [
        ("greeter", "to-any"),
        ("greeter", "to-topic"),
        ("greeter__b", "to-b"),
    ]


async def test_instances_of_one_type_share_the_work_and_handle_each_message_once(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    by_instance: Counter[str] = Counter()
    handled: Counter[int] = Counter()
    worker = Agent("worker", concurrency=4)

    @worker.handler("job")
    async def job(ctx: Context, body: dict[str, int]) -> None:
        handled[body["n"]] += 1
        by_instance[ctx._runtime.agent_id.key] += 1
        await asyncio.sleep(0.005)  # long enough that one instance cannot take everything

    async with AgentClient(nc, prefix=prefix, stream=stream) as client:
        async with (
            worker.run(nc, key="1", prefix=prefix, stream=stream),
            worker.run(nc, key="2", prefix=prefix, stream=stream),
            worker.run(nc, key="3", prefix=prefix, stream=stream),
        ):
            await asyncio.gather(*(client.send("worker", "job", {"n": n}) for n in range(150)))

            async def all_handled() -> bool:
                return len(handled) == 150

            await wait_for(all_handled)
    assert set(handled.values()) == {1}
    assert set(by_instance) == {"1", "2", "3"}, by_instance


async def test_a_failing_handler_is_redelivered_with_backoff_then_dead_lettered_with_its_error(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    attempts: list[int] = []
    flaky = Agent("flaky", max_attempts=3, backoff=(0.05, 0.2))

    @flaky.handler("boom")
    async def boom(ctx: Context, body: dict[str, object]) -> None:
        attempts.append(ctx.attempt)
        raise ValueError("the model refused")

    subjects = Subjects(prefix)
    async with (
        flaky.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        message_id = await client.send("flaky", "boom", {})

        async def dead() -> bool:
            return running.dead_lettered == 1

        await wait_for(dead)
    assert attempts == [1, 2, 3]
    (letter,) = await stored(nc, prefix, subjects.dead_letters("flaky"))
    dead_letter = payload(letter)
    assert (dead_letter.message_id, dead_letter.message_type) == (message_id, "boom")
    assert (dead_letter.attempts, dead_letter.error) == (3, "ValueError: the model refused")
    assert dead_letter.subject == subjects.agent_type("flaky")


async def test_a_non_retryable_error_and_an_unknown_type_are_dead_lettered_at_once(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    strict = Agent("strict", max_attempts=5)

    @strict.handler("typed")
    async def typed(ctx: Context, hello: Greet) -> None:
        raise AssertionError("never reached: the payload does not convert")

    async with (
        strict.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        await client.send("strict", "typed", {"name": 42})
        await client.send("strict", "untyped", {})

        async def both() -> bool:
            return running.dead_lettered == 2

        await wait_for(both)
    letters = [
        payload(e) for e in await stored(nc, prefix, Subjects(prefix).dead_letters("strict"))
    ]
    by_type = {d.message_type: d for d in letters}
    assert {t: d.attempts for t, d in by_type.items()} == {"typed": 1, "untyped": 1}
    assert "InvalidPayloadError" in by_type["typed"].error
    assert "Expected `str`, got `int`" in by_type["typed"].error
    assert "has no handler for 'untyped' (it handles typed)" in by_type["untyped"].error


async def test_a_body_that_is_not_a_message_is_dead_lettered_with_its_position_and_nothing_stops(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    got: list[str] = []
    sturdy = Agent("sturdy")

    @sturdy.handler("ok")
    async def ok(ctx: Context, hello: Greet) -> None:
        got.append(hello.name)

    subjects = Subjects(prefix)
    js = nc.jetstream()
    async with (
        sturdy.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        hostile = [b"not json", b"[" * 200 + b"]" * 200, b'{"id": "x"}']
        positions = [
            (
                await js.publish(
                    subjects.agent_type("sturdy"), body, headers={headers.MSG_ID: str(i)}
                )
            ).seq
            for i, body in enumerate(hostile)
        ]
        await client.send("sturdy", "ok", Greet("after"))

        async def done() -> bool:
            return got == ["after"] and running.dead_lettered == 3

        await wait_for(done)
    stored_letters = await stored(nc, prefix, subjects.dead_letters("sturdy"))
    # Handlers run concurrently: the letters are stored in the order their handling ended.
    letters = sorted((payload(e) for e in stored_letters), key=lambda d: d.position)
    assert [d.position for d in letters] == positions
    assert all(f"at position {d.position}" in d.error for d in letters)
    assert "nests 200 deep" in letters[1].error


def test_handlers_and_names_are_checked_when_declared() -> None:
    agent = Agent("checked")

    @agent.handler("a")
    async def first(ctx: Context, body: dict[str, object]) -> None: ...

    with pytest.raises(HandlerRegistrationError, match="'a': it has a handler already"):
        agent.handler("a")(first)
    with pytest.raises(HandlerRegistrationError, match="takes 1 parameters"):

        @agent.handler("b")
        async def one(ctx: Context) -> None: ...

    with pytest.raises(HandlerRegistrationError, match="not an `async def`"):

        @agent.handler("c")
        def sync(ctx: Context, body: dict[str, object]) -> None: ...

    with pytest.raises(InvalidNameError, match="reserved for the runtime"):
        Agent("_topic")
    with pytest.raises(InvalidNameError, match="names a consumer"):
        AgentId.parse("a/b/c")
