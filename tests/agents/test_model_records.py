"""`model.invoked` records on the message stream: from a handler (an effect, exactly once, a
redelivery answered from the record) and from a ModelRecorder outside handlers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from messages import payload, settled, stored
from nats.aio.client import Client
from nats.aio.msg import Msg

from newfuse.agents import Agent, AgentClient, Context, RunningAgent
from newfuse.agents.history import History
from newfuse.agents.models import (
    ChatMessage,
    ModelInvoked,
    ModelRecorder,
    OpenAICompatibleProvider,
    input_hash,
    params_hash,
)
from newfuse.agents.wire import derived_id
from newfuse.errors import (
    ModelError,
    ModelRecordError,
    ModelUnavailableError,
    StoreUnavailableError,
)
from newfuse.nats import MessageStreamSpec, Subjects
from openai_server import FINGERPRINT, Failure, OpenAIServer, response_model
from support import new_prefix, wait_for


@pytest.fixture
async def server() -> AsyncIterator[OpenAIServer]:
    async with OpenAIServer() as running:
        yield running


@pytest.fixture
async def provider(server: OpenAIServer) -> AsyncIterator[OpenAICompatibleProvider]:
    async with OpenAICompatibleProvider(server.url, timeout=5.0) as p:
        yield p


def asking_agent(provider: OpenAICompatibleProvider) -> Agent:
    agent = Agent("asker", ack_wait=1.0)

    @agent.handler("ask")
    async def ask(ctx: Context, body: dict[str, str]) -> dict[str, str]:
        prompt = [ChatMessage(role="user", content=body["q"])]
        first = await ctx.chat(provider, prompt, model="gpt-x", params={"seed": 1})
        model = ctx.model(provider)
        second = await model.chat(
            [*prompt, ChatMessage(role="user", content="again")], model="gpt-y"
        )
        try:
            await model.chat(prompt, model="gpt-z")
        except ModelError as error:  # a failed call caught is recorded with its error
            return {"a": first.content or "", "b": second.content or "", "error": str(error)}
        return {"a": first.content or "", "b": second.content or ""}

    return agent


def one_call_agent(provider: OpenAICompatibleProvider, runs: list[str]) -> Agent:
    """An agent whose handler makes one model call; `runs` gets each run's message id."""
    agent = Agent("asker", ack_wait=1.0)

    @agent.handler("ask")
    async def ask(ctx: Context, body: dict[str, str]) -> dict[str, str]:
        runs.append(ctx.envelope.id)
        answer = await ctx.chat(
            provider, [ChatMessage(role="user", content=body["q"])], model="gpt-x"
        )
        return {"a": answer.content or ""}

    return agent


class LosesFirstAcks(RunningAgent):
    """An instance whose first ack of each message is lost: the message comes back."""

    lost: set[int]

    async def _ack(self, msg: Msg) -> None:
        position = msg.metadata.sequence.stream
        if position not in self.lost:
            self.lost.add(position)
            return
        await super()._ack(msg)


async def records(nc: Client, prefix: str) -> list[ModelInvoked]:
    found = []
    for envelope in await stored(nc, prefix, Subjects(prefix).all_models):
        invoked = payload(envelope)
        assert isinstance(invoked, ModelInvoked)
        found.append(invoked)
    return found


async def test_a_handlers_model_calls_are_recorded_as_its_effects(
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    server: OpenAIServer,
    provider: OpenAICompatibleProvider,
) -> None:
    server.fail_at[3] = Failure(status=503, retry_after="2")  # the handler's third call
    agent = asking_agent(provider)
    async with (
        agent.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        reply = await client.request("asker", "ask", {"q": "where is Lima"}, context_id="conv-1")
        await settled(nc, prefix, "asker")
        assert running.handled == 1
    assert reply.payload["a"] == "gpt-x says: where is Lima"
    assert "HTTP 503" in reply.payload["error"]
    found = await records(nc, prefix)
    assert [(r.call, r.request_model, r.outcome) for r in found] == [
        (0, "gpt-x", "ok"),
        (1, "gpt-y", "ok"),
        (2, "gpt-z", "error"),
    ]
    first = found[0]
    request = next(e for e in await stored(nc, prefix, Subjects(prefix).agent_type("asker")))
    assert first.agent == "asker/1"
    assert first.correlation == request.id
    assert first.context_id == "conv-1"
    assert first.provider == "openai"
    assert (first.response_model, first.revision) == (response_model("gpt-x"), FINGERPRINT)
    assert (first.input_tokens, first.output_tokens) == (3, 5)
    assert first.params == {"seed": 1}
    assert first.params_hash == params_hash("gpt-x", {"seed": 1}, None)
    assert first.input_hash == input_hash([ChatMessage(role="user", content="where is Lima")])
    assert first.content == "gpt-x says: where is Lima"
    assert first.latency_ms > 0
    assert found[2].error_type == "ModelUnavailableError" and found[2].content is None
    envelopes = await stored(nc, prefix, Subjects(prefix).models("asker"))
    assert [e.id for e in envelopes] == [
        derived_id(request.id, "asker", f"model/{call}") for call in range(3)
    ]
    assert {e.stream for e in envelopes} == {"model.asker"}
    # the conversation's history passes over the records (bookkeeping, not turns)
    history = History(nc, prefix=prefix)
    kinds = [turn.kind async for turn in history.turns(context_id="conv-1")]
    assert kinds == ["message", "reply"] and history.skipped == []


async def test_a_redelivered_handler_gets_its_recorded_answers_and_records_once(
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    server: OpenAIServer,
    provider: OpenAICompatibleProvider,
) -> None:
    runs: list[str] = []
    agent = one_call_agent(provider, runs)
    running = agent.run(nc, key="1", prefix=prefix, stream=stream)
    instance = LosesFirstAcks(
        agent, nc, running.agent_id, running.subjects, stream, fast_path=False
    )
    instance.lost = set()
    async with instance, AgentClient(nc, prefix=prefix, stream=stream) as client:
        await client.send("asker", "ask", {"q": "one"})
        await settled(nc, prefix, "asker")
    # the lost ack brings the message back; its handled marker answers it without a run
    assert instance.already_handled == 1 and len(runs) == 1
    assert len(server.requests) == 1
    assert len(await records(nc, prefix)) == 1


async def test_a_handler_run_again_before_its_marker_asks_the_record_not_the_model(
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    server: OpenAIServer,
    provider: OpenAICompatibleProvider,
) -> None:
    agent = one_call_agent(provider, [])

    class DiesBeforeItsMarker(RunningAgent):
        """Stores the effects of the first delivery, then 'dies' before the marker."""

        died = False

        async def _publish(self, subject: str, body: bytes, wire_headers: dict[str, str]) -> None:
            if "._handled." in subject and not self.died:
                self.died = True
                raise ModelUnavailableError(provider="test", url="-", reason="process died")
            await super()._publish(subject, body, wire_headers)

    running = agent.run(nc, key="1", prefix=prefix, stream=stream)
    instance = DiesBeforeItsMarker(
        agent, nc, running.agent_id, running.subjects, stream, fast_path=False
    )
    async with instance, AgentClient(nc, prefix=prefix, stream=stream) as client:
        reply = await client.request("asker", "ask", {"q": "two"}, timeout=30)
        await settled(nc, prefix, "asker")
    assert instance.died and instance.handled == 1
    assert reply.payload == {"a": "gpt-x says: two"}
    assert len(server.requests) == 1  # the second run was answered from the record
    assert len(await records(nc, prefix)) == 1


async def test_a_recorder_outside_handlers_stores_each_call_with_its_outcome(
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    server: OpenAIServer,
    provider: OpenAICompatibleProvider,
) -> None:
    async with ModelRecorder(nc, source="notebook", prefix=prefix) as recorder:
        model = recorder.model(provider, context_id="conv-9")
        await model.chat([ChatMessage(role="user", content="hi")], model="gpt-x")
        server.fail(Failure(status=429, retry_after="1"))
        with pytest.raises(ModelUnavailableError):
            await model.chat([ChatMessage(role="user", content="hi")], model="gpt-x")
    found = await records(nc, prefix)
    assert [(r.agent, r.outcome, r.context_id, r.call) for r in found] == [
        ("notebook", "ok", "conv-9", 0),
        ("notebook", "error", "conv-9", 1),
    ]
    assert found[1].error is not None and "HTTP 429" in found[1].error


async def test_a_recorder_that_does_not_wait_stores_every_record_by_close(
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    provider: OpenAICompatibleProvider,
) -> None:
    async with ModelRecorder(
        nc, source="batch", prefix=prefix, wait=False, in_flight=2
    ) as recorder:
        model = recorder.model(provider)
        for n in range(6):
            await model.chat([ChatMessage(role="user", content=f"q{n}")], model="gpt-x")
    assert recorder.failed == []
    found = sorted(await records(nc, prefix), key=lambda r: r.call)  # acks may interleave
    assert [(r.call, r.content) for r in found] == [(n, f"gpt-x says: q{n}") for n in range(6)]


async def test_a_handlers_record_is_stored_while_it_runs_before_its_outcome(
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    provider: OpenAICompatibleProvider,
) -> None:
    go_on = asyncio.Event()
    agent = Agent("asker", ack_wait=5.0)

    @agent.handler("ask")
    async def ask(ctx: Context, body: dict[str, str]) -> dict[str, str]:
        answer = await ctx.chat(provider, [ChatMessage(role="user", content="q")], model="gpt-x")
        await go_on.wait()  # the call returned; its record is on its way meanwhile
        return {"a": answer.content or ""}

    async with (
        agent.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        asked = asyncio.create_task(client.request("asker", "ask", {}, timeout=30))

        async def recorded() -> bool:
            return len(await records(nc, prefix)) == 1

        await wait_for(recorded, timeout=20)  # stored while the handler still waits
        assert await stored(nc, prefix, Subjects(prefix).reply(">")) == []
        go_on.set()
        reply = await asked
        await settled(nc, prefix, "asker")
        assert running.handled == 1
    assert reply.payload == {"a": "gpt-x says: q"}
    assert len(await records(nc, prefix)) == 1


class LosesItsFirstRecord(RunningAgent):
    """An instance whose first model record is refused, as a stream that fails would."""

    refused = 0

    async def _publish(self, subject: str, body: bytes, wire_headers: dict[str, str]) -> None:
        if "._model." in subject and not self.refused:
            self.refused += 1
            raise StoreUnavailableError(operation=f"publish to {subject!r}", reason="on purpose")
        await super()._publish(subject, body, wire_headers)


async def test_a_record_not_stored_fails_the_delivery_and_the_retry_records_the_call(
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    server: OpenAIServer,
    provider: OpenAICompatibleProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[str] = []
    agent = one_call_agent(provider, runs)
    agent.backoff = (0.05, 0.1)
    running = agent.run(nc, key="1", prefix=prefix, stream=stream)
    instance = LosesItsFirstRecord(
        agent, nc, running.agent_id, running.subjects, stream, fast_path=False
    )
    async with instance, AgentClient(nc, prefix=prefix, stream=stream) as client:
        reply = await client.request("asker", "ask", {"q": "three"}, timeout=30)
        await settled(nc, prefix, "asker")
    assert instance.refused == 1 and instance._records.failures == 1
    assert len(runs) == 2  # the first outcome was not committed: no reply, no marker
    assert len(server.requests) == 2  # nothing recorded to answer the retry from
    assert reply.payload == {"a": "gpt-x says: three"}
    assert len(await stored(nc, prefix, Subjects(prefix).reply(">"))) == 1
    assert [r.call for r in await records(nc, prefix)] == [0]
    assert "the record of model call 0 was not stored" in caplog.text


async def test_a_clean_stop_stores_the_records_of_a_handler_it_cancels(
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    provider: OpenAICompatibleProvider,
) -> None:
    called = asyncio.Event()
    agent = Agent("asker", ack_wait=5.0)

    @agent.handler("ask")
    async def ask(ctx: Context, body: dict[str, str]) -> None:
        for n in range(3):
            await ctx.chat(provider, [ChatMessage(role="user", content=f"q{n}")], model="gpt-x")
        called.set()
        await asyncio.sleep(60)  # still running at the stop

    instance = agent.run(nc, key="1", prefix=prefix, stream=stream)
    async with instance, AgentClient(nc, prefix=prefix, stream=stream) as client:
        await client.send("asker", "ask", {})
        await asyncio.wait_for(called.wait(), timeout=20)
        await instance.close(grace=0)  # the handler is cancelled; its records are not lost
    assert sorted(r.call for r in await records(nc, prefix)) == [0, 1, 2]


async def test_a_recorder_whose_records_are_not_stored_says_so_at_close(
    nc: Client, provider: OpenAICompatibleProvider
) -> None:
    nowhere = new_prefix()  # no stream takes its subjects: every record is refused
    recorder = ModelRecorder(nc, source="lost", prefix=nowhere, timeout=2.0)
    async with recorder:
        model = recorder.model(provider)
        answer = await model.chat([ChatMessage(role="user", content="q")], model="gpt-x")
        assert answer.content == "gpt-x says: q"  # the call returned before its record failed
        with pytest.raises(ModelRecordError, match=r"1 record\(s\) lost"):
            await recorder.flush()
        await model.chat([ChatMessage(role="user", content="q")], model="gpt-x")
        with pytest.raises(ModelRecordError, match=r"1 record\(s\) lost"):
            await recorder.close()
    assert len(recorder.failed) == 2
