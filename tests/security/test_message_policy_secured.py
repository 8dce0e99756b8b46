"""On a secured bus, a receiving agent's policy checks who signed a message, not who it says
sent it.

nats-server lets planner/1 and rogue/1 both write to coder's inbox (`send_to`); coder accepts
`task.assign` from planners only. Rogue claims to be the planner: the signature says rogue-1,
so the message is denied (not dead-lettered as a mere forgery), its request fails at once,
and coder, under its own agent identity, records the denial on its own stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from newfuse.agents import Agent, AgentClient, Context
from newfuse.agents.registry import stream_of
from newfuse.errors import MessageDeniedError
from newfuse.eventstore import open_event_store
from newfuse.schemas import PermissionDenied
from newfuse.security.identities import IdentityStore
from support import SecureBus, secured_nats, wait_for

handled: list[tuple[str, str]] = []
coder = Agent("coder", accepts={"planner": ["task.assign"]})


@coder.handler("task.assign")
async def assign(ctx: Context, body: dict[str, object]) -> dict[str, object]:
    handled.append((ctx.sender, str(body.get("n"))))
    return {"taken": body.get("n")}


class Secure(SecureBus):
    pass


@pytest.fixture(scope="module")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secure]:
    folder: Path = tmp_path_factory.mktemp("policy")
    identities = IdentityStore(folder / "auth")
    identities.add("admin", "admin")
    identities.add("coder-1", "agent", agent="coder/1")
    identities.add("planner-1", "agent", agent="planner/1", send_to=["coder"])
    identities.add("rogue-1", "agent", agent="rogue/1", send_to=["coder"])
    async with secured_nats(folder, identities) as server:
        yield Secure(server, identities)


async def test_the_signer_not_the_claimed_sender_is_what_the_policy_checks(secure: Secure) -> None:
    handled.clear()
    coder_nc = await secure.connect("coder-1")
    planner_nc = await secure.connect("planner-1")
    rogue_nc = await secure.connect("rogue-1")
    try:
        async with (
            coder.run(coder_nc, key="1") as running,
            AgentClient(planner_nc, sender="planner") as planner,
            AgentClient(rogue_nc, sender="planner") as rogue,  # claims to be the planner
        ):
            reply = await planner.request("coder", "task.assign", {"n": 1}, timeout=30)
            with pytest.raises(MessageDeniedError) as through_log:
                await rogue.request("coder", "task.assign", {"n": 2}, timeout=120)
            with pytest.raises(MessageDeniedError) as fast:
                await rogue.call("coder", "task.assign", {"n": 3}, timeout=120)
            fast_planner = await planner.call("coder", "task.assign", {"n": 4}, timeout=30)
    finally:
        for nc in (coder_nc, planner_nc, rogue_nc):
            await nc.close()
    assert reply.payload == {"taken": 1} and fast_planner.payload == {"taken": 4}
    assert sorted(handled) == [("planner", "1"), ("planner", "4")]
    for denied in (through_log.value, fast.value):
        assert (denied.sender, denied.message_type, denied.receiver) == (
            "rogue-1",
            "task.assign",
            "coder",
        )
        assert "it accepts nothing from sender type 'rogue' (senders it accepts: planner)" in (
            str(denied)
        )
    assert (running.denied, running.dead_lettered) == (2, 0)

    admin_store = await open_event_store(
        secure.server.url, prefix="fuse", credentials=secure.identities.credentials("admin")
    )
    async with admin_store:

        async def recorded() -> list[PermissionDenied]:
            return [
                event.data
                async for event in admin_store.read(stream_of("coder", "1"))
                if isinstance(event.data, PermissionDenied)
            ]

        async def both() -> bool:
            return sum(e.count for e in await recorded()) == 2

        await wait_for(both)
        events = await recorded()
    # both by rogue-1 (the signer), none in the planner's name it claimed
    assert {(e.identity, e.operation, e.message_type, e.seen_by) for e in events} == {
        ("rogue-1", "send", "task.assign", "coder/1")
    }
    assert {e.subject for e in events} == {"fuse.a2a.coder", "fuse.rpc.coder"}
