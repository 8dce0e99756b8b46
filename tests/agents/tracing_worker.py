"""An agent process for the tracing test: `python tracing_worker.py NATS_URL PREFIX ROLE`.

ROLE `front`: the `front` agent; a `plan` message is sent on to `back` and answered.
ROLE `back`: the `back` agent; a `work` message fails on its first delivery and completes its
task on the second.

Spans go to the OpenTelemetry SDK's in-memory exporter, through the global tracer provider (as
an application installs one). On SIGTERM the agent stops and the finished spans are written as
JSON to the file named by NEWFUSE_TEST_SPANS_FILE.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from newfuse.agents import Agent, Context
from newfuse.nats import MessageStreamSpec, Subjects, connect

SPANS_FILE = "NEWFUSE_TEST_SPANS_FILE"

front = Agent("front", concurrency=4)
back = Agent("back", concurrency=4, backoff=(0.05, 0.1))


@front.handler("plan")
async def plan(ctx: Context, body: dict[str, int]) -> dict[str, int]:
    ctx.send("back", "work", {"n": body["n"]}, task_id=f"work-{body['n']}")
    return {"planned": body["n"]}


@back.handler("work")
async def work(ctx: Context, body: dict[str, int]) -> None:
    if ctx.attempt == 1:
        raise RuntimeError(f"work {body['n']}: the first try fails")
    ctx.task_status("completed", text=f"did {body['n']}")


def as_json(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": None if span.parent is None else f"{span.parent.span_id:016x}",
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [event.name for event in span.events],
    }


async def main(url: str, prefix: str, role: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    nc = await connect(url, name=f"tracing-worker-{role}")
    stream = MessageStreamSpec(subjects=Subjects(prefix), duplicate_window=0.5)
    agent = {"front": front, "back": back}[role]
    async with agent.run(nc, key="1", prefix=prefix, stream=stream):
        print("ready", flush=True)
        await stop.wait()
    await nc.close()
    spans = [as_json(span) for span in exporter.get_finished_spans()]
    Path(os.environ[SPANS_FILE]).write_text(json.dumps(spans))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
