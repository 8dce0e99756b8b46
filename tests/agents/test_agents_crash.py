"""An agent process SIGKILLed mid-handler and restarted: every message handled, no effect twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from messages import payload, settled, stored
from nats.aio.client import Client

from newfuse.agents import AgentClient
from newfuse.nats import MessageStreamSpec, Subjects
from support import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]

WORKER = Path(__file__).with_name("agent_worker.py")
ORDERS = 60


async def start_worker(nats_url: str, prefix: str, log: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, str(WORKER), nats_url, prefix, str(log)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=30)
    assert line.strip() == "ready", line
    return process


def runs(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    return [(int(n), int(a)) for n, a in (line.split() for line in log.read_text().splitlines())]


async def test_sigkill_mid_handler_then_restart_handles_every_order_and_repeats_no_effect(
    nc: Client, nats_url: str, prefix: str, stream: MessageStreamSpec, tmp_path: Path
) -> None:
    log = tmp_path / "handled.log"
    subjects = Subjects(prefix)
    worker = await start_worker(nats_url, prefix, log)
    try:
        async with AgentClient(nc, prefix=prefix, stream=stream) as client:
            requests = [
                asyncio.create_task(client.request("relay", "order", {"n": n}, timeout=90))
                for n in range(ORDERS)
            ]

            async def some_handled() -> bool:
                return len(runs(log)) >= ORDERS // 3

            await wait_for(some_handled, timeout=30)
            worker.send_signal(signal.SIGKILL)  # handlers sleep after emitting: mid-handler
            worker.wait(timeout=10)
            if worker.stdout is not None:
                worker.stdout.close()
            killed_after = len(runs(log))
            worker = await start_worker(nats_url, prefix, log)
            replies = await asyncio.wait_for(asyncio.gather(*requests), timeout=90)
            await settled(nc, prefix, "relay")
    finally:
        worker.kill()
        worker.wait(timeout=10)
        if worker.stdout is not None:
            worker.stdout.close()
    assert sorted(r.payload["n"] for r in replies) == list(range(ORDERS))
    started = runs(log)
    assert {n for n, _ in started} == set(range(ORDERS))  # every order handled
    assert ORDERS // 3 <= killed_after < ORDERS
    assert any(attempt > 1 for _, attempt in started), "no order was interrupted by the kill"
    shipped = [
        payload(e).payload["n"] for e in await stored(nc, prefix, subjects.agent_type("sink"))
    ]
    assert sorted(shipped) == list(range(ORDERS))  # no outgoing message twice
    stored_replies = await stored(nc, prefix, subjects.reply(">"))
    assert sorted(payload(e).payload["n"] for e in stored_replies) == list(range(ORDERS))
