"""`fuse demo` (what `make demo` runs): on the session's servers it leaves its history there;
with none configured it starts servers of its own and stops them. Its sagas commit, roll back
(undoing the done steps newest first) and wait for a review, which the tour approves itself or,
with `--interactive`, a person approves with `fuse review approve`; its security section runs on
a nats-server of its own with the authorization config."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import IO

from nats.aio.client import Client

from newfuse.agents import Tasks
from newfuse.agents.history import History
from newfuse.core import read_saga
from newfuse.core.review import read_review
from newfuse.eventstore import open_event_store
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
    check_sagas(out)
    check_security(out, prefix)


def check_sagas(out: str) -> None:
    """Sections 9 to 11: committed, rolled back with its undos newest first, reviewed."""
    assert re.search(r"saga \w{8}: committed; published 'done: summarise the incident", out), out
    undone = re.findall(r"^    compensating '(\w+)'", out, flags=re.M)
    assert undone == ["file", "research"], out  # reverse order of the steps that were done
    assert re.search(
        r"saga \w{8}: rolled_back \(publish: RuntimeError: the printer is out of paper\)", out
    ), out
    assert re.search(r"^    file +compensated +action attempt 1 claimed by tour", out, flags=re.M)
    assert re.search(r"^    publish +failed +action attempt 1 claimed", out, flags=re.M), out
    assert re.search(r"review rv\w{16} of saga \w{8} step 'publish': pending", out), out
    assert "who may decide: group editors; deadline 20" in out
    assert 'proposed input: {"text":"done: who owns the backlog"}' in out
    assert re.search(r"review rv\w{16}: approved by tour \('reads well'\)", out), out
    assert re.search(r"saga \w{8}: committed; published 'done: who owns the backlog'", out), out


def check_security(out: str, prefix: str) -> None:
    """Sections 12 and 13: what the server allows and refuses, verify, a forgotten field."""
    assert "allowed: researcher/r1, connected as researcher-r1, answered 'done: who holds" in out
    assert (
        "refused, researcher-r1 writing to the writer's inbox as writer/w1: permission denied: "
        f"identity 'researcher-r1' may not publish to '{prefix}.a2a.writer'" in out
    ), out
    assert re.search(
        r"refused, reading the whole log: permission denied: identity 'researcher-r1' may not "
        r"publish to '\$JS\.API\.CONSUMER\.CREATE\.\S+EVENTS'",
        out,
    ), out
    assert re.search(r"verify: verified up to position \d+, checkpoint signed by tour-auditor", out)
    assert "email 'ada@example.com' (sealed with c-7's key" in out
    assert "email '[redacted]', plan 'pro' (the rest of the event stays readable)" in out
    assert "stopped the secured nats-server" in out


async def test_the_interactive_tour_waits_for_a_person_to_approve_the_review(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """`fuse demo --interactive` prints the approve command and waits; a real `fuse review
    approve` in another process decides, and the tour goes on to commit the saga."""
    prefix = new_prefix("d")
    env = {
        **os.environ,
        "FUSE_NATS_URL": nats_url,
        "FUSE_REDIS_URL": redis_url,
        "FUSE_PREFIX": prefix,
        "FUSE_STATE_DIR": str(tmp_path),
    }
    tour = subprocess.Popen(
        [sys.executable, "-m", "newfuse", "demo", "--interactive"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert tour.stdout is not None
        before, command = await asyncio.to_thread(read_until_approve, tour.stdout)
        assert "the tour approves it" not in before, before
        review = command[3]
        args = [arg if arg != "YOUR_NAME" else "ada" for arg in command[1:]]
        approved = await asyncio.to_thread(run_fuse, *args, env=env)
        assert f"review {review}: approved" in approved.stdout, approved.stdout
        rest = await asyncio.to_thread(tour.stdout.read)
        assert await asyncio.to_thread(tour.wait, 60) == 0, before + rest
    finally:
        if tour.poll() is None:
            tour.kill()
            tour.wait()
        if tour.stdout is not None:
            tour.stdout.close()
    assert f"review {review}: approved by ada ('')" in rest, rest
    assert re.search(r"saga \w{8}: committed; published 'done: who owns the backlog'", rest)
    async with await open_event_store(nats_url, prefix=prefix) as store:
        decided = await read_review(store, review)
        assert decided.status == "approved" and decided.decided_by == "ada"
        saga = await read_saga(store, decided.saga_id)
        assert saga.status == "committed" and saga.steps["publish"].reviewed is not None


def read_until_approve(stdout: IO[str]) -> tuple[str, list[str]]:
    """The tour's output up to the line with the approve command, and that command's words."""
    seen = []
    for line in stdout:
        seen.append(line)
        words = line.split()
        if words[:3] == ["fuse", "review", "approve"]:
            assert "--nats" in words and "--prefix" in words, line
            return "".join(seen), words
    raise AssertionError("the tour ended without printing the approve command:\n" + "".join(seen))


async def test_the_tour_without_servers_starts_its_own_and_stops_them(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSE_")}
    env["FUSE_STATE_DIR"] = str(tmp_path)  # no fuse dev recorded here
    result = await asyncio.to_thread(run_fuse, "demo", env=env)
    out = result.stdout
    assert "starting nats-server and valkey from the wheels" in out
    assert "stopped the servers it started" in out
    pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", out)]
    assert len(pids) == 3  # nats-server and valkey, then the security section's nats-server
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
