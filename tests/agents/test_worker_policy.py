"""A queue worker's declared policy: which senders may submit which kinds of task, checked by
the worker's runtime on a real server.

`resize` workers accept `thumbnail` tasks from planners and `ping` tasks from anyone. A task's
sender here is the submitter it claims (`TaskQueue(sender=)`: the bus has no identities; see
tests/security/test_worker_policy_secured.py for the signer). A denied task never runs and is
not retried: it fails at once with the reason, and the refusals are counted in a bounded
`permission.denied` on the worker instance's own stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from messages import settled
from nats.aio.client import Client

from newfuse.agents import Task, TaskContext, TaskQueue, Worker, wire
from newfuse.agents.queues import consumer_name, worker_type
from newfuse.agents.registry import stream_of
from newfuse.errors import AgentConfigError, TaskSubmitError
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import MessageStreamSpec, Subjects
from newfuse.schemas import A2AMessage, A2AMetadata, PermissionDenied
from support import wait_for

POLICY = {"planner": ["thumbnail"], "*": ["ping"]}


def resize_worker(ran: list[tuple[str, str]], accepts: Any = POLICY) -> Worker:
    async def work(ctx: TaskContext, job: dict[str, Any]) -> dict[str, Any]:
        ran.append((ctx.sender, ctx.kind))
        return {"done": job.get("n")}

    return Worker("resize", work, heartbeat=0.5, backoff=(0.02, 0.1), accepts=accepts)


async def denials(nc: Client, prefix: str, key: str) -> list[PermissionDenied]:
    """The permission.denied events on the worker instance's own stream."""
    store = JetStreamEventStore(nc, prefix=prefix)
    return [
        event.data
        async for event in store.read(stream_of(worker_type("resize"), key))
        if isinstance(event.data, PermissionDenied)
    ]


def failure(task: Task) -> str:
    """What the task's last status says (its text part)."""
    said = task.statuses[-1].message
    assert said is not None
    return " ".join(part.text or "" for part in said.parts)


@pytest.fixture
async def queues(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> AsyncIterator[tuple[TaskQueue, TaskQueue]]:
    async with (
        TaskQueue(nc, prefix=prefix, stream=stream, sender="planner") as planner,
        TaskQueue(nc, prefix=prefix, stream=stream, sender="stranger") as stranger,
    ):
        yield planner, stranger


async def test_allowed_kinds_run_and_a_denied_kind_fails_at_once_with_the_reason_and_an_event(
    nc: Client, prefix: str, stream: MessageStreamSpec, queues: tuple[TaskQueue, TaskQueue]
) -> None:
    planner, stranger = queues
    ran: list[tuple[str, str]] = []
    async with resize_worker(ran).run(nc, key="1", prefix=prefix, stream=stream) as worker:
        allowed = await planner.submit("resize", {"n": 1}, kind="thumbnail")
        pinged = await stranger.submit("resize", {"n": 2}, kind="ping")  # `*`: anyone
        not_listed = await stranger.submit("resize", {"n": 3}, kind="thumbnail")
        other_kind = await planner.submit("resize", {"n": 4}, kind="delete")
        no_kind = await planner.submit("resize", {"n": 5})  # kind queue.task: not accepted
        done = {t: await planner.wait(t, timeout=30) for t in (allowed, pinged)}
        refused = {t: await planner.wait(t, timeout=30) for t in (not_listed, other_kind, no_kind)}
        await settled(nc, prefix, consumer_name("resize", 0))
        info = await nc.jetstream().consumer_info(
            stream.subjects.message_stream_name, consumer_name("resize", 0)
        )
    assert sorted(ran) == [("planner", "thumbnail"), ("stranger", "ping")]
    assert [task.state for task in done.values()] == ["completed", "completed"]
    assert [[s.state for s in task.statuses] for task in refused.values()] == [
        ["submitted", "failed"]  # never working: no handler ran
    ] * 3
    assert failure(refused[not_listed]) == (
        "message denied: 'stranger' may not send 'thumbnail' (from sender type 'stranger' it"
        " accepts ping; see its `accepts` policy)"
    )
    assert (
        "'planner' may not send 'delete' (from sender type 'planner' it accepts ping, thumbnail"
        in (failure(refused[other_kind]))
    )
    assert "'planner' may not send 'queue.task'" in failure(refused[no_kind])
    assert (worker.handled, worker.denied, worker.dead_lettered) == (2, 3, 0)
    assert (info.num_ack_pending, info.num_redelivered) == (0, 0)  # acked, never retried
    events = await denials(nc, prefix, "1")
    subject = Subjects(prefix).task("resize", 0)
    assert sorted((e.identity, e.subject, e.message_type, e.count) for e in events) == [
        ("planner", subject, "delete", 1),
        ("planner", subject, "queue.task", 1),
        ("stranger", subject, "thumbnail", 1),
    ]
    assert {(e.operation, e.seen_by) for e in events} == {("send", "task-resize/1")}
    assert worker.card.accepts == {"*": ["ping"], "planner": ["thumbnail"]}


async def test_a_flood_of_denied_tasks_fails_each_and_makes_a_bounded_number_of_events(
    nc: Client, prefix: str, stream: MessageStreamSpec, queues: tuple[TaskQueue, TaskQueue]
) -> None:
    _, stranger = queues
    ran: list[tuple[str, str]] = []
    flood = 300
    async with resize_worker(ran).run(nc, key="2", prefix=prefix, stream=stream) as worker:
        ids: list[str] = []
        for start in range(0, flood, 100):
            ids += await asyncio.gather(
                *(
                    stranger.submit("resize", {"n": n}, kind="thumbnail")
                    for n in range(start, start + 100)
                )
            )

        async def all_denied() -> bool:
            return worker.denied == flood

        await wait_for(all_denied, timeout=60)
        await settled(nc, prefix, consumer_name("resize", 0))
    # closed: the refusals counted since the first event are written out
    events = await denials(nc, prefix, "2")
    assert len(events) <= 2  # one at the first refusal, one for the rest within the window
    assert sum(e.count for e in events) == flood
    assert ran == [] and worker.handled == 0
    assert {(await stranger.wait(t, timeout=10)).state for t in ids[::50]} == {"failed"}


async def test_without_a_policy_every_kind_from_every_sender_runs(
    nc: Client, prefix: str, stream: MessageStreamSpec, queues: tuple[TaskQueue, TaskQueue]
) -> None:
    _, stranger = queues
    ran: list[tuple[str, str]] = []
    async with resize_worker(ran, accepts=None).run(nc, prefix=prefix, stream=stream) as worker:
        ids = [
            await stranger.submit("resize", {"n": 1}, kind="anything"),
            await stranger.submit("resize", {"n": 2}),
        ]
        tasks = [await stranger.wait(t, timeout=30) for t in ids]
    assert [t.state for t in tasks] == ["completed", "completed"]
    assert sorted(ran) == [("stranger", "anything"), ("stranger", "queue.task")]
    assert (worker.denied, worker.card.accepts) == (0, None)


async def test_a_kind_term_that_is_not_a_type_name_is_denied_under_a_policy_quoted_short(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    """A hostile kind (too long, not a name) written by a raw client: a policy that does not
    name it denies it, and the denial quotes it cut short."""
    ran: list[tuple[str, str]] = []
    subjects = Subjects(prefix)
    task_id = "hostile-kind"
    async with (
        resize_worker(ran).run(nc, key="3", prefix=prefix, stream=stream) as worker,
        TaskQueue(nc, prefix=prefix, stream=stream, sender="planner") as planner,
    ):
        # a planner's task as submit writes it, but with a kind submit would refuse
        real = await planner.submit("resize", {"n": 1}, kind="thumbnail", task_id=task_id)
        await planner.wait(real, timeout=30)
        message = A2AMessage(
            type="queue.task",
            payload={},
            metadata=A2AMetadata(sender="planner"),
            task_id="hostile-kind-2",
        )
        body, headers = wire.encode(
            "queue.resize",
            wire.MESSAGE_TYPE,
            message,
            event_id="hostile-kind-2",
            metadata={"queue": "resize", "priority": "0", "kind": "k" * 5000},
        )
        await nc.jetstream().publish(subjects.task("resize", 0), body, headers=headers)

        async def denied() -> bool:
            return worker.denied == 1

        await wait_for(denied)
    events = await denials(nc, prefix, "3")
    assert [e.message_type for e in events] == [f"{'k' * 64}... (5000 characters)"]
    assert ran == [("planner", "thumbnail")]


async def test_submit_refuses_a_kind_that_is_not_a_type_name(
    queues: tuple[TaskQueue, TaskQueue],
) -> None:
    planner, _ = queues
    with pytest.raises(TaskSubmitError, match=r"kind='a b': .*space.*such as 'thumbnail'"):
        await planner.submit("resize", kind="a b")
    with pytest.raises(TaskSubmitError, match=r"kind=.*at most 64 characters"):
        await planner.submit("resize", kind="k" * 65)


def test_a_worker_policy_that_cannot_be_meant_is_refused_when_the_worker_is_declared() -> None:
    async def work(ctx: TaskContext, job: Any) -> None:
        return None

    with pytest.raises(AgentConfigError, match=r"task-resize.*accepts\['planner'\]"):
        Worker("resize", work, accepts={"planner": "thumbnail"})  # type: ignore[dict-item]
