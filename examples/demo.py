"""The newfuse tour: two agents talk over JetStream, and every message is an event you can replay.

Run with `make demo`. It starts a real nats-server (JetStream) and valkey from the installed
wheels on free loopback ports, runs two in-process agents that exchange A2A messages, replays the
conversation from the log, and stops everything it started.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from newfuse.eventstore import EventFilter, EventStore, open_event_store
from newfuse.nats import NatsServer, ValkeyServer
from newfuse.projections import AgentStateView, AuditIndex, ProjectionGroup
from newfuse.projections.builtin import BuiltinProjections
from newfuse.schemas import A2AMessage, A2AMetadata, NewEvent, RecordedEvent, StateUpdate

CONVERSATION = "conv-1"
QUESTIONS = ["summarise the Q3 report", "list the open risks", "draft a reply to the CFO"]


def show(event: RecordedEvent, direction: str) -> None:
    message: A2AMessage = event.data
    print(
        f"  #{event.position:<3} {direction:<9} {message.metadata.sender:>10} -> "
        f"{event.stream.partition('.')[2]:<10} {message.type:<13} {message.payload}"
    )


async def send(
    store: EventStore,
    sender: str,
    to: str,
    kind: str,
    payload: dict[str, str],
    causation: str | None = None,
) -> None:
    message = A2AMessage(type=kind, payload=payload, metadata=A2AMetadata(sender=sender))
    await store.append(
        f"inbox.{to}",
        NewEvent(data=message, correlation_id=CONVERSATION, causation_id=causation),
    )


async def researcher(store: EventStore) -> None:
    """Answers every task.request in its inbox with a task.result."""
    async with store.subscribe(EventFilter(streams=("inbox.researcher",))) as inbox:
        async for event in inbox:
            show(event, "received")
            question = event.data.payload["question"]
            answer = {"question": question, "answer": f"done: {question}"}
            await send(store, "researcher", "planner", "task.result", answer, causation=event.id)
            if question == QUESTIONS[-1]:
                return


async def planner(store: EventStore) -> None:
    """Sends questions, and prints the answers as they arrive in its inbox."""
    async with store.subscribe(EventFilter(streams=("inbox.planner",))) as inbox:
        for question in QUESTIONS:
            await send(store, "planner", "researcher", "task.request", {"question": question})
        answers = 0
        async for event in inbox:
            show(event, "received")
            answers += 1
            if answers == len(QUESTIONS):
                return


async def project(store: EventStore, redis_url: str, head: int) -> None:
    """Run the built-in projections up to `head`; show agent state and an audit query."""
    with tempfile.TemporaryDirectory(prefix="newfuse-demo-") as tmp:
        audit_db = str(Path(tmp) / "read-models.db")
        async with await BuiltinProjections.open(redis_url=redis_url, audit_db=audit_db) as models:
            runners = models.runners(store)
            group = ProjectionGroup(runners)
            running = asyncio.create_task(group.run(handle_signals=False))
            for runner in runners:
                await runner.wait_until(head, timeout=10)
                print(f"  projection {runner.name:<12} caught up: checkpoint {runner.checkpoint}")
            group.request_stop()
            await running

            print("\n   agent state in Redis (the fold of each agent's stream):")
            for state in await AgentStateView(models.redis).agents():
                print(f"  {state.agent_id:<11} v{state.version} {state.state}")

            print("\n4. audit: who did what in 'conv-1', from the SQLite audit index")
            async with await AuditIndex.open(audit_db) as audit:
                for row in await audit.query(correlation_id=CONVERSATION):
                    print(
                        f"  #{row.position:<3} {row.time:%H:%M:%S.%f} {row.sender or '-':>10} "
                        f"{row.type:<12} {row.stream}"
                    )
                result = await audit.sql(
                    "SELECT type, count(*) FROM audit_events GROUP BY type ORDER BY type"
                )
                counts = ", ".join(f"{kind}: {count}" for kind, count in result.rows)
                print(f"  events by type: {counts}")


async def main() -> int:
    print("starting nats-server (JetStream) and valkey-server from the installed wheels…")
    async with NatsServer() as nats, ValkeyServer() as valkey:
        print(f"  nats:   {nats.url} (pid {nats.pid})")
        print(f"  valkey: {valkey.url} (pid {valkey.pid})")
        async with await open_event_store(nats.url, prefix="demo") as store:
            print("\n1. two agents exchange A2A messages; each is an event in JetStream")
            async with asyncio.timeout(30):
                async with asyncio.TaskGroup() as group:
                    group.create_task(researcher(store))
                    group.create_task(planner(store))

            print(f"\n2. replay the conversation {CONVERSATION!r} from the log")
            replay = store.read_all(filter=EventFilter(correlation_id=CONVERSATION))
            async for event in replay:
                cause = f" (caused by {event.causation_id[:8]}…)" if event.causation_id else ""
                print(
                    f"  #{event.position:<3} v{event.version} {event.stream:<17} "
                    f"{event.data.type:<13}{cause}"
                )
            print("\n3. each agent records its state as events, then the projections catch up")
            for agent, steps in (("planner", 3), ("researcher", 4)):
                for version in range(1, steps + 1):
                    update = StateUpdate(
                        agent_id=agent,
                        state={"step": version, "busy": version < steps},
                        version=version,
                    )
                    await store.append(f"agent.{agent}", NewEvent(data=update))
            head = await store.head_position()
            await project(store, valkey.url, head)
            print(f"\n{head} events stored; stopping the servers")
    print("done: no server left running")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
