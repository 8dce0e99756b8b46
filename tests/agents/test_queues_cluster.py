"""A task queue on the local 3-node cluster: a node SIGKILLed (the message stream's leader, or
the node leading the queue's consumer) while two workers take tasks: every task completes
exactly once, none is lost, no effect is stored twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from messages import payload, settled, stored
from nats.errors import Error as NatsError

from newfuse.agents import TaskContext, TaskQueue, Worker
from newfuse.agents.queues import consumer_name
from newfuse.errors import FuseError
from newfuse.nats import MessageStreamSpec, NatsServer, Subjects, connect, ensure_event_stream
from newfuse.nats.cluster import NatsCluster
from newfuse.schemas import TaskStatusUpdate
from support import new_prefix, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]

TASKS = 60
QUEUE = "clustered"


async def created(nc: Any, stream: MessageStreamSpec) -> None:
    """Create the stream, asking again while the healed cluster still counts a peer offline."""

    async def made() -> bool:
        try:
            await ensure_event_stream(nc, stream)
        except FuseError as error:
            if not error.retryable:
                raise
            return False
        return True

    await wait_for(made, timeout=30, interval=0.2)


async def consumer_leader(cluster: NatsCluster, nc: Any, stream: str, name: str) -> NatsServer:
    """The node that leads consumer `name` (waiting for the workers to have made it)."""
    leader: list[str] = []

    async def known() -> bool:
        try:
            info = await nc.jetstream().consumer_info(stream, name)
        except NatsError:
            return False
        if info.cluster is None or not info.cluster.leader:
            return False
        leader.append(info.cluster.leader)
        return True

    await wait_for(known, timeout=30)
    return cluster.node_named(leader[-1])


@pytest.mark.parametrize("victim", ["stream leader", "consumer leader"])
async def test_workers_keep_taking_tasks_across_a_node_killed_each_completes_once(
    healthy_cluster: NatsCluster, victim: str
) -> None:
    cluster = healthy_cluster
    prefix = new_prefix()
    subjects = Subjects(prefix)
    stream = MessageStreamSpec(subjects=subjects, replicas=3)
    runs: Counter[int] = Counter()

    async def work(ctx: TaskContext, job: dict[str, int]) -> dict[str, int]:
        runs[job["n"]] += 1
        ctx.publish("done", "task.done", {"n": job["n"]})  # an effect, stored with `completed`
        await asyncio.sleep(0.05)
        return {"n": job["n"]}

    worker = Worker(QUEUE, work, concurrency=2, max_attempts=10, backoff=(0.2, 1.0), ack_wait=4.0)
    urls = ",".join(cluster.urls)
    nc = await connect(urls, name="queues-cluster-test")
    workers_nc = [await connect(urls, name=f"queues-cluster-worker-{k}") for k in range(2)]
    try:
        await created(nc, stream)
        async with TaskQueue(nc, prefix=prefix, stream=stream, timeout=10) as queue:
            ids = [await queue.submit(QUEUE, {"n": n}) for n in range(TASKS)]
            async with (
                worker.run(workers_nc[0], key="a", prefix=prefix, stream=stream),
                worker.run(workers_nc[1], key="b", prefix=prefix, stream=stream),
            ):
                name = consumer_name(QUEUE, 0)
                if victim == "stream leader":
                    node = await cluster.stream_leader(subjects.message_stream_name)
                else:
                    node = await consumer_leader(cluster, nc, subjects.message_stream_name, name)
                while sum(1 for n in runs if runs[n]) < TASKS // 4:
                    await asyncio.sleep(0.01)
                await node.kill()
                killed_after = len(runs)

                async def all_completed() -> bool:
                    try:
                        tasks = [await queue.get(task_id) for task_id in ids]
                    except (FuseError, NatsError):  # the stream is electing a leader
                        return False
                    return all(t is not None and t.state == "completed" for t in tasks)

                await wait_for(all_completed, timeout=120)
                await settled(nc, prefix, name)
            await node.restart()
            await cluster.wait_ready()
            tasks = [await queue.get(task_id) for task_id in ids]
        assert killed_after < TASKS, "every task was handled before the kill"
        results = sorted(t.artifacts[0].parts[0].data["n"] for t in tasks if t is not None)  # type: ignore[index]
        assert results == list(range(TASKS))
        done = [payload(e).payload["n"] for e in await stored(nc, prefix, subjects.topic("done"))]
        assert sorted(done) == list(range(TASKS))  # none lost, none twice
        completed: Counter[str] = Counter()
        for envelope in await stored(nc, prefix, subjects.all_task_events):
            update = payload(envelope)
            if isinstance(update, TaskStatusUpdate) and update.state == "completed":
                completed[update.task_id] += 1
        assert completed == Counter({task_id: 1 for task_id in ids})  # each exactly once
        assert set(runs) == set(range(TASKS))
    finally:
        for client in (nc, *workers_nc):
            await client.close()
