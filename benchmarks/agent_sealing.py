"""Agent sealing benchmark: a request whose payload has one Personal() field, sealed through
the key service by the sender and opened through it by the receiver, against the same request
whose struct has no marker.

One run starts an embedded nats-server and a key service on it twice: anonymous (no
identities), then secured (each process its own identity, as `fuse dev --secure`: every
message and key-service request signed and checked, and each seal noting its sealer in the
KV bucket `<prefix>_sealers`). Lines (JSON, keys name, ours, baseline, unit, ratio, n; ratio =
baseline / ours, higher is better):
- `agent_sealing.round_trip.p50`, `.p99`: ms per `AgentClient.request` through the log, one at
  a time, to an agent whose handler returns a plain answer. Ours: two more core NATS round
  trips (seal before the request is stored, open before the handler runs), the open reading
  the stored message by direct get. Rounds alternate (ours, baseline, ...); the best of each
  side is kept.
- `agent_sealing.secured.round_trip.p50`, `.p99`: the same on the secured server (the
  baseline is signed and checked too).
- `agent_sealing.task_submit.p50`, `.p99` (and `.secured.`): ms per `TaskQueue.submit` of the
  same payloads to a queue without a worker: ours has one more round trip, the seal.

Usage: `python benchmarks/agent_sealing.py [--quick]`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

import msgspec
from _harness import emit, parser, percentile, progress, run_benchmark, run_id, workdir

from newfuse.agents import Agent, AgentClient, Context, TaskQueue
from newfuse.agents.secure import provision
from newfuse.nats import NatsServer, Subjects, connect
from newfuse.nats.connection import Credentials
from newfuse.schemas import DataSubject, Personal
from newfuse.security import KeyService, KVKeyStore
from newfuse.security.identities import IdentityStore, server_config


@dataclass(frozen=True)
class Sizes:
    round_trips: int  # sequential requests per round
    rounds: int  # alternating rounds per side (after one warm-up of each)


FULL = Sizes(round_trips=1_000, rounds=3)
QUICK = Sizes(round_trips=50, rounds=1)


class Sealed(msgspec.Struct, frozen=True, kw_only=True):
    customer: Annotated[str, DataSubject()]
    email: Annotated[str, Personal()]
    plan: str


class Plain(msgspec.Struct, frozen=True, kw_only=True):
    customer: str
    email: str
    plan: str


def receiver(name: str) -> Agent:
    agent = Agent(name)

    @agent.handler("sealed")
    async def sealed(ctx: Context, body: Sealed) -> dict[str, str]:
        return {"plan": body.plan}

    @agent.handler("plain")
    async def plain(ctx: Context, body: Plain) -> dict[str, str]:
        return {"plan": body.plan}

    return agent


Send = Callable[[bool, Sealed | Plain], Awaitable[object]]


async def timed(send: Send, sealed: bool, n: int) -> list[float]:
    """Milliseconds of `n` sequential sends (64 customers, each seen before: warm keys)."""
    kind = Sealed if sealed else Plain
    times: list[float] = []
    for i in range(n):
        body = kind(customer=f"c-{i % 64}", email=f"user{i}@example.com", plan="pro")
        start = time.perf_counter()
        await send(sealed, body)
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)


async def alternate(send: Send, sizes: Sizes, name: str) -> dict[bool, list[float]]:
    """A warm-up of each side, then alternating rounds; the best round of each side."""
    for sealed in (True, False):  # warm-up: keys made, consumers and caches warm
        await timed(send, sealed, 64)
    best: dict[bool, list[float]] = {}
    for round_ in range(sizes.rounds):
        for sealed in (True, False):
            times = await timed(send, sealed, sizes.round_trips)
            if sealed not in best or percentile(times, 0.5) < percentile(best[sealed], 0.5):
                best[sealed] = times
        progress(
            f"{name} round {round_ + 1}: p50 sealed {percentile(best[True], 0.5):.2f} "
            f"ms, plain {percentile(best[False], 0.5):.2f} ms"
        )
    return best


def emit_percentiles(name: str, best: dict[bool, list[float]], unit: str, n: int) -> None:
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        emit(
            f"{name}.{label}",
            percentile(best[True], fraction),
            percentile(best[False], fraction),
            unit,
            n=n,
            lower_is_better=True,
        )


async def measure(
    url: str, sizes: Sizes, prefix: str, credentials: dict[str, Credentials | None], name: str
) -> None:
    """Alternating rounds of sealed and plain requests on one server; emits `name` lines."""
    connections = {
        role: await connect(url, credentials=credentials[role])
        for role in ("keys", "receiver", "sender")
    }
    try:
        agent = receiver("intake")
        keys_nc = connections["keys"]
        async with (
            KeyService(
                keys_nc, await KVKeyStore.open(keys_nc, prefix), prefix=prefix, owns_keys=True
            ),
            agent.run(connections["receiver"], key="1", prefix=prefix, fast_path=False),
            AgentClient(connections["sender"], prefix=prefix, sender="bench/1") as client,
            TaskQueue(connections["sender"], prefix=prefix, sender="bench/1") as queue,
        ):

            async def request(sealed: bool, body: Sealed | Plain) -> object:
                return await client.request(
                    agent.type, "sealed" if sealed else "plain", body, timeout=30
                )

            async def submit(sealed: bool, body: Sealed | Plain) -> object:
                return await queue.submit("bench", body)  # no worker: only the submit counts

            requests = await alternate(request, sizes, name)
            submits = await alternate(submit, sizes, f"{name}.task_submit")
    finally:
        for nc in connections.values():
            await nc.close()
    emit_percentiles(
        f"{name}.round_trip",
        requests,
        "ms per request through the log (ours: one Personal field sealed and opened by "
        "the key service; baseline: the same struct unmarked)",
        sizes.round_trips,
    )
    emit_percentiles(
        f"{name}.task_submit",
        submits,
        "ms per TaskQueue.submit (ours: one Personal field sealed by the key service; "
        "baseline: the same struct unmarked)",
        sizes.round_trips,
    )


async def main(sizes: Sizes) -> None:
    async with workdir("agent-sealing") as files:
        async with NatsServer(data_dir=files / "nats") as server:
            progress(f"nats-server at {server.url}")
            anonymous: dict[str, Credentials | None] = dict.fromkeys(("keys", "receiver", "sender"))
            await measure(server.url, sizes, f"as{run_id()}", anonymous, "agent_sealing")
        identities = IdentityStore(files / "auth")
        identities.add("admin", "admin")
        identities.add("keys", "service")
        identities.add("intake-1", "agent", agent="intake/1")
        identities.add("bench-1", "agent", agent="bench/1", send_to=["intake", "task-bench"])
        config = files / "auth.conf"
        config.write_text(server_config(identities.list(), Subjects("fuse")))
        async with NatsServer(
            data_dir=files / "secured", extra_args=["--config", str(config)]
        ) as server:
            progress(f"secured nats-server at {server.url}")
            admin = await connect(server.url, credentials=identities.credentials("admin"))
            try:
                await provision(admin, identities.list(), "fuse")
            finally:
                await admin.close()
            named = {"keys": "keys", "receiver": "intake-1", "sender": "bench-1"}
            secured: dict[str, Credentials | None] = {
                role: identities.credentials(name) for role, name in named.items()
            }
            await measure(server.url, sizes, "fuse", secured, "agent_sealing.secured")
    progress("done")


def cli(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    run_benchmark(main(QUICK if args.quick else FULL))


if __name__ == "__main__":
    cli()
