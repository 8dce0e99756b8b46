"""Queued tasks seal and open Personal() fields through the key service, on a secured
nats-server (each process its own identity).

planner/1 submits to queue `resize` a task whose payload struct declares a personal email: the
log (the queue's subject and the task's `submitted` status) holds ciphertext, the worker
task-resize/1's handler sees plaintext; the key service opens it for the submitter and the
queue's worker only, and refuses a third agent and another queue's worker. After `fuse forget`
the worker reads the replacement. Without the key service a submit stores nothing, and a
worker retries the task, then fails it with the reason, never running the handler on sealed
data. A handler that returns sealed fields fails its task instead of storing them. On a bus
without identities the same holds for whom the requests claim to be.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import msgspec
import pytest
from nats.aio.client import Client

from newfuse.agents import TaskContext, TaskQueue, Worker
from newfuse.errors import KeyServiceRefusedError, KeyServiceUnavailableError
from newfuse.nats import Subjects
from newfuse.nats.direct import DirectGet, sequence_of
from newfuse.schemas import REDACTED, DataSubject, Personal
from newfuse.security import KeyServiceClient
from newfuse.security.identities import IdentityStore
from support import SecuredBus, anonymous_keys, run_fuse, secured_nats, wait_for

EMAIL = "carol@example.com"


class Job(msgspec.Struct, frozen=True, kw_only=True):
    customer: Annotated[str, DataSubject()]
    email: Annotated[str, Personal()]
    image: str


seen: list[tuple[str, tuple[str, ...]]] = []


async def resize(ctx: TaskContext, job: Job) -> dict[str, str]:
    seen.append((job.email, ctx.redacted))
    return {"thumbnail": f"{job.image}.small"}


async def echo(ctx: TaskContext, job: Job) -> Job:
    return job  # its sealed fields would be stored in the clear in the task's result


worker = Worker("resize", resize, heartbeat=0.5, backoff=(0.1, 0.2))
echoer = Worker("echo", echo, heartbeat=0.5, max_attempts=1)


@pytest.fixture(scope="module")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SecuredBus]:
    folder: Path = tmp_path_factory.mktemp("task-sealing")
    identities = IdentityStore(folder / "auth")
    identities.add("admin", "admin")
    identities.add("keys", "service")
    identities.add("resizer-1", "agent", agent="task-resize/1")
    identities.add("echoer-1", "agent", agent="task-echo/1")
    identities.add("printer-1", "agent", agent="task-print/1")
    identities.add("planner-1", "agent", agent="planner/1", send_to=["task-resize", "task-echo"])
    identities.add("eve-1", "agent", agent="eve/1")
    async with secured_nats(folder, identities) as server:
        yield SecuredBus(server, identities)


async def bodies(admin: Client, subject: str) -> list[tuple[int, bytes]]:
    """The position and body of every message on `subject` (read as the admin)."""
    found = DirectGet(admin, "FUSE_A2A", timeout=5).messages(subject, "test")
    return [(sequence_of(msg), msg.data) async for msg in found]


@contextlib.asynccontextmanager
async def served(
    secure: SecuredBus, planner_nc: Client, worker: Worker, worker_nc: Client
) -> AsyncIterator[TaskQueue]:
    """planner/1's TaskQueue, with the key service and one worker of `worker` running."""
    async with (
        secure.key_service(),
        TaskQueue(planner_nc, sender="planner/1") as planner,
        worker.run(worker_nc, key="1"),
    ):
        yield planner


async def test_a_submitted_tasks_sealed_field_is_ciphertext_in_the_log_and_opens_for_its_parties(
    secure: SecuredBus,
) -> None:
    seen.clear()
    names = ("admin", "planner-1", "resizer-1", "eve-1", "printer-1")
    admin, planner_nc, resizer_nc, eve_nc, printer_nc = [await secure.connect(n) for n in names]
    try:
        async with served(secure, planner_nc, worker, resizer_nc) as planner:
            job = Job(customer="c-1", email=EMAIL, image="a.png")
            task_id = await planner.submit("resize", job, priority=3)
            done = await planner.wait(task_id, timeout=30)
            assert done.state == "completed", done.statuses
            assert seen == [(EMAIL, ())]  # the handler saw plaintext

            [(position, body)] = await bodies(admin, "fuse.task.resize.3")
            stored = json.loads(body)["data"]["payload"]
            assert stored["email"]["enc"] == "A256GCM" and stored["email"]["sub"] == "c-1"
            assert stored["image"] == "a.png" and stored["customer"] == "c-1"
            everything = await bodies(admin, "fuse.>")
            assert len(everything) > 3 and not [b for _, b in everything if EMAIL.encode() in b]
            status = "fuse.a2a._task.resize.planner-1." + task_id
            submitted = json.loads((await bodies(admin, status))[0][1])["data"]
            assert submitted["state"] == "submitted"
            assert submitted["message"]["payload"]["email"] == stored["email"]  # sealed too

            for party in (planner_nc, resizer_nc):  # the submitter and the queue's worker
                opened = await KeyServiceClient(party).open(position)
                assert json.loads(bytes(opened.values["$.payload.email"])) == EMAIL
            with pytest.raises(KeyServiceRefusedError, match=r"'eve-1' may not open"):
                await KeyServiceClient(eve_nc).open(position)
            with pytest.raises(KeyServiceRefusedError, match=r"'printer-1' may not open"):
                await KeyServiceClient(printer_nc).open(position)  # another queue's worker
    finally:
        for nc in (admin, planner_nc, resizer_nc, eve_nc, printer_nc):
            await nc.close()


async def test_after_fuse_forget_the_worker_reads_the_replacement(secure: SecuredBus) -> None:
    seen.clear()
    planner_nc, resizer_nc = await secure.connect("planner-1"), await secure.connect("resizer-1")
    try:
        async with (
            secure.key_service() as service,
            TaskQueue(planner_nc, sender="planner/1") as planner,
        ):
            job = Job(customer="c-2", email=EMAIL, image="b.png")
            task_id = await planner.submit("resize", job)
            run_fuse("forget", "c-2", "--reason", "erasure request", env=secure.admin_env())

            async def forgotten() -> bool:  # the service heard the purge
                return await service.cipher.keys.get("c-2") is None

            await wait_for(forgotten)
            async with worker.run(resizer_nc, key="1"):
                done = await planner.wait(task_id, timeout=30)
        assert done.state == "completed"
        assert seen == [(REDACTED, ("$.payload.email",))]
    finally:
        for nc in (planner_nc, resizer_nc):
            await nc.close()


async def test_without_the_key_service_nothing_is_stored_and_the_task_fails_with_the_reason(
    secure: SecuredBus,
) -> None:
    seen.clear()
    names = ("admin", "planner-1", "resizer-1")
    admin, planner_nc, resizer_nc = [await secure.connect(n) for n in names]
    js = admin.jetstream()

    async def queued() -> int:
        info = await js.stream_info("FUSE_A2A", subjects_filter="fuse.task.resize.9")
        return sum((info.state.subjects or {}).values())

    try:
        async with TaskQueue(planner_nc, sender="planner/1") as planner:
            async with secure.key_service():
                job = Job(customer="c-3", email=EMAIL, image="c.png")
                task_id = await planner.submit("resize", job, priority=9, max_attempts=2)
            assert await queued() == 1
            with pytest.raises(KeyServiceUnavailableError, match=r"is a key service running"):
                await planner.submit("resize", job, priority=9)
            assert await queued() == 1  # the refused submit stored nothing
            async with worker.run(resizer_nc, key="1"):  # the service is gone
                failed = await planner.wait(task_id, timeout=30)
        assert failed.state == "failed" and seen == []  # never handled unopened
        reason = failed.statuses[-1].message.parts[0].text or ""  # type: ignore[union-attr]
        assert "KeyServiceUnavailableError" in reason
    finally:
        for nc in (admin, planner_nc, resizer_nc):
            await nc.close()


async def test_a_handler_that_returns_sealed_fields_fails_its_task(secure: SecuredBus) -> None:
    planner_nc, echoer_nc = await secure.connect("planner-1"), await secure.connect("echoer-1")
    try:
        async with served(secure, planner_nc, echoer, echoer_nc) as planner:
            job = Job(customer="c-4", email=EMAIL, image="d.png")
            failed = await planner.wait(await planner.submit("echo", job), timeout=30)
        assert failed.state == "failed" and not failed.artifacts
        reason = failed.statuses[-1].message.parts[0].text or ""  # type: ignore[union-attr]
        assert "a task's result is not sealed" in reason and EMAIL not in reason
    finally:
        for nc in (planner_nc, echoer_nc):
            await nc.close()


async def test_on_a_bus_without_identities_a_worker_opens_what_its_queue_was_sent(
    nats_url: str,
) -> None:
    seen.clear()
    async with anonymous_keys(nats_url) as (nc, prefix):
        async with (
            TaskQueue(nc, prefix=prefix, sender="planner/1") as planner,
            worker.run(nc, key="1", prefix=prefix),
        ):
            job = Job(customer="c-5", email=EMAIL, image="e.png")
            done = await planner.wait(await planner.submit("resize", job), timeout=30)
            assert done.state == "completed" and seen == [(EMAIL, ())]
            stream = Subjects(prefix).message_stream_name
            found = await DirectGet(nc, stream, timeout=5).last_for(f"{prefix}.task.resize.0", "t")
            assert found is not None and EMAIL.encode() not in found.data
            # no signatures to check: who asks is who it claims (a guard against mistakes)
            position = sequence_of(found)
            for claimed in ("planner/1", "task-resize/2"):
                keys = KeyServiceClient(nc, prefix=prefix, requester=claimed)
                assert (await keys.open(position)).values["$.payload.email"]
            for claimed in ("eve/1", "task-print/1"):
                with pytest.raises(KeyServiceRefusedError, match=rf"'{claimed}' may not open"):
                    await KeyServiceClient(nc, prefix=prefix, requester=claimed).open(position)
