"""On a secured bus, a queue's worker and its submitters are agent identities, least privilege.

resizer-1 is an agent of type `task-resize` (a worker of queue `resize`), printer-1 one of
`task-print`; planner-1 and planner-2 may submit to `resize` (`send_to` names `task-resize`).
The server lets resizer-1 take `resize`'s tasks and store their statuses, and refuses it
`print`'s consumers and `print`'s task subjects; a planner reads the statuses of the tasks it
submitted, and not another planner's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from newfuse.agents import RunningWorker, TaskContext, TaskQueue, Worker, wire
from newfuse.agents.queues import TASK_MESSAGE_TYPE, _status
from newfuse.errors import PermissionDeniedError, TaskQueueUnknownError
from newfuse.nats import Subjects
from newfuse.nats.connection import guarded
from newfuse.nats.signing import signed
from newfuse.schemas import A2AMessage, A2AMetadata
from newfuse.security.identities import IdentityStore
from support import SecuredBus, raw_nats, refused, secured_nats, wait_for

PRINT_TASK = "fuse.a2a._task.print.planner-1.t-1"


async def resize(ctx: TaskContext, job: dict[str, Any]) -> dict[str, Any]:
    if job.get("slow"):
        started.set()
        await asyncio.sleep(60)  # until canceled
    return {"thumbnail": f"{job['image']}.small", "by": str(ctx.agent_id)}


started = asyncio.Event()


worker = Worker("resize", resize, heartbeat=0.5)


@pytest.fixture(scope="module")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SecuredBus]:
    folder: Path = tmp_path_factory.mktemp("queue-worker")
    identities = IdentityStore(folder / "auth")
    identities.add("admin", "admin")
    identities.add("resizer-1", "agent", agent="task-resize/1")
    identities.add("printer-1", "agent", agent="task-print/1")
    identities.add("planner-1", "agent", agent="planner/1", send_to=["task-resize"])
    identities.add("planner-2", "agent", agent="planner/2", send_to=["task-resize"])
    async with secured_nats(folder, identities) as server:
        yield SecuredBus(server, identities)


async def test_an_agent_submits_a_worker_agent_runs_it_and_the_submitter_waits_for_the_result(
    secure: SecuredBus,
) -> None:
    worker_nc, planner_nc = await secure.connect("resizer-1"), await secure.connect("planner-1")
    try:
        async with (
            worker.run(worker_nc, key="1") as running,
            TaskQueue(planner_nc, sender="planner") as planner,
        ):
            task_id = await planner.submit("resize", {"image": "a.png"}, priority=7)
            done = await planner.wait(task_id, timeout=30)
            again = await TaskQueue(planner_nc, sender="planner").get(task_id, queue="resize")
    finally:
        await worker_nc.close()
        await planner_nc.close()
    assert done.state == "completed" and running.handled == 1
    [artifact] = done.artifacts
    assert artifact.parts[0].data == {"thumbnail": "a.png.small", "by": "task-resize/1"}
    assert again is not None and again.state == "completed"  # found by its queue
    admin_nc = await secure.connect("admin")
    try:
        async with TaskQueue(admin_nc) as admin:  # the whole history, found by its id alone
            history = await admin.get(task_id)
    finally:
        await admin_nc.close()
    assert history is not None
    assert [s.state for s in history.statuses] == ["submitted", "working", "completed"]


async def test_a_submitting_agent_cancels_its_running_task_and_the_worker_agent_ends_it(
    secure: SecuredBus,
) -> None:
    started.clear()
    worker_nc, planner_nc = await secure.connect("resizer-1"), await secure.connect("planner-1")
    try:
        async with (
            worker.run(worker_nc, key="1") as running,
            TaskQueue(planner_nc, sender="planner") as planner,
        ):
            task_id = await planner.submit("resize", {"image": "c.png", "slow": True})
            await asyncio.wait_for(started.wait(), timeout=30)
            assert await planner.cancel(task_id) is True
            ended = await planner.wait(task_id, timeout=30)
            await wait_for(lambda: _counted(running))
    finally:
        await worker_nc.close()
        await planner_nc.close()
    assert ended.state == "canceled"


async def _counted(running: RunningWorker) -> bool:
    return running.cancelled == 1


async def test_the_server_refuses_a_worker_another_queues_consumers_and_task_subjects(
    secure: SecuredBus,
) -> None:
    nc, violations = await raw_nats(secure.server.url, secure.identities, "resizer-1")
    js = nc.jetstream(timeout=1)
    forged, forged_headers = _status("t-1", "t-1", "completed", event_id="forged", sender="x/1")
    try:
        # its own queue's consumer answers (so what follows is refused for what it names)
        own = await nc.request("$JS.API.CONSUMER.INFO.FUSE_A2A.task-resize-p0", b"", timeout=5)
        assert b'"name":"task-resize-p0"' in own.data
        for api in (
            "$JS.API.CONSUMER.MSG.NEXT.FUSE_A2A.task-print-p0",  # taking print's tasks
            "$JS.API.CONSUMER.INFO.FUSE_A2A.task-print-p9",
            f"$JS.API.DIRECT.GET.FUSE_A2A.{PRINT_TASK}",  # reading a print task's status
            "$JS.API.DIRECT.GET.FUSE_A2A",  # reading the message stream by sequence
        ):
            with pytest.raises(nats.errors.Error):
                await nc.request(api, b"1" if "NEXT" in api else b"", timeout=1)
            await refused(violations, api)
        # a forged status of a print task, and its acks on print's consumer
        for subject in (PRINT_TASK, "$JS.ACK.FUSE_A2A.task-print-p0.1.1.1.1.1.0"):
            with pytest.raises(nats.errors.Error):
                await js.publish(subject, forged, headers=forged_headers)
            await refused(violations, subject)
        # pulling print's tasks through a consumer of its own on print's subject
        with pytest.raises(nats.errors.Error):
            await js.pull_subscribe("fuse.task.print.0", durable="mine", stream="FUSE_A2A")
    finally:
        await nc.close()
    admin = await secure.connect("admin")
    try:
        stored = await admin.jetstream().stream_info("FUSE_A2A", subjects_filter=PRINT_TASK)
        assert not stored.state.subjects  # nothing of the forgery was stored
    finally:
        await admin.close()


async def test_a_forged_status_of_another_queue_is_permission_denied_at_once(
    secure: SecuredBus,
) -> None:
    nc = await secure.connect("resizer-1")
    forged, forged_headers = _status("t-1", "t-1", "failed", event_id="forged-2", sender="x/1")
    try:
        with pytest.raises(
            PermissionDeniedError,
            match=r"identity 'resizer-1' may not publish to 'fuse\.a2a\._task\.print\.",
        ):
            publish = nc.jetstream(timeout=30).publish(PRINT_TASK, forged, headers=forged_headers)
            await guarded(nc, PRINT_TASK, publish)  # how our stores publish
    finally:
        await nc.close()


async def test_a_submitter_reads_its_own_tasks_and_the_server_refuses_it_another_submitters(
    secure: SecuredBus,
) -> None:
    planner_nc = await secure.connect("planner-1")
    try:
        async with TaskQueue(planner_nc, sender="planner") as planner:
            task_id = await planner.submit("resize", {"image": "b.png"})
            assert (await planner.get(task_id)) is not None  # its own: it reads it
            with pytest.raises(TaskQueueUnknownError, match=r"pass queue="):
                await planner.get("someone-elses")
    finally:
        await planner_nc.close()
    subject = Subjects("fuse").queued_task_events("resize", "planner-1", task_id)
    nc, violations = await raw_nats(secure.server.url, secure.identities, "planner-2")
    js = nc.jetstream(timeout=1)
    forged, forged_headers = _status(task_id, task_id, "canceled", event_id="x", sender="x/1")
    try:
        api = f"$JS.API.DIRECT.GET.FUSE_A2A.{subject}"
        with pytest.raises(nats.errors.Error):
            await nc.request(api, b"", timeout=1)
        await refused(violations, api)
        with pytest.raises(nats.errors.Error):  # nor may it cancel (or fake) planner-1's task
            await js.publish(subject, forged, headers=forged_headers)
        await refused(violations, subject)
    finally:
        await nc.close()


async def test_a_task_that_names_another_submitter_gets_its_statuses_under_its_signer(
    secure: SecuredBus,
) -> None:
    # planner-2 queues a task as planner-1's (its terms name planner-1): signed, so the worker
    # stores its statuses under planner-2, where planner-1 never reads
    worker_nc, forger_nc = await secure.connect("resizer-1"), await secure.connect("planner-2")
    task_id, queue_subject = "forged-1", "fuse.task.resize.0"
    message = A2AMessage(
        type=TASK_MESSAGE_TYPE,
        payload={"image": "d.png"},
        metadata=A2AMetadata(sender="planner"),
        message_id="forged-1-message",
        task_id=task_id,
        role="user",
    )
    body, wire_headers = wire.encode(
        "queue.resize",
        wire.MESSAGE_TYPE,
        message,
        event_id="forged-1-message",
        metadata={"queue": "resize", "priority": "0", "submitter": "planner-1"},
    )
    subjects = Subjects("fuse")
    own, victim = (
        subjects.queued_task_events("resize", name, task_id) for name in ("planner-2", "planner-1")
    )
    admin_nc = await secure.connect("admin")
    js = admin_nc.jetstream()

    async def stored_on(subject: str) -> dict[str, int] | None:
        return (await js.stream_info("FUSE_A2A", subjects_filter=subject)).state.subjects

    async def ended() -> bool:
        return await stored_on(own) == {own: 2}  # working, completed

    try:
        async with worker.run(worker_nc, key="1"):
            await forger_nc.jetstream().publish(
                queue_subject, body, headers=signed(forger_nc, queue_subject, body, wire_headers)
            )
            await wait_for(ended)
        assert not await stored_on(victim)
    finally:
        for nc in (worker_nc, forger_nc, admin_nc):
            await nc.close()
