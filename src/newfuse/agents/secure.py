"""Getting a deployment ready for agents that connect under their own identities (`fuse auth`).

An agent's permissions let it read only its own consumers and create none, so what it reads
from is made for it first, by an identity that may: the streams, and each agent identity's
durable consumers with the configuration a default `Agent` of its type would ask for (an
agent that declares other delivery settings gets the ones made here; its start does not fail).
An agent identity of type `task-<queue>` is a worker of that queue: what is made for it is the
queue's ten consumers, as a default `Worker` asks for them.
"""

from __future__ import annotations

from nats.aio.client import Client

from newfuse.agents.queues import queue_consumers
from newfuse.agents.runtime import Agent, consumer_specs
from newfuse.nats import (
    EventStreamSpec,
    LivenessStreamSpec,
    MessageStreamSpec,
    Subjects,
    TimerStreamSpec,
    ensure_durable,
    ensure_event_stream,
)
from newfuse.nats.provision import server_supports_schedules, server_version
from newfuse.security.identities import Identity, worker_queue
from newfuse.security.key_service import open_sealers
from newfuse.security.keys import KVKeyStore


async def provision(nc: Client, identities: list[Identity], prefix: str) -> list[str]:
    """Create the streams, the timers' stream (where the server schedules messages), the KV
    buckets of the data subjects' keys and of who sealed which event, and every agent
    identity's consumers (a queue worker's: its queue's; idempotent);
    returns the consumers made or confirmed. `nc` must be an admin's connection (a service
    may confirm what exists, not create it)."""
    subjects = Subjects(prefix)
    await ensure_event_stream(nc, EventStreamSpec(subjects=subjects))
    await ensure_event_stream(nc, MessageStreamSpec(subjects=subjects))
    await ensure_event_stream(nc, LivenessStreamSpec(subjects=subjects))
    if server_supports_schedules(server_version(nc)):
        await ensure_event_stream(nc, TimerStreamSpec(subjects=subjects))
    await (await KVKeyStore.open(nc, prefix)).close()
    await open_sealers(nc, prefix, align=True)  # who sealed which event, as long as the messages
    made: list[str] = []
    for identity in identities:
        if identity.role != "agent" or identity.revoked:
            continue
        queue = worker_queue(identity.agent_type)
        if queue is not None:
            durables = queue_consumers(queue, subjects)
        else:
            agent = Agent(identity.agent_type, topics=identity.topics)
            durables = consumer_specs(agent, identity.agent_key, subjects)
        for durable in durables:
            await ensure_durable(nc, durable)
            made.append(durable.name)
    return made
