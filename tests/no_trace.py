"""Run tests against servers they did not start and list what they left there (nothing of ours).

Usage: python tests/no_trace.py [pytest args...]  (default: a fast subset covering every fixture
kind). It starts a nats-server and a valkey of its own as the "existing servers", seeds them with a
stream, a KV bucket and keys that are not the suite's, runs pytest with FUSE_NATS_URL /
FUSE_REDIS_URL pointing at them, then exits 1 when anything new is left or anything seeded is gone.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nats
import redis.asyncio as redis

from newfuse.nats.embedded import NatsServer, ValkeyServer, find_nats_server, find_valkey_server

# One test of each fixture kind that writes to the shared servers: JetStream store (conformance),
# provisioning, Redis and SQLite projections, CLI subprocesses (`fuse projections run` on the
# shared Redis among them), hostile publishes, the README's snippets against a `fuse dev`, and
# agents (their registration events and the liveness stream under the test's prefix).
SUBSET = [
    "tests/conformance/test_jetstream_conformance.py",
    "tests/integration/test_jetstream_provision.py",
    "tests/integration/test_projection_runner.py",
    "tests/integration/test_projection_rebuild.py",
    "tests/integration/test_cli_events.py",
    "tests/integration/test_cli_hostile.py",
    "tests/integration/test_cli_health.py",
    "tests/integration/test_trace_context.py",
    "tests/integration/test_readme_snippets.py",
    "tests/agents/test_agents_delivery.py",
    "tests/agents/test_registry.py",
]
FOREIGN_STREAM = "FOREIGN_EVENTS"
FOREIGN_BUCKET = "foreign"
FOREIGN_KEYS = {"foreign:key": "1", "t0000000000:not-ours": "1"}


async def _seed(nats_url: str, redis_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=FOREIGN_STREAM, subjects=["foreign.>"])
        await js.publish("foreign.a", b"x")
        kv = await js.create_key_value(bucket=FOREIGN_BUCKET)
        await kv.put("k", b"v")
    finally:
        await nc.close()
    client = redis.Redis.from_url(redis_url)
    async with client:
        await client.mset(FOREIGN_KEYS)


async def _leftovers(nats_url: str, redis_url: str) -> tuple[list[str], list[str]]:
    """Streams (with their consumers) and keys on the servers, seeded ones included."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        streams = []
        for info in await js.streams_info():
            name = info.config.name
            consumers = [c.name for c in await js.consumers_info(name)]
            streams.append(f"{name} consumers={consumers}" if consumers else str(name))
    finally:
        await nc.close()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    async with client:
        keys = sorted([key async for key in client.scan_iter(count=1000)])
    return sorted(streams), keys


async def main(pytest_args: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="no-trace-") as tmp:
        async with (
            NatsServer(binary=find_nats_server(use_path=False), data_dir=Path(tmp) / "n") as ns,
            ValkeyServer(binary=find_valkey_server(use_path=False), data_dir=Path(tmp) / "v") as vs,
        ):
            await _seed(ns.url, vs.url)
            env = {**os.environ, "FUSE_NATS_URL": ns.url, "FUSE_REDIS_URL": vs.url}
            argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            tests = subprocess.run([*argv, *(pytest_args or SUBSET)], env=env, check=False)
            streams, keys = await _leftovers(ns.url, vs.url)
    expected_streams = [FOREIGN_STREAM, f"KV_{FOREIGN_BUCKET}"]
    extra_streams = [s for s in streams if s.split(" ")[0] not in expected_streams]
    extra_keys = [k for k in keys if k not in FOREIGN_KEYS]
    missing = [s for s in expected_streams if s not in streams] + [
        k for k in FOREIGN_KEYS if k not in keys
    ]
    print(f"left by the tests: {len(extra_streams)} streams, {len(extra_keys)} keys")
    for line in extra_streams[:20] + extra_keys[:20]:
        print(f"  {line}")
    if missing:
        print(f"removed although not the suite's: {missing}")
    if tests.returncode != 0:
        print(f"pytest exited {tests.returncode}")
    return 1 if extra_streams or extra_keys or missing or tests.returncode else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
