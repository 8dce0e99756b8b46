"""`fuse agents run MODULE:AGENT` as a real process: it serves, and SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from nats.aio.client import Client

from newfuse.agents import AgentClient
from newfuse.nats import MessageStreamSpec
from support import reap

HERE = Path(__file__).parent


def fuse(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "newfuse", *args],
        cwd=HERE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


async def test_an_agent_process_answers_through_the_log_and_stops_on_sigterm(
    nc: Client, nats_url: str, prefix: str, stream: MessageStreamSpec
) -> None:
    process = fuse(
        "--nats", nats_url, "--prefix", prefix, "agents", "run", "echo_agent:echo", "--key", "7"
    )
    try:
        assert process.stderr is not None
        banner = await asyncio.wait_for(asyncio.to_thread(process.stderr.readline), timeout=30)
        assert banner.strip() == "fuse agents: echo/7 handles ping; SIGTERM to stop"
        async with AgentClient(nc, prefix=prefix, stream=stream) as client:
            reply = await client.request("echo", "ping", {"x": 1}, timeout=20)
            fast = await client.call("echo", "ping", {"x": 2}, timeout=20)
        assert reply.payload == {"echo": {"x": 1}, "by": "echo/7"}
        assert fast.payload == {"echo": {"x": 2}, "by": "echo/7"}
        process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(asyncio.to_thread(process.stderr.read), timeout=30)
        assert process.wait(timeout=10) == 0
        assert "fuse agents: echo/7 stopped after 2 messages (0 dead letters)" in rest
    finally:
        reap(process)


def test_a_module_attribute_that_is_not_an_agent_is_a_clear_error(nats_url: str) -> None:
    for spec, reason in (
        ("echo_agent:not_an_agent", "it is a str, not a newfuse.agents.Agent"),
        ("no_such_module:echo", "cannot import 'no_such_module'"),
        ("echo_agent", "expected MODULE:NAME"),
    ):
        process = fuse("--nats", nats_url, "agents", "run", spec)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 1, err
        assert reason in err and "Traceback" not in err, err
