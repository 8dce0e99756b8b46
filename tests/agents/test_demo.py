"""`fuse demo` (what `make demo` runs): on the session's servers it leaves its history there;
with none configured it starts servers of its own and stops them."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from nats.aio.client import Client

from newfuse.agents import Tasks
from newfuse.agents.history import History
from support import new_prefix, run_fuse


async def test_the_tour_on_existing_servers_leaves_a_history_that_replays(
    nc: Client, nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    prefix = new_prefix("d")  # removed with the session's prefixes on foreign servers
    env = {
        **os.environ,
        "FUSE_NATS_URL": nats_url,
        "FUSE_REDIS_URL": redis_url,
        "FUSE_PREFIX": prefix,
        "FUSE_STATE_DIR": str(tmp_path),
    }
    result = await asyncio.to_thread(run_fuse, "demo", env=env)
    out = result.stdout
    assert f"using the NATS server at {nats_url}" in out
    steps = (
        "1. requests",
        "2. a task asks",
        "3. the registry",
        "4. the read models",
        "5. the",
        "6. a job through a queue",
        "7. what `fuse agents list`",
        "8. the drafter replayed",
    )
    for step in steps:
        assert step in out, out
    assert re.search(r"^  researcher +v1\.0\.0 +2 instance\(s\) +healthy", out, flags=re.M), out
    states = re.findall(r"^  (researcher-r[12]|writer-w1) +running ", out, flags=re.M)
    assert sorted(states) == ["researcher-r1", "researcher-r2", "writer-w1"], out
    # agent work: three queued jobs drafted with the local model, reviewed by an aggregation
    assert len(re.findall(r"^  planner -> queue jobs, priority [730]:", out, flags=re.M)) == 3
    assert len(re.findall(r"^  drafter/w1 -> #drafts", out, flags=re.M)) == 3, out
    assert "reviewer/strict: rejected ['risk list']" in out and "reviewer/kind: approved" in out
    assert re.search(r"aggregate \S+ \(all\): complete, built from replies \S+, \S+", out)
    assert "queue jobs: 0 waiting, 0 in flight, 1 worker(s)" in out
    assert re.search(r"model local/draft-1 \(revision local-\w+\): 3 calls by drafter", out)
    assert "with its recorded model answers: 3 message(s) replayed, 0 diverged" in out
    assert "with model draft-2 instead: 3 message(s) replayed, 3 diverged" in out
    # each reply names the instance that answered (either of the two sharing the consumer)
    assert len(re.findall(r"researcher/r[12] says", out)) == 3, out
    conversation = re.search(r"conversation (tour-[0-9a-f]{8})", out)
    task_line = re.search(r"fuse tasks show (\S+)", out)
    assert conversation is not None and task_line is not None, out
    task = await Tasks(nc, prefix=prefix).get(task_line.group(1))
    assert task is not None and task.state == "completed"
    assert [change.state for change in task.statuses] == ["working", "input-required", "completed"]
    turns = [t async for t in History(nc, prefix=prefix).turns(context_id=conversation.group(1))]
    kinds = [t.kind for t in turns]
    assert kinds.count("message") == 5 and kinds.count("reply") == 3, kinds  # 4 asks, 1 answer
    assert kinds.count("status") == 3
    replayed = re.findall(r"^  #(\d+) ", out, flags=re.MULTILINE)
    assert [int(p) for p in replayed] == [t.position for t in turns]


async def test_the_tour_without_servers_starts_its_own_and_stops_them(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSE_")}
    env["FUSE_STATE_DIR"] = str(tmp_path)  # no fuse dev recorded here
    result = await asyncio.to_thread(run_fuse, "demo", env=env)
    out = result.stdout
    assert "starting nats-server and valkey from the wheels" in out
    assert "stopped the servers it started" in out
    pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", out)]
    assert len(pids) == 2
    for pid in pids:  # stopped by pid: neither is left
        assert not Path(f"/proc/{pid}").exists(), pid
    assert "its history stays on the server" not in out


async def test_the_hello_agent_example_runs_as_written() -> None:
    example = Path(__file__).parents[2] / "examples" / "hello_agent.py"
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(example)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello, Ada (from greeter/1)\n"
