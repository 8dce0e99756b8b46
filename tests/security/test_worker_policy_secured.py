"""On a secured bus, a queue worker's policy checks who signed a task, not who it says
submitted it.

nats-server lets planner/1 and rogue/1 both submit to queue `resize` (`send_to` names its
workers' type, `task-resize`); the workers accept `thumbnail` tasks from planners only. Rogue
claims to be the planner: the signature says rogue-1, so its task is denied under rogue-1's
name (not run, failed at once with the reason), and the worker records the denial on its own
stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from newfuse.agents import TaskContext, TaskQueue, Worker
from newfuse.agents.registry import stream_of
from newfuse.errors import PermissionDeniedError
from newfuse.security.identities import IdentityStore
from support import SecuredBus, recorded_denials, secured_nats

ran: list[tuple[str, Any]] = []


async def resize(ctx: TaskContext, job: dict[str, Any]) -> dict[str, Any]:
    ran.append((ctx.sender, job.get("n")))
    return {"done": job.get("n")}


worker = Worker("resize", resize, heartbeat=0.5, accepts={"planner": ["thumbnail"]})


@pytest.fixture(scope="module")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SecuredBus]:
    folder: Path = tmp_path_factory.mktemp("worker-policy")
    identities = IdentityStore(folder / "auth")
    identities.add("admin", "admin")
    identities.add("resizer", "service")  # the bus's own process: a queue's workers
    identities.add("planner-1", "agent", agent="planner/1", send_to=["task-resize"])
    identities.add("rogue-1", "agent", agent="rogue/1", send_to=["task-resize"])
    async with secured_nats(folder, identities) as server:
        yield SecuredBus(server, identities)


async def test_the_signer_not_the_claimed_submitter_is_what_the_worker_policy_checks(
    secure: SecuredBus,
) -> None:
    ran.clear()
    names = ("resizer", "planner-1", "rogue-1", "admin")
    worker_nc, planner_nc, rogue_nc, admin_nc = [await secure.connect(n) for n in names]
    try:
        async with (
            worker.run(worker_nc, key="1") as running,
            TaskQueue(planner_nc, sender="planner") as planner,
            TaskQueue(rogue_nc, sender="planner") as rogue,  # claims to be the planner
            TaskQueue(admin_nc) as reader,  # an agent reads its own tasks: the admin, both
        ):
            honest = await planner.submit("resize", {"n": 1}, kind="thumbnail")
            forged = await rogue.submit("resize", {"n": 2}, kind="thumbnail")
            done = await reader.wait(honest, timeout=30)
            denied = await reader.wait(forged, timeout=30)
    finally:
        for nc in (worker_nc, planner_nc, rogue_nc, admin_nc):
            await nc.close()
    assert done.state == "completed" and ran == [("planner", 1)]
    assert [s.state for s in denied.statuses] == ["submitted", "failed"]
    said = denied.statuses[-1].message
    assert said is not None and said.parts[0].text == (
        "message denied: 'rogue-1' may not send 'thumbnail' (it accepts nothing from sender"
        " type 'rogue' (senders it accepts: planner); see its `accepts` policy)"
    )
    assert (running.handled, running.denied, running.dead_lettered) == (1, 1, 0)

    events = await recorded_denials(secure, stream_of("task-resize", "1"), count=1)
    # by rogue-1 (the signer), none in the planner's name it claimed
    assert [(e.identity, e.operation, e.message_type, e.seen_by, e.subject) for e in events] == [
        ("rogue-1", "send", "thumbnail", "task-resize/1", "fuse.task.resize.0")
    ]


async def test_an_agent_may_submit_only_to_the_queues_its_send_to_names(secure: SecuredBus) -> None:
    rogue_nc = await secure.connect("rogue-1")
    try:
        async with TaskQueue(rogue_nc, sender="rogue") as rogue:
            with pytest.raises(
                PermissionDeniedError,
                # the task's `submitted` status, stored first, under the queue's name
                match=r"identity 'rogue-1' may not publish to 'fuse\.a2a\._task\.other\.rogue-1\.",
            ):
                await rogue.submit("other", {"n": 3})
    finally:
        await rogue_nc.close()
