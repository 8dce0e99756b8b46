"""Distributed tracing: one trace follows a request from a client through two agent processes
(each exporting its spans with the SDK's in-memory exporter), and a consumer never trusts the
trace context a foreign client sent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from messages import settled
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from newfuse.agents import Agent, AgentClient, Context, wire
from newfuse.nats import DirectGet, MessageStreamSpec, Subjects
from newfuse.schemas import ENVELOPE_DECODER, A2AMessage, A2AMetadata, TraceContext
from support import wait_for

WORKER = Path(__file__).with_name("tracing_worker.py")
SPANS_FILE = "NEWFUSE_TEST_SPANS_FILE"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> Iterator[trace.Tracer]:
    provider = TracerProvider()  # this test's own: the global provider is left alone
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test")
    provider.shutdown()


def parent_of(traceparent: str) -> tuple[str, str]:
    """(trace id, span id) a W3C traceparent names."""
    _, trace_id, span_id, _ = traceparent.split("-")
    return trace_id, span_id


def ids(span: ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


async def raw_stored(nc: Client, prefix: str, subject: str) -> list[Msg]:
    """The messages stored on `subject`, headers and all."""
    direct = DirectGet(nc, Subjects(prefix).message_stream_name, timeout=5.0)
    return [msg async for msg in direct.messages(subject, "test read")]


def carried(msg: Msg) -> tuple[str, str]:
    """The parent a stored message names, from its header; its envelope must say the same."""
    assert msg.headers is not None and "traceparent" in msg.headers, msg.headers
    envelope = ENVELOPE_DECODER.decode(msg.data)
    assert envelope.trace is not None
    assert envelope.trace.traceparent == msg.headers["traceparent"]
    return parent_of(msg.headers["traceparent"])


class Worker:
    def __init__(self, process: subprocess.Popen[str], spans: Path) -> None:
        self.process = process
        self.spans_file = spans

    def stop(self) -> list[dict[str, Any]]:
        """SIGTERM; the process writes its finished spans and exits."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=30) == 0
        return list(json.loads(self.spans_file.read_text()))


@pytest.fixture
async def workers(
    nats_url: str, prefix: str, stream: MessageStreamSpec, tmp_path: Path
) -> AsyncIterator[dict[str, Worker]]:
    started: dict[str, Worker] = {}
    try:
        for role in ("front", "back"):
            spans = tmp_path / f"{role}.spans.json"
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), SPANS_FILE: str(spans)}
            process = subprocess.Popen(
                [sys.executable, str(WORKER), nats_url, prefix, role],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            started[role] = Worker(process, spans)
            assert process.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=30)
            assert line.strip() == "ready", line
        yield started
    finally:
        for worker in started.values():
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(timeout=10)
            if worker.process.stdout is not None:
                worker.process.stdout.close()


async def test_one_trace_follows_a_request_from_the_client_through_two_agent_processes(
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    workers: dict[str, Worker],
    tracer: trace.Tracer,
    exporter: InMemorySpanExporter,
) -> None:
    subjects = Subjects(prefix)
    async with AgentClient(nc, prefix=prefix, stream=stream, tracer=tracer) as client:
        with tracer.start_as_current_span("user asks") as asking:
            reply = await client.request("front", "plan", {"n": 1}, context_id="conv-1")
        with tracer.start_as_current_span("user calls") as calling:
            fast = await client.call("front", "plan", {"n": 2})
    assert reply.payload == {"planned": 1} and fast.payload == {"planned": 2}

    async def both_tasks_completed() -> bool:
        statuses = await raw_stored(nc, prefix, subjects.all_task_events)
        return len(statuses) == 4  # per task: the message received, then its status

    await wait_for(both_tasks_completed, timeout=30)
    await settled(nc, prefix, "back")
    front_spans, back_spans = workers["front"].stop(), workers["back"].stop()
    ours = exporter.get_finished_spans()

    # The client: a PRODUCER span per request/call, child of the span current when asked.
    asked_trace, asked_span = ids(asking)
    request = next(s for s in ours if s.name == "send a2a.front" and ids(s)[0] == asked_trace)
    assert request.kind is trace.SpanKind.PRODUCER
    assert request.parent is not None and f"{request.parent.span_id:016x}" == asked_span
    [sent] = await raw_stored(nc, prefix, subjects.agent_type("front"))
    assert carried(sent) == ids(request)  # header and envelope name the producer span
    assert dict(request.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": subjects.agent_type("front"),
        "messaging.message.id": ENVELOPE_DECODER.decode(sent.data).id,
        "messaging.message.conversation_id": "conv-1",
        "newfuse.message.type": "plan",
    }

    # Agent A (another process): a CONSUMER span whose parent is the client's span.
    [handled_a] = [s for s in front_spans if s["trace_id"] == asked_trace]
    assert handled_a["name"] == "process front" and handled_a["kind"] == "CONSUMER"
    assert handled_a["parent_id"] == ids(request)[1]
    assert handled_a["status"] == "UNSET"
    attributes = handled_a["attributes"]
    assert attributes == {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": subjects.agent_type("front"),
        "messaging.consumer.group.name": "front",
        "messaging.message.id": ENVELOPE_DECODER.decode(sent.data).id,
        "messaging.message.conversation_id": "conv-1",
        "newfuse.message.delivery_count": 1,
        "newfuse.message.position": int((sent.headers or {})["Nats-Sequence"]),
        "newfuse.agent.id": "front/1",
        "newfuse.message.type": "plan",
    }

    # A's effects, its reply and its message to B, carry A's span.
    [stored_reply] = [
        m for m in await raw_stored(nc, prefix, subjects.reply(">")) if carried(m)[0] == asked_trace
    ]
    assert carried(stored_reply) == (asked_trace, handled_a["span_id"])
    to_back = await raw_stored(nc, prefix, subjects.agent_type("back"))
    assert len(to_back) == 2  # one from the request, one from the call
    [work_1] = [m for m in to_back if carried(m)[0] == asked_trace]
    assert carried(work_1) == (asked_trace, handled_a["span_id"])

    # Agent B (a third process): two deliveries, the first failed, both children of A's span.
    handled_b = sorted(
        (s for s in back_spans if s["trace_id"] == asked_trace),
        key=lambda s: s["attributes"]["newfuse.message.delivery_count"],
    )
    assert [s["attributes"]["newfuse.message.delivery_count"] for s in handled_b] == [1, 2]
    assert {s["parent_id"] for s in handled_b} == {handled_a["span_id"]}
    assert [s["status"] for s in handled_b] == ["ERROR", "UNSET"]
    assert handled_b[0]["events"] == ["exception"]
    assert handled_b[1]["attributes"]["newfuse.agent.id"] == "back/1"
    assert handled_b[1]["attributes"]["messaging.consumer.group.name"] == "back"
    # ... and the task events B stored name B's successful span.
    task_events = await raw_stored(nc, prefix, subjects.task_events("work-1"))
    assert [carried(m) for m in task_events] == [(asked_trace, handled_b[1]["span_id"])] * 2

    # The fast path: the same chain, the call's span the parent of A's.
    called_trace, _ = ids(calling)
    call = next(s for s in ours if s.name == "send a2a.front" and ids(s)[0] == called_trace)
    assert dict(call.attributes or {})["messaging.destination.name"] == subjects.rpc("front")
    [fast_a] = [s for s in front_spans if s["trace_id"] == called_trace]
    assert fast_a["parent_id"] == ids(call)[1]
    assert fast_a["attributes"]["messaging.consumer.group.name"] == "front"
    assert fast_a["attributes"]["messaging.destination.name"] == subjects.rpc("front")
    fast_b = [s for s in back_spans if s["trace_id"] == called_trace]
    assert len(fast_b) == 2 and {s["parent_id"] for s in fast_b} == {fast_a["span_id"]}
    # every span of the two processes belongs to one of the two traces
    assert {s["trace_id"] for s in front_spans + back_spans} == {asked_trace, called_trace}


VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ENVELOPE_ONLY = "00-11111111111111111111111111111111-2222222222222222-01"
HEADER_WINS = "00-33333333333333333333333333333333-4444444444444444-01"

HOSTILE = [
    # (case, headers beyond the wire's, the envelope's traceparent, the parent expected)
    ("malformed header", {"traceparent": "00-not-a-trace-context"}, None, None),
    (
        "malformed header, envelope fallback",
        {"traceparent": "garbage"},
        ENVELOPE_ONLY,
        ENVELOPE_ONLY,
    ),
    ("header first", {"traceparent": HEADER_WINS}, ENVELOPE_ONLY, HEADER_WINS),
    ("oversized header", {"traceparent": VALID + "-" + "f" * 4000}, None, None),
    ("all-zero trace id", {"traceparent": "00-" + "0" * 32 + "-b7ad6b7169203331-01"}, None, None),
    ("version ff", {"traceparent": "ff" + VALID[2:]}, None, None),
    ("oversized tracestate", {"traceparent": VALID, "tracestate": "=,;" * 300}, None, VALID),
    ("broken tracestate", {"traceparent": VALID, "tracestate": "a=1,=bad,@@=x," * 9}, None, VALID),
    ("malformed envelope trace", {}, "00-" + "z" * 600, None),
]


async def test_a_malformed_trace_context_from_a_raw_publish_is_ignored_and_never_stops_the_agent(
    nc: Client,
    prefix: str,
    stream: MessageStreamSpec,
    tracer: trace.Tracer,
    exporter: InMemorySpanExporter,
) -> None:
    subjects = Subjects(prefix)
    probe = Agent("probe", concurrency=1)
    seen: list[str] = []

    @probe.handler("hit")
    async def hit(ctx: Context, body: dict[str, str]) -> None:
        seen.append(body["case"])
        ctx.send("sink", "echo", body)

    js = nc.jetstream()
    async with probe.run(nc, key="1", prefix=prefix, stream=stream, tracer=tracer) as running:
        for index, (case, extra, traceparent, _) in enumerate(HOSTILE):
            message = A2AMessage(
                type="hit", payload={"case": case}, metadata=A2AMetadata(sender="foreign")
            )
            body, wire_headers = wire.encode(
                "a2a.probe",
                wire.MESSAGE_TYPE,
                message,
                event_id=f"foreign-{index}",
                trace=None if traceparent is None else TraceContext(traceparent=traceparent),
            )
            wire_headers.pop("traceparent", None)  # only what the foreign client sets
            await js.publish(subjects.agent_type("probe"), body, headers={**wire_headers, **extra})

        async def all_handled() -> bool:
            return running.handled == len(HOSTILE)

        await wait_for(all_handled, timeout=20)
        assert running.dead_lettered == 0
    assert sorted(seen) == sorted(case for case, *_ in HOSTILE)
    spans = {
        dict(s.attributes or {})["messaging.message.id"]: s
        for s in exporter.get_finished_spans()
        if s.name == "process probe"
    }
    effects = {
        ENVELOPE_DECODER.decode(m.data).causation_id: m
        for m in await raw_stored(nc, prefix, subjects.agent_type("sink"))
    }
    for index, (case, _, _, expected) in enumerate(HOSTILE):
        span = spans[f"foreign-{index}"]
        if expected is None:
            assert span.parent is None, case  # a new trace, not a crash and not a guess
        else:
            assert span.parent is not None, case
            assert (f"{span.context.trace_id:032x}", f"{span.parent.span_id:016x}") == parent_of(
                expected
            ), case
        assert carried(effects[f"foreign-{index}"]) == ids(span), case  # effects carry it on


async def test_without_a_tracer_provider_nothing_is_stamped_yet_an_incoming_trace_is_passed_on(
    nc: Client, prefix: str, stream: MessageStreamSpec, tracer: trace.Tracer
) -> None:
    subjects = Subjects(prefix)
    relay = Agent("relay", concurrency=1)

    @relay.handler("hop")
    async def hop(ctx: Context, body: dict[str, int]) -> None:
        ctx.send("sink", "hopped", body)

    noop = trace.NoOpTracer()  # what the API gives when no SDK is installed
    with tracer.start_as_current_span("started the agent"):  # its tasks inherit this span
        running = await relay.run(
            nc, key="1", prefix=prefix, stream=stream, tracer=noop
        ).__aenter__()
    async with running, AgentClient(nc, prefix=prefix, stream=stream, tracer=noop) as client:
        await client.send("relay", "hop", {"n": 1})
        message = A2AMessage(type="hop", payload={"n": 2}, metadata=A2AMetadata(sender="x"))
        body, wire_headers = wire.encode(
            "a2a.relay",
            wire.MESSAGE_TYPE,
            message,
            event_id="traced-elsewhere",
            trace=TraceContext(traceparent=VALID, tracestate="vendor=1"),
        )
        await nc.jetstream().publish(subjects.agent_type("relay"), body, headers=wire_headers)

        async def both() -> bool:
            return running.handled == 2

        await wait_for(both, timeout=20)
    plain, traced = await raw_stored(nc, prefix, subjects.agent_type("relay"))
    assert "traceparent" not in (plain.headers or {})
    assert ENVELOPE_DECODER.decode(plain.data).trace is None
    assert (traced.headers or {})["tracestate"] == "vendor=1"
    effects = {
        ENVELOPE_DECODER.decode(m.data).causation_id: m
        for m in await raw_stored(nc, prefix, subjects.agent_type("sink"))
    }
    first = effects[ENVELOPE_DECODER.decode(plain.data).id]
    assert "traceparent" not in (first.headers or {})  # not the span that started the agent
    assert ENVELOPE_DECODER.decode(first.data).trace is None
    passed = effects["traced-elsewhere"]  # the no-op span keeps the incoming context
    assert (passed.headers or {})["traceparent"] == VALID
    assert (passed.headers or {})["tracestate"] == "vendor=1"
