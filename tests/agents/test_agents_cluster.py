"""Agents on the local 3-node cluster: the message stream's leader SIGKILLed mid-traffic."""

from __future__ import annotations

import asyncio

import pytest
from messages import payload, settled, stored

from newfuse.agents import Agent, AgentClient, Context
from newfuse.nats import MessageStreamSpec, Subjects, connect
from newfuse.nats.cluster import NatsCluster
from support import new_prefix, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ORDERS = 60


async def test_the_stream_leader_killed_mid_traffic_loses_no_order_and_repeats_no_effect(
    healthy_cluster: NatsCluster,
) -> None:
    cluster = healthy_cluster
    prefix = new_prefix()
    subjects = Subjects(prefix)
    stream = MessageStreamSpec(subjects=subjects, replicas=3, duplicate_window=0.5)
    calls: list[int] = []
    relay = Agent("relay", ack_wait=2.0, max_attempts=8, backoff=(0.2, 2.0))

    @relay.handler("order")
    async def order(ctx: Context, body: dict[str, int]) -> dict[str, int]:
        calls.append(body["n"])
        ctx.send("sink", "shipped", {"n": body["n"]})
        await asyncio.sleep(0.02)
        return {"n": body["n"]}

    nc = await connect(",".join(cluster.urls), name="agents-cluster-test")
    try:
        async with AgentClient(nc, prefix=prefix, stream=stream, timeout=10) as client:
            requests = [
                asyncio.create_task(client.request("relay", "order", {"n": n}, timeout=120))
                for n in range(ORDERS)
            ]

            async def all_sent() -> bool:  # every request is stored before the kill
                return len(await stored(nc, prefix, subjects.agent_type("relay"))) == ORDERS

            await wait_for(all_sent, timeout=30)
            async with relay.run(nc, key="1", prefix=prefix, stream=stream):
                while len(calls) < ORDERS // 4:
                    await asyncio.sleep(0.01)
                leader = await cluster.stream_leader(subjects.message_stream_name)
                await leader.kill()
                killed_after = len(calls)
                replies = await asyncio.wait_for(asyncio.gather(*requests), timeout=120)
                await settled(nc, prefix, "relay")
            await leader.restart()
            await cluster.wait_ready()
            assert sorted(r.payload["n"] for r in replies) == list(range(ORDERS))
            shipped = [
                payload(e).payload["n"]
                for e in await stored(nc, prefix, subjects.agent_type("sink"))
            ]
            assert sorted(shipped) == list(range(ORDERS))  # none lost, none twice
            stored_replies = await stored(nc, prefix, subjects.reply(">"))
            assert sorted(payload(e).payload["n"] for e in stored_replies) == list(range(ORDERS))
            assert set(calls) == set(range(ORDERS))
            assert killed_after < ORDERS, "every order was handled before the kill"
    finally:
        await nc.close()
