"""`fuse demo`: the tour. Agents talk through the log, a human answers a task, the log replays.

With FUSE_NATS_URL (or `--nats`) set, or a `fuse dev` running, the tour runs on those servers and
leaves its history there, under the prefix in use, for `fuse agents history`, `fuse tasks` and
`fuse replay` to show afterwards. Otherwise it starts a nats-server and a valkey of its own from
the installed wheels on free loopback ports, and stops them (by pid) when it ends.

The agents are in-process instances of two agent types:
- `researcher` (two instances, r1 and r2, sharing one durable consumer: load-balanced) answers
  `research.ask`; a question that names no quarter becomes an A2A task that asks for one
  (input-required), and the answer (`research.clarify`) completes it with an artifact. Each
  answer is also published on the topic `findings`.
- `writer` subscribes to `findings` and notes each one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from newfuse.agents import (
    Agent,
    AgentClient,
    AgentId,
    Aggregator,
    Context,
    TaskContext,
    TaskQueue,
    Tasks,
    Worker,
    queue_stats,
)
from newfuse.agents.history import History
from newfuse.agents.models import ChatMessage, LocalModelProvider
from newfuse.agents.models.usage import ModelCalls, usage
from newfuse.agents.registry import read_liveness, summarize
from newfuse.agents.replay import Replay
from newfuse.cli._common import settings_from_args
from newfuse.config import Settings, read_dev_state
from newfuse.eventstore import open_event_store
from newfuse.nats import NatsServer, Subjects, ValkeyServer, connect
from newfuse.projections import AgentStateView, ProjectionGroup
from newfuse.projections.builtin import BuiltinProjections
from newfuse.schemas import Artifact, Part

INSTANCES = (("researcher", "r1"), ("researcher", "r2"), ("writer", "w1"))
QUESTIONS = ("summarise the incident reports", "list the open risks", "who owns the backlog")
UNCLEAR = "compare revenue with the quarter before"
ANSWER = "Q3 2026"


class Ask(msgspec.Struct, frozen=True):
    """Payload of `research.ask`."""

    question: str


class Answer(msgspec.Struct, frozen=True):
    """A researcher's reply to `research.ask`."""

    question: str
    answer: str
    by: str


class Finding(msgspec.Struct, frozen=True):
    """Payload of `finding.noted` on the topic `findings`."""

    summary: str
    by: str


researcher = Agent(
    "researcher",
    description="answers questions; asks back when a question is unclear",
    version="1.0.0",
)
writer = Agent(
    "writer",
    description="keeps notes of what researchers found",
    topics=("findings",),
    version="0.3.1",
)
notes: list[str] = []


@researcher.handler("research.ask")
async def ask(ctx: Context, ask: Ask) -> Answer | None:
    me = str(ctx.agent_id)
    if "quarter" in ask.question and "Q" not in ask.question:
        ctx.task_status("working")
        ctx.task_status(
            "input-required", text="Which quarter do you mean?", answer_type="research.clarify"
        )
        return None
    ctx.publish("findings", "finding.noted", Finding(summary=f"answered {ask.question!r}", by=me))
    return Answer(question=ask.question, answer=f"done: {ask.question}", by=me)


@researcher.handler("research.clarify")
async def clarify(ctx: Context, payload: dict[str, Any]) -> None:
    quarter = ctx.text or str(payload.get("text", ""))
    report = f"revenue {quarter}: +4% on the quarter before"
    ctx.task_status(
        "completed",
        text=report,
        artifacts=[Artifact(artifact_id="report", name="revenue", parts=[Part(text=report)])],
    )
    me = str(ctx.agent_id)
    ctx.publish("findings", "finding.noted", Finding(summary=report, by=me))


@writer.handler("finding.noted")
async def note_finding(ctx: Context, finding: Finding) -> None:
    notes.append(f"{finding.by}: {finding.summary}")


# -- agent work: a planner's job through a queue, a model-using drafter, two reviewers ------------

JOBS = (("launch note", 7), ("risk list", 3), ("status mail", 0))
LOCAL_MODEL = LocalModelProvider()


async def split_job(ctx: TaskContext, job: dict[str, Any]) -> dict[str, str]:
    """The `jobs` queue's worker: hands each job to the drafter (an effect: sent once)."""
    ctx.send("drafter", "draft.write", {"topic": job["topic"]})
    return {"sent_to": "drafter"}


jobs = Worker("jobs", split_job, concurrency=2, aging=1.0, version="1.2.0")
drafter = Agent("drafter", description="drafts with a language model", version="2.0.0")
reviewer = Agent("reviewer", description="approves or rejects a draft", version="1.0.0")


@drafter.handler("draft.write")
async def draft(ctx: Context, body: dict[str, Any]) -> None:
    answer = await ctx.chat(
        LOCAL_MODEL, [ChatMessage(role="user", content=f"draft a {body['topic']}")], model="draft-1"
    )
    ctx.publish("drafts", "draft.written", {"topic": body["topic"], "text": answer.content})


@reviewer.handler("review.check")
async def review(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    strict = ctx.agent_id.key == "strict"
    short = [d["topic"] for d in body["drafts"] if strict and len(d["text"]) < 27]
    return {"approved": not short, "by": str(ctx.agent_id), "too_short": short}


def register(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        description="The tour: agents exchange requests and replies through the log, a task "
        "asks a human and is answered, the registry is listed, the conversation is replayed. "
        "Uses $FUSE_NATS_URL or the running fuse dev when there is one (and leaves its history "
        "there), else starts embedded servers and stops them.",
    )
    demo.set_defaults(handler=run_demo)


def say(text: str = "") -> None:
    print(text, flush=True)


class Servers(msgspec.Struct, frozen=True):
    """What the tour runs on: the URLs, and whose servers they are."""

    nats_url: str
    redis_url: str | None
    owner: str  # "env" (FUSE_* / flags), "dev" (a running fuse dev), "own" (started here)


@contextlib.asynccontextmanager
async def servers(settings: Settings) -> AsyncIterator[Servers]:
    """The user's servers when there are some (kept, with the tour's history), else our own."""
    if settings.nats_url:
        say(f"using the NATS server at {settings.nats_url} (FUSE_NATS_URL / --nats)")
        yield Servers(settings.nats_url, settings.redis_url, "env")
        return
    dev = read_dev_state(settings)
    if dev is not None:
        say(f"using the running fuse dev (pid {dev.pid}): {dev.nats_url}, {dev.redis_url}")
        yield Servers(dev.nats_url, dev.redis_url, "dev")
        return
    say("no FUSE_NATS_URL and no fuse dev: starting nats-server and valkey from the wheels")
    async with NatsServer() as nats, ValkeyServer() as valkey:
        say(f"  nats-server {nats.url} (pid {nats.pid}), valkey {valkey.url} (pid {valkey.pid})")
        yield Servers(nats.url, valkey.url, "own")
    say("stopped the servers it started")


async def run_demo(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    async with servers(settings) as where:
        await tour(where, settings.prefix)
    return 0


async def tour(where: Servers, prefix: str) -> None:
    conversation = f"tour-{uuid.uuid4().hex[:8]}"
    nc = await connect(where.nats_url, name="fuse-demo")
    try:
        async with (
            researcher.run(nc, key="r1", prefix=prefix),
            researcher.run(nc, key="r2", prefix=prefix),
            writer.run(nc, key="w1", prefix=prefix),
            AgentClient(nc, prefix=prefix, sender="planner") as planner,
        ):
            say(f"\n1. requests and replies through the log (conversation {conversation})")
            for question in QUESTIONS:
                started = time.perf_counter()
                reply = await planner.request(
                    "researcher", "research.ask", Ask(question), context_id=conversation
                )
                took = (time.perf_counter() - started) * 1000
                answer = msgspec.convert(reply.payload, Answer)
                say(
                    f"  planner -> researcher  {question!r}: {answer.by} says {answer.answer!r}"
                    f" ({took:.1f} ms; request and reply are both stored)"
                )
            started = time.perf_counter()
            reply = await planner.call("researcher", "research.ask", Ask("ping"))
            took = (time.perf_counter() - started) * 1000
            say(
                f"  fast path (core NATS, nothing stored): {reply.payload['by']} answered in "
                f"{took:.1f} ms"
            )

            say("\n2. a task asks a human, and the human answers")
            message_id = await planner.send(
                "researcher", "research.ask", Ask(UNCLEAR), context_id=conversation
            )
            task_id = planner.task_id("researcher", message_id)
            tasks = Tasks(nc, prefix=prefix)
            task = await _task_in(tasks, task_id, "input-required")
            question = task.question
            asked = question.message if question is not None else None
            text = " ".join(p.text or "" for p in asked.parts) if asked is not None else ""
            say(f"  task {task_id}: {task.state}, {task.agent} asks {text!r}")
            say(f"  a human answers (what `fuse tasks reply {task_id} '{ANSWER}'` does)")
            await planner.answer(task_id, text=ANSWER)
            task = await _task_in(tasks, task_id, "completed")
            states = " -> ".join(change.state for change in task.statuses)
            artifact = task.artifacts[0].parts[0].text if task.artifacts else ""
            say(f"  task {task_id}: {states}; artifact {artifact!r}")
            await _until(lambda: len(notes) >= len(QUESTIONS) + 1)
            say(f"  writer noted {len(notes)} findings from the topic 'findings'")

            say("\n3. the registry: who is running (heartbeats; `fuse agents list`)")
            for row in summarize(await read_liveness(nc, Subjects(prefix))):
                say(
                    f"  {row.id:<11} v{row.version:<6} {row.instances} instance(s)  "
                    f"{row.status:<8} last seen {row.last_seen:%H:%M:%S}"
                )

            say("\n4. the read models: each instance's registration, folded into Redis")
            await _read_models(where, prefix)

            say(f"\n5. the conversation {conversation}, replayed from the log")
            history = History(nc, prefix=prefix)
            async for turn in history.turns(context_id=conversation):
                say(
                    f"  #{turn.position:<4} {turn.kind:<7} {turn.sender:>13} -> {turn.to:<24} "
                    f"{turn.type:<17} {turn.text[:60]}"
                )
            await _agent_work(nc, prefix, conversation, planner)
    finally:
        await nc.close()
    if where.owner != "own":
        say("\nits history stays on the server; look again with:")
        say(f"  fuse agents history --context {conversation}")
        say(f"  fuse tasks show {task_id}")


async def _agent_work(nc: Any, prefix: str, conversation: str, planner: AgentClient) -> None:
    """Issue 10's part: a queue, a model-using writer, an aggregation, then the views and a
    replay of the drafter from its recorded model calls."""
    job = f"{conversation}-job"
    say(f"\n6. a job through a queue, a model and two reviewers (conversation {job})")
    history = History(nc, prefix=prefix)
    async with (
        jobs.run(nc, key="j1", prefix=prefix),
        drafter.run(nc, key="w1", prefix=prefix),
        reviewer.run(nc, key="strict", prefix=prefix),
        reviewer.run(nc, key="kind", prefix=prefix),
        TaskQueue(nc, prefix=prefix, sender="planner") as queue,
    ):
        for topic, priority in JOBS:
            task_id = await queue.submit(
                "jobs", {"topic": topic}, priority=priority, context_id=job
            )
            say(f"  planner -> queue jobs, priority {priority}: {topic!r} (task {task_id})")
        seen: dict[str, str] = {}

        async def drafted() -> bool:
            async for turn in history.turns(context_id=job):
                if turn.type == "draft.written" and turn.id not in seen:
                    seen[turn.id] = turn.text
                    say(f"  {turn.sender} -> #drafts  {turn.text[:70]}")
            return len(seen) >= len(JOBS)

        await _until(drafted)
        drafts = [msgspec.json.decode(text) for text in seen.values()]
        gathered = await Aggregator(planner).scatter(
            [AgentId.of("reviewer", "strict"), AgentId.of("reviewer", "kind")],
            "review.check",
            {"drafts": drafts},
            strategy="all",
            timeout=10,
            context_id=job,
        )
        for agent, reply in gathered.replies.items():
            verdict = "approved" if reply.payload["approved"] else "rejected"
            say(f"  {agent}: {verdict} {reply.payload['too_short'] or ''}".rstrip())
        used = ", ".join(r.event_id[:8] for r in gathered.replies.values() if r.event_id)
        say(
            f"  aggregate {gathered.aggregate_id[:8]} ({gathered.strategy}): {gathered.outcome}, "
            f"built from replies {used} (event {gathered.event_id[:8]} on the log)"
        )

        say("\n7. what `fuse agents list`, `fuse queues list` and `fuse models usage` show")
        for agent_row in summarize(await read_liveness(nc, Subjects(prefix))):
            say(
                f"  agent {agent_row.id:<11} v{agent_row.version:<6} "
                f"{agent_row.instances} instance(s) {agent_row.status}"
            )
        for stats in await queue_stats(nc, prefix=prefix):
            say(
                f"  queue {stats.queue}: {stats.total} waiting, {stats.in_flight} in flight, "
                f"{stats.workers} worker(s)"
            )
        records = [r async for r in ModelCalls(nc, prefix=prefix).records(agent="drafter")]
        for calls in usage(records):
            say(
                f"  model {calls.provider}/{calls.request_model} (revision {calls.revision}): "
                f"{calls.calls} calls by {calls.agent}, {calls.input_tokens} in / "
                f"{calls.output_tokens} out tokens, {calls.mean_latency_ms:.2f} ms each"
            )

    say("\n8. the drafter replayed from the log (`fuse agents replay newfuse.cli.demo:drafter`)")
    for label, model in (
        ("its recorded model answers", None),
        ("model draft-2 instead", "draft-2"),
    ):
        replay = Replay(nc, drafter, prefix=prefix, model=model)
        replayed = [message async for message in replay.messages(job)]
        diverged = sum(1 for message in replayed if message.diverged)
        cost = ", no model called" if model is None else ""
        say(f"  with {label}: {len(replayed)} message(s) replayed, {diverged} diverged{cost}")


async def _task_in(tasks: Tasks, task_id: str, state: str) -> Any:
    found: list[Any] = []

    async def reached() -> bool:
        task = await tasks.get(task_id)
        if task is not None and task.state == state:
            found.append(task)
            return True
        return False

    await _until(reached)
    return found[0]


async def _until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 15.0,  # noqa: ASYNC109 - how long the tour waits for a step
) -> None:
    """Poll `condition` (a plain or async predicate) until it holds; TimeoutError after
    `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            done = condition()
            if not isinstance(done, bool):
                done = await done
            if done:
                return
            await asyncio.sleep(0.02)


async def _read_models(where: Servers, prefix: str) -> None:
    """The agent-state projection's view of the tour's instances: from the running `fuse dev`'s
    projections, or from projections run here up to the log's head."""
    if where.redis_url is None:
        say("  (no Redis: set FUSE_REDIS_URL to see them)")
        return
    ours = {f"{agent}-{key}" for agent, key in INSTANCES}
    async with await open_event_store(where.nats_url, prefix=prefix) as store:
        head = await store.head_position()
        with tempfile.TemporaryDirectory(prefix="newfuse-demo-") as tmp:
            models = await BuiltinProjections.open(
                redis_url=where.redis_url, audit_db=str(Path(tmp) / "audit.db"), prefix=prefix
            )
            async with models:
                if where.owner == "dev":  # its projections run already: wait for them
                    view = AgentStateView(models.redis)
                    await _until(lambda: _shows(view, ours))
                else:
                    runners = models.runners(store, ["agent_state"])
                    group = ProjectionGroup(runners)
                    running = asyncio.create_task(group.run(handle_signals=False))
                    try:
                        await runners[0].wait_until(head, timeout=15)
                    finally:
                        group.request_stop()
                        await running
                    view = AgentStateView(models.redis)
                for state in await view.agents():
                    if state.agent_id in ours:
                        say(
                            f"  {state.agent_id:<14} {state.status or '-':<10} "
                            f"(position {state.position} of the event log)"
                        )


async def _shows(view: AgentStateView, agents: set[str]) -> bool:
    return agents <= {state.agent_id for state in await view.agents()}
