"""Identities and permissions enforced by nats-server, not by our library.

A server runs with the configuration `server_config` writes for four identities: an admin, the
agent echo/1, the agent caller/1 (it may write to echo's inbox) and the agent mallory/1 (it may
write to no one's). Mallory then connects with plain nats-py and the server refuses: publishing
as echo, reading echo's inbox, reading the log, deleting a stream. Through our API a refused
publish is a PermissionDeniedError at once, not a timeout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from newfuse.agents import Agent, AgentClient, Context
from newfuse.core import Orchestrator, Saga, StepContext
from newfuse.errors import PermissionDeniedError
from newfuse.eventstore import open_event_store
from newfuse.nats import Subjects, connect
from newfuse.nats.connection import Credentials
from newfuse.security.identities import IdentityStore, server_config
from newfuse.security.keys import KVKeyStore
from support import SecuredBus, raw_nats, refused, secured_nats

echo = Agent("echo", description="answers with what it was sent")


@echo.handler("ping")
async def ping(ctx: Context, body: dict[str, object]) -> dict[str, object]:
    return {"echo": body, "by": str(ctx.agent_id)}


@dataclass
class Secure(SecuredBus):
    prefix: str

    def seed(self, name: str) -> str:
        return self.identities.seed(name)


@pytest.fixture(scope="module")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secure]:
    folder = tmp_path_factory.mktemp("secure")
    identities = IdentityStore(folder / "auth")
    identities.add("admin", "admin")
    identities.add("echo-1", "agent", agent="echo/1")
    identities.add("caller", "agent", agent="caller/1", send_to=["echo"])
    identities.add("mallory", "agent", agent="mallory/1")
    identities.add("orchestrator", "service")
    async with secured_nats(folder, identities) as server:
        yield Secure(server, identities, "fuse")


async def raw(secure: Secure, name: str) -> tuple[Client, list[str]]:
    """A plain nats-py connection as `name`, and the violations the server reports to it."""
    return await raw_nats(secure.server.url, secure.identities, name)


async def test_an_agent_under_its_identity_answers_a_caller_under_its_own(secure: Secure) -> None:
    agent_nc, caller_nc = await secure.connect("echo-1"), await secure.connect("caller")
    try:
        async with (
            echo.run(agent_nc, key="1"),
            AgentClient(caller_nc, sender="caller") as caller,
        ):
            reply = await caller.request("echo", "ping", {"n": 1}, timeout=10)
            assert reply.payload == {"echo": {"n": 1}, "by": "echo/1"}
            fast = await caller.call("echo", "ping", {"n": 2})
            assert fast.payload["echo"] == {"n": 2}
    finally:
        await agent_nc.close()
        await caller_nc.close()


async def test_through_our_api_a_refused_publish_is_permission_denied_not_a_timeout(
    secure: Secure,
) -> None:
    nc = await secure.connect("mallory")
    try:
        async with AgentClient(nc, sender="mallory", timeout=60) as mallory:
            with pytest.raises(PermissionDeniedError) as denied:
                await mallory.send("echo", "ping", {"n": 3})
    finally:
        await nc.close()
    assert denied.value.identity == "mallory"
    assert denied.value.subject == "fuse.a2a.echo"
    assert "identity 'mallory' may not publish to 'fuse.a2a.echo'" in str(denied.value)


async def test_the_server_refuses_a_forger_that_uses_plain_nats_py(secure: Secure) -> None:
    nc, violations = await raw(secure, "mallory")
    js = nc.jetstream(timeout=1)
    try:
        # publishing as echo: into echo's inbox, its registration stream, its heartbeat
        for subject in ("fuse.a2a.echo", "fuse.ev.agent.echo-1", "fuse.agents.echo.1"):
            with pytest.raises(nats.errors.Error):
                await js.publish(subject, b"{}")
            await refused(violations, subject)
        # reading echo's inbox: its durable consumer, or a new consumer on its subject
        with pytest.raises(nats.errors.Error):
            await nc.request("$JS.API.CONSUMER.MSG.NEXT.FUSE_A2A.echo", b"1", timeout=1)
        await refused(violations, "$JS.API.CONSUMER.MSG.NEXT.FUSE_A2A.echo")
        with pytest.raises(nats.errors.Error):
            await js.pull_subscribe("fuse.a2a.echo", durable="mine", stream="FUSE_A2A")
        # reading the whole log: a consumer on it, or a direct or stream get of any message
        with pytest.raises(nats.errors.Error):
            await js.subscribe(
                "fuse.ev.>",
                stream="FUSE_EVENTS",
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
            )
        for get in ("$JS.API.DIRECT.GET.FUSE_EVENTS", "$JS.API.STREAM.MSG.GET.FUSE_EVENTS"):
            with pytest.raises(nats.errors.Error):
                await nc.request(get, b'{"seq":1}', timeout=1)
            await refused(violations, get)
        # someone else's replies
        await nc.subscribe("fuse.a2a._reply.caller")
        await refused(violations, 'subscription to "fuse.a2a._reply.caller"')
        # deleting a stream
        with pytest.raises(nats.errors.Error):
            await nc.request("$JS.API.STREAM.DELETE.FUSE_EVENTS", b"", timeout=1)
        await refused(violations, "$JS.API.STREAM.DELETE.FUSE_EVENTS")
    finally:
        await nc.close()
    admin = await secure.connect("admin")
    try:
        info = await admin.jetstream().stream_info("FUSE_EVENTS")
        assert info.config.name == "FUSE_EVENTS"  # still there
        echo_inbox = await admin.jetstream().consumer_info("FUSE_A2A", "echo")
        assert echo_inbox.delivered.stream_seq == 0 or echo_inbox.name == "echo"
    finally:
        await admin.close()


async def test_an_unknown_key_cannot_connect(secure: Secure, tmp_path: Path) -> None:
    stranger = IdentityStore(tmp_path / "other")
    stranger.add("stranger", "admin")
    # refused at the server's third refusal in a row, not at the connect's deadline: the
    # outer bound is far below the deadline, so a connect that waited for it fails the test
    with pytest.raises(PermissionDeniedError, match="identity 'stranger' may not connect to"):
        async with asyncio.timeout(30):
            await connect(
                secure.server.url, credentials=stranger.credentials("stranger"), timeout=300
            )


def test_credentials_files_are_owner_only_and_the_config_holds_no_seed(
    secure: Secure,
) -> None:
    folder = secure.identities.directory
    for identity in secure.identities.list():
        path = secure.identities.seed_file(identity.name)
        assert path.stat().st_mode & 0o777 == 0o600
        seed = secure.identities.seed(identity.name)
        assert seed.startswith("SU")
        config = server_config(secure.identities.list(), Subjects("fuse"))
        assert seed not in config and identity.public_key in config
    assert (folder.stat().st_mode & 0o077) == 0


def test_a_revoked_identity_is_left_out_of_the_server_config(tmp_path: Path) -> None:
    identities = IdentityStore(tmp_path / "auth")
    identities.add("admin", "admin")
    gone = identities.add("old", "agent", agent="old/1")
    identities.revoke("old")
    assert gone.public_key not in server_config(identities.list(), Subjects("fuse"))
    assert not identities.seed_file("old").exists()
    with pytest.raises(Exception, match="revoked"):
        identities.credentials("old")
    assert isinstance(identities.credentials("admin"), Credentials)


async def test_a_sender_the_signature_does_not_back_is_dead_lettered(secure: Secure) -> None:
    """Caller may write to echo's inbox. Claiming to be someone else (its messages are signed
    as caller), or sending with plain nats-py (unsigned), ends as a dead letter, not handled."""
    agent_nc, caller_nc = await secure.connect("echo-1"), await secure.connect("caller")
    raw_nc, _ = await raw(secure, "caller")
    try:
        async with echo.run(agent_nc, key="1") as running:
            handled, dead = running.handled, running.dead_lettered
            async with AgentClient(caller_nc, sender="planner") as forger:
                await forger.send("echo", "ping", {"n": "forged"})
            admin = await secure.connect("admin")
            try:
                last = await admin.jetstream().get_last_msg("FUSE_A2A", "fuse.a2a.echo")
            finally:
                await admin.close()
            await raw_nc.jetstream().publish(
                "fuse.a2a.echo", last.data, headers={"Nats-Msg-Id": "unsigned-copy"}
            )
            async with AgentClient(caller_nc, sender="caller") as honest:
                reply = await honest.request("echo", "ping", {"n": "honest"}, timeout=10)
            assert reply.payload["echo"] == {"n": "honest"}
            async with asyncio.timeout(10):
                while running.dead_lettered < dead + 2 or running.handled < handled + 1:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            assert running.handled == handled + 1  # only the honest one
    finally:
        for nc in (agent_nc, caller_nc, raw_nc):
            await nc.close()


async def test_a_service_drives_sagas_on_timers_and_keeps_keys_under_its_identity(
    secure: Secure,
) -> None:
    """A service (an orchestrator, a projection) reaches what `provision` made for it: the
    timers' stream (a backoff woken by its schedule, an hour's safety poll) and the keys' KV
    bucket; it may not delete a stream."""
    retrying = Saga("retrying")

    @retrying.step("work", attempts=2, backoff=0.5)
    async def work(ctx: StepContext) -> int:
        if ctx.attempt == 1:
            raise RuntimeError("not yet")
        return ctx.attempt

    credentials = secure.identities.credentials("orchestrator")
    store = await open_event_store(secure.server.url, prefix="fuse", credentials=credentials)
    try:
        async with Orchestrator(store, [retrying], safety_poll=3600) as orchestrator:
            state = await orchestrator.wait(await orchestrator.start("retrying"), timeout=30)
            assert orchestrator.timers is not None and orchestrator.timers.backend == "jetstream"
            assert orchestrator.timers.fired >= 1
    finally:
        await store.close()
    assert state.status == "committed"

    nc = await secure.connect("orchestrator")
    try:
        keys = await KVKeyStore.open(nc, "fuse", create=False)
        try:
            made = await keys.create("customer-7")
            assert await keys.get("customer-7") == made
            assert await keys.forget("customer-7") == made.kid
        finally:
            await keys.close()
    finally:
        await nc.close()
    forger, violations = await raw(secure, "orchestrator")
    try:
        await forger.publish("$JS.API.STREAM.DELETE.FUSE_EVENTS", b"")
        await refused(violations, "$JS.API.STREAM.DELETE.FUSE_EVENTS")
    finally:
        await forger.close()
