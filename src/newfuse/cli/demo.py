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

Then sagas run on these agents (a committed one, one rolled back with its compensations, one
that waits for a person's review; `--interactive` leaves that decision to you), and a security
section starts a nats-server of its own with per-identity permissions: what an agent may and may
not do, a signed checkpoint of the log verified, a sealed personal field forgotten.
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
from typing import Annotated, Any

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
from newfuse.agents.secure import provision
from newfuse.cli._common import settings_from_args
from newfuse.cli.auth import AUTH_CONFIG, write_dev_config
from newfuse.config import Settings, read_dev_state
from newfuse.core import (
    Orchestrator,
    Review,
    Reviewer,
    ReviewState,
    Saga,
    SagaState,
    StepContext,
    open_timers,
    review_id,
    steps,
)
from newfuse.core import review as reviews
from newfuse.errors import PermissionDeniedError
from newfuse.eventstore import EventStore, open_event_store
from newfuse.nats import NatsServer, Subjects, ValkeyServer, connect
from newfuse.projections import AgentStateView, ProjectionGroup
from newfuse.projections.builtin import BuiltinProjections
from newfuse.schemas import Artifact, DataSubject, NewEvent, Part, Personal, default_registry
from newfuse.security import KVKeyStore, SigningKey, checkpoint, forget, use_keys, verify
from newfuse.security.identities import IdentityStore

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
        "asks a human and is answered, the registry is listed, the conversation is replayed; "
        "sagas commit, roll back and wait for a review; a nats-server with per-identity "
        "permissions refuses a forgery, the log's checkpoint verifies, a person is forgotten. "
        "Uses $FUSE_NATS_URL or the running fuse dev when there is one (and leaves its history "
        "there), else starts embedded servers and stops them.",
    )
    demo.add_argument(
        "--interactive",
        action="store_true",
        help="leave the review step's decision to you (`fuse review approve ID` or reject) "
        "instead of approving it itself",
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
        await tour(where, settings.prefix, interactive=args.interactive)
    return 0


async def tour(where: Servers, prefix: str, *, interactive: bool = False) -> None:
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
            await _sagas(where, nc, prefix, planner, interactive=interactive)
    finally:
        await nc.close()
    await _security(prefix)
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


# -- sagas: steps that are agent requests, queued tasks and local functions, with undos ----------

EDITORS = "editors"
TOUR_REVIEWER = Reviewer("tour", (EDITORS,))
"""The reviewer the tour approves as (without `--interactive`)."""


async def file_report(ctx: TaskContext, job: dict[str, Any]) -> dict[str, str]:
    """The `filing` queue's worker: files a report, or takes one back (a compensation)."""
    if "unfile" in job:
        say(f"    compensating 'file': the filing queue took back {job['unfile']}")
        return {"unfiled": job["unfile"]}
    return {"filed_as": f"report-{job['question'].split()[0]}"}


filing = Worker("filing", file_report, version="1.0.0")


def _question(ctx: StepContext) -> dict[str, Any]:
    return {"question": ctx.input["question"]}


def _filing(ctx: StepContext) -> dict[str, Any]:
    return {"question": ctx.input["question"], "answer": ctx.outputs["research"]["answer"]}


def _unfiling(ctx: StepContext) -> dict[str, Any]:
    return {"unfile": ctx.outputs["file"]["filed_as"]}


async def withdraw(ctx: StepContext) -> None:
    """Undo of `research` (a local function): the answer is not to be used."""
    say(f"    compensating 'research': withdrew {ctx.outputs['research']['answer']!r}")


async def publish(ctx: StepContext) -> dict[str, Any]:
    """A local step: publishing fails when the saga's input says so (to show a rollback)."""
    if ctx.input.get("fail"):
        raise RuntimeError("the printer is out of paper")
    return {"published": ctx.input.get("text", ctx.outputs.get("research", {}).get("answer"))}


def report_saga(planner: AgentClient, queues: TaskQueue) -> Saga:
    """research (ask a researcher) -> file (a task on the `filing` queue) -> publish (local)."""
    report = Saga("report")
    report.step("research", timeout=10)(steps.ask(planner, "researcher", "research.ask", _question))
    report.compensate("research")(withdraw)
    report.step("file", timeout=10)(steps.enqueue(queues, "filing", _filing))
    report.compensate("file")(steps.enqueue(queues, "filing", _unfiling))
    report.step("publish", attempts=1)(publish)
    return report


def release_saga(planner: AgentClient) -> Saga:
    """research, then publish once an editor approved the text (a review step)."""
    release = Saga("release")
    release.step("research", timeout=10)(
        steps.ask(planner, "researcher", "research.ask", _question)
    )
    release.compensate("research")(withdraw)
    release.step(
        "publish",
        attempts=1,
        review=Review(
            group=EDITORS,
            deadline=600,
            summary=lambda ctx: f"publish the answer to {ctx.input['question']!r}",
            propose=lambda ctx: {"text": ctx.outputs["research"]["answer"]},
        ),
    )(publish)
    return release


async def _sagas(
    where: Servers, nc: Any, prefix: str, planner: AgentClient, *, interactive: bool
) -> None:
    """Issue 11's part: three sagas driven by an orchestrator of the tour's own."""
    async with (
        await open_event_store(where.nats_url, prefix=prefix) as store,
        filing.run(nc, key="f1", prefix=prefix),
        TaskQueue(nc, prefix=prefix, sender="planner") as queues,
    ):
        timers = await open_timers(store, "tour")  # fires of the tour's sagas come to the tour
        try:
            sagas = [report_saga(planner, queues), release_saga(planner)]
            async with Orchestrator(store, sagas, name="tour", timers=timers) as orchestrator:
                say("\n9. a saga that commits: ask a researcher, file a task, publish locally")
                state = await _run_saga(orchestrator, "report", {"question": QUESTIONS[0]})
                say(f"  saga {state.id[:8]}: {state.status}; published {_output(state)!r}")

                say("\n10. a saga whose last step fails: the done steps are undone, newest first")
                state = await _run_saga(
                    orchestrator, "report", {"question": QUESTIONS[1], "fail": True}
                )
                say(f"  saga {state.id[:8]}: {state.status} ({state.failed_step}: {state.error})")
                _print_steps(state)

                say("\n11. a saga with a review step: it waits for an editor's decision")
                await _reviewed_saga(where, store, orchestrator, prefix, interactive=interactive)
        finally:
            await timers.close()


async def _run_saga(orchestrator: Orchestrator, name: str, input: dict[str, Any]) -> SagaState:
    saga_id = await orchestrator.start(name, input)
    return await orchestrator.wait(saga_id, timeout=30)


def _output(state: SagaState) -> Any:
    done = state.steps.get("publish")
    return done.output.get("published") if done is not None and done.output else None


def _print_steps(state: SagaState) -> None:
    """Each step's history, as `fuse sagas show ID` prints it."""
    say(f"  `fuse sagas show {state.id}`: transaction {state.transaction().status}")
    for step in state.steps.values():
        say(f"    {step.name:<9} {step.status:<12} {'; '.join(step.history)}")


async def _reviewed_saga(
    where: Servers,
    store: EventStore,
    orchestrator: Orchestrator,
    prefix: str,
    *,
    interactive: bool,
) -> None:
    saga_id = await orchestrator.start("release", {"question": QUESTIONS[2]})
    pending = await _review_open(store, review_id(saga_id, "publish"))
    say(f"  review {pending.id} of saga {saga_id[:8]} step {pending.step!r}: {pending.status}")
    say(f"    what: {pending.summary}")
    say(f"    proposed input: {msgspec.json.encode(pending.proposed).decode()}")
    deadline = pending.deadline.isoformat(timespec="seconds") if pending.deadline else "none"
    say(f"    who may decide: group {', '.join(pending.groups)}; deadline {deadline}")
    if interactive:
        decided = await _person_decides(where, store, pending, prefix)
    else:
        decided = await reviews.approve(store, pending.id, TOUR_REVIEWER, "reads well")
        say(f"  the tour approves it as {TOUR_REVIEWER.name} (group {EDITORS}), as a person would")
    say(f"  review {decided.id}: {decided.status} by {decided.decided_by} ({decided.comment!r})")
    state = await orchestrator.wait(saga_id, timeout=30)
    if state.status == "committed":
        say(f"  saga {saga_id[:8]}: committed; published {_output(state)!r}")
    else:
        say(f"  saga {saga_id[:8]}: {state.status} ({state.failed_step}: {state.error})")
    _print_steps(state)


async def _review_open(store: EventStore, review: str) -> ReviewState:
    """The review once the orchestrator has opened it."""
    found: list[ReviewState] = []

    async def opened() -> bool:
        state = await reviews.read_review(store, review)
        found[:] = [state] if state.requested else []
        return bool(found)

    await _until(opened)
    return found[0]


async def _person_decides(
    where: Servers, store: EventStore, pending: ReviewState, prefix: str
) -> ReviewState:
    """`--interactive`: print the commands that decide, and wait (as long as it takes)."""
    reach = "" if where.owner == "dev" else f" --nats {where.nats_url} --prefix {prefix}"
    who = f" --as YOUR_NAME --group {EDITORS}"
    say("  your decision: in another terminal run")
    say(f"    fuse review approve {pending.id}{who}{reach}")
    say(f"  or  fuse review reject {pending.id}{who} --comment WHY{reach}   (rolls back)")
    if where.owner == "own":
        say("  (these servers are the tour's own: they stop when it ends)")
    say("  waiting for the decision (Ctrl-C stops the tour; the review stays pending)")
    try:
        while True:
            state = await reviews.read_review(store, pending.id)
            if state.decided:
                return state
            await asyncio.sleep(0.2)
    except asyncio.CancelledError:  # Ctrl-C: the servers and agents stop on the way out
        say(f"\nCtrl-C: stopped waiting for review {pending.id}; the tour ends here")
        raise


# -- security: identities the server enforces, a signed audit trail, a forgotten field ----------


class Contact(msgspec.Struct, frozen=True, kw_only=True):
    """Payload of `customer.contact`: the email is sealed with the customer's own key."""

    customer: Annotated[str, DataSubject()]
    email: Annotated[str, Personal()]
    plan: str


async def _security(prefix: str) -> None:
    """Issue 12's part, on a nats-server the tour starts with an authorization config (the one
    `fuse dev --secure` runs with): the servers above are left as they are."""
    say("\n12. identities: a nats-server that knows who may publish and read what")
    with tempfile.TemporaryDirectory(prefix="newfuse-demo-secure-") as tmp:
        folder = Path(tmp)
        identities = IdentityStore(folder / "auth")
        identities.add("tour-admin", "admin")
        identities.add("researcher-r1", "agent", agent="researcher/r1", publish_topics=["findings"])
        config = folder / AUTH_CONFIG
        write_dev_config(config, identities, prefix, "fuse-demo-secure")
        for identity in identities.list():
            say(f"  identity {identity.name:<14} role {identity.role:<6} key {identity.public_key}")
        async with NatsServer(
            data_dir=folder / "nats", extra_args=["--config", str(config)]
        ) as server:
            say(f"  nats-server {server.url} (pid {server.pid}) runs with {config.name}")
            admin = await connect(
                server.url, name="fuse-demo-admin", credentials=identities.credentials("tour-admin")
            )
            agent_nc = await connect(
                server.url,
                name="researcher-r1",
                credentials=identities.credentials("researcher-r1"),
            )
            try:
                made = await provision(admin, identities.list(), prefix)
                say(f"  the admin made the streams and the agent's consumers ({len(made)})")
                await _what_an_agent_may_do(admin, agent_nc, server.url, identities, prefix)
                await _audit_and_forget(server.url, identities, prefix)
            finally:
                await agent_nc.close()
                await admin.close()
        say("  stopped the secured nats-server")


async def _what_an_agent_may_do(
    admin: Any, agent_nc: Any, url: str, identities: IdentityStore, prefix: str
) -> None:
    """The agent's own publishes go through; a forgery and a read of the log are refused."""
    async with (
        researcher.run(agent_nc, key="r1", prefix=prefix),
        AgentClient(admin, prefix=prefix, sender="tour-admin") as client,
    ):
        reply = await client.request(
            AgentId.of("researcher", "r1"), "research.ask", Ask("who holds the keys"), timeout=15
        )
        say(
            f"  allowed: researcher/r1, connected as researcher-r1, answered "
            f"{reply.payload['answer']!r} (its reply and its finding on 'findings')"
        )
    async with AgentClient(agent_nc, prefix=prefix, sender="writer/w1", timeout=15) as forger:
        try:
            await forger.send("writer", "finding.noted", Finding(summary="forged", by="writer/w1"))
            say("  NOT refused: researcher-r1 wrote to the writer's inbox as writer/w1")
        except PermissionDeniedError as denied:
            say(f"  refused, researcher-r1 writing to the writer's inbox as writer/w1: {denied}")
    try:
        async with await open_event_store(
            url, prefix=prefix, credentials=identities.credentials("researcher-r1")
        ) as log:
            read = [event async for event in log.read_all()]
        say(f"  NOT refused: researcher-r1 read the whole log ({len(read)} events)")
    except PermissionDeniedError as denied:
        say(f"  refused, reading the whole log: {denied}")


async def _audit_and_forget(url: str, identities: IdentityStore, prefix: str) -> None:
    """A signed checkpoint of the log and `verify`; a sealed field, then its key forgotten."""
    say("\n13. the audit trail and a forgotten person (`fuse audit verify`, `fuse forget`)")
    registry = default_registry()
    registry.add("customer.contact", 1, Contact)
    store = await open_event_store(
        url, prefix=prefix, registry=registry, credentials=identities.credentials("tour-admin")
    )
    async with store:
        use_keys(store, await KVKeyStore.open(store.nc, prefix), owns_keys=True)  # type: ignore[attr-defined]
        contact = Contact(customer="c-7", email="ada@example.com", plan="pro")
        await store.append("customer.c-7", NewEvent(data=contact, metadata={"sender": "tour"}))
        [stored] = [event async for event in store.read("customer.c-7")]
        say(
            f"  customer.contact #{stored.position}: email {stored.data.email!r} "
            "(sealed with c-7's key before it left; opened on read)"
        )
        key = SigningKey.generate("tour-auditor")
        await checkpoint(store, key)
        report = await verify(store, [key.verifier])
        say(f"  verify: {report.summary()}")
        forgotten = await forget(store, "c-7", by="tour-admin", reason="asked to be forgotten")
        say(
            f"  forgot c-7: key {forgotten.event.kid} deleted, `key.forgotten` at "
            f"#{forgotten.result.last_position}"
        )
        [again] = [event async for event in store.read("customer.c-7")]
        say(
            f"  customer.contact #{again.position} read again: email {again.data.email!r}, "
            f"plan {again.data.plan!r} (the rest of the event stays readable)"
        )
