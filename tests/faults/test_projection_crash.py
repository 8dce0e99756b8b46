"""Crash safety with real processes: a projection runner SIGKILLed at random points, and a Redis
server killed under a running one. Afterwards the model equals the fold of the log that the test
computes on its own: nothing applied twice, nothing skipped."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from newfuse.eventstore import EventStore, open_event_store
from newfuse.nats.embedded import ValkeyServer
from newfuse.projections import ProjectionRunner, RedisReadModel
from newfuse.schemas import NewEvent
from support import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]

WORKER = Path(__file__).with_name("projection_worker.py")
STREAMS = ("note.a", "note.b", "note.c")


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[tuple[str, EventStore]]:
    url = f"sqlite://{tmp_path / 'events.db'}"
    store = await open_event_store(url)
    yield url, store
    await store.close()


async def append_round(store: EventStore, rng: random.Random, count: int, log: list[tuple]) -> None:
    """Append `count` notes in random batches to random streams; log (position, stream, n)."""
    while count > 0:
        size = min(count, rng.randint(1, 400))
        stream = rng.choice(STREAMS)
        numbers = [rng.randint(-1000, 1000) for _ in range(size)]
        result = await store.append(stream, [NewEvent(type="note", data={"n": n}) for n in numbers])
        positions = range(result.first_position, result.last_position + 1)
        log += zip(positions, [stream] * size, numbers, strict=True)
        count -= size


async def model_fold(model: RedisReadModel) -> tuple[list[int], dict[str, int]]:
    generation = await model.active_generation("counts")
    assert generation is not None
    prefix = model.model_prefix("counts", generation)
    applied = [int(p) for p in await model.client.lrange(prefix + "applied", 0, -1)]  # type: ignore[misc]
    sums = await model.client.hgetall(prefix + "sum")  # type: ignore[misc]
    return applied, {stream: int(total) for stream, total in sums.items()}


def expected_fold(log: list[tuple]) -> tuple[list[int], dict[str, int]]:
    sums: dict[str, int] = {}
    for _, stream, n in log:
        sums[stream] = sums.get(stream, 0) + n
    return [position for position, _, _ in log], sums


async def test_a_runner_killed_with_sigkill_at_random_points_resumes_exactly(
    sqlite_store: tuple[str, EventStore], redis_url: str, prefix: str
) -> None:
    url, store = sqlite_store
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    log: list[tuple] = []
    await append_round(store, rng, 4000, log)
    model = await RedisReadModel.connect(redis_url, root=f"{prefix}:proj")
    argv = [sys.executable, str(WORKER), url, redis_url, f"{prefix}:proj", "10"]
    cut_short = 0
    try:
        for _round in range(6):
            await append_round(store, rng, 1000, log)  # work for this round, at least
            worker = subprocess.Popen(argv)
            try:
                head = log[-1][0]
                start = await model.checkpoint("counts")
                # In the first half of what is left, so that the worker is still busy when the
                # signal lands (it applies the rest of a round in a few tens of ms).
                target = rng.randint(start + 1, start + max(1, (head - start) // 2))

                async def reached(target: int = target) -> bool:
                    return await model.checkpoint("counts") >= target

                await wait_for(reached, timeout=60, interval=0.002)
                if rng.random() < 0.5:
                    await append_round(store, rng, 800, log)  # the log grows while it runs
                os.kill(worker.pid, signal.SIGKILL)
                assert worker.wait(timeout=10) == -signal.SIGKILL
            finally:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
            cut_short += await model.checkpoint("counts") < log[-1][0]
        # a last run to the end, then SIGTERM: it stops at a checkpoint and exits cleanly. New
        # events first, so that "caught up" means this worker is up and has applied them (a
        # SIGTERM during its start-up would find no handler yet).
        await append_round(store, rng, 100, log)
        worker = subprocess.Popen(argv)
        try:
            head = log[-1][0]

            async def caught_up() -> bool:
                return await model.checkpoint("counts") == head

            await wait_for(caught_up, timeout=60)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=20) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        print(f"kills that left work undone: {cut_short} of 6")
        assert len(log) >= 10_000
        assert cut_short >= 1, "no kill landed before the end; the test proved nothing"
        assert await model_fold(model) == expected_fold(log)
    finally:
        await model.close()


async def test_a_runner_waits_out_a_killed_redis_and_resumes_without_losing_its_place(
    sqlite_store: tuple[str, EventStore], valkey_server: ValkeyServer
) -> None:
    _, store = sqlite_store
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    log: list[tuple] = []
    await append_round(store, rng, 10_000, log)
    model = await RedisReadModel.connect(valkey_server.url, timeout=2.0)
    from projection_worker import counting  # the same projection the subprocess test runs

    runner = ProjectionRunner(counting(), store, model, batch_size=10, linger=0)
    outages = 0
    try:
        await runner.start()
        for _round in range(3):
            start = runner.checkpoint
            target = rng.randint(start + 1, start + 2000)
            await wait_for(lambda target=target: _true(runner.checkpoint >= target), timeout=60)
            await valkey_server.kill()
            await append_round(store, rng, 300, log)
            await wait_for(lambda: _true(runner.state == "waiting"), timeout=30)
            outages += 1
            await valkey_server.restart()
        head = log[-1][0]
        await runner.wait_until(head, timeout=60)
        assert runner.state == "running" and runner.failure is None
        assert runner.last_error is not None and "unavailable" in runner.last_error
    finally:
        await runner.stop()
    try:
        assert outages == 3
        assert await model_fold(model) == expected_fold(log)
    finally:
        await model.close()


async def _true(condition: bool) -> bool:
    return condition
