"""Every key a Redis projection writes, over all its generations, hashes to one Redis Cluster slot
(the `{<name>}` hash tag), so its MULTI/EXEC batches and Lua scripts can run on a cluster."""

from __future__ import annotations

from pathlib import Path

from redis.crc import key_slot

from newfuse.eventstore import open_event_store
from newfuse.projections import (
    AgentStateView,
    Projection,
    ProjectionRunner,
    RedisBatch,
    RedisReadModel,
    RetryPolicy,
    agent_state_projection,
    rebuild,
)
from newfuse.schemas import NewEvent, RecordedEvent, StateUpdate

_MAX = (
    "if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or 0) then "
    "redis.call('SET', KEYS[1], ARGV[1]) end"
)


def flaky_projection() -> Projection[RedisBatch]:
    """Writes through command, hset and a Lua script; n == 3 fails (a dead letter)."""
    projection: Projection[RedisBatch] = Projection("flaky", retry=RetryPolicy(attempts=1))

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
