"""`fuse publish`, `replay` and `tail` as a user runs them: real processes, real servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from newfuse.eventstore import open_event_store
from newfuse.schemas import NewEvent, StateUpdate
from support import new_prefix

Run = subprocess.CompletedProcess[str]


@pytest.fixture(params=["jetstream", "sqlite"])
def fuse_args(
    request: pytest.FixtureRequest, nats_url: str, prefix: str, tmp_path: Path
) -> list[str]:
    if request.param == "jetstream":
        return ["--nats", nats_url, "--prefix", prefix]
    return ["--store", f"sqlite://{tmp_path / 'cli.db'}"]


def fuse(args: list[str], *extra: str, check: bool = True) -> Run:
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "newfuse", *args, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_publish_prints_where_the_event_went_as_json(fuse_args: list[str]) -> None:
    first = json.loads(
        fuse(fuse_args, "publish", "agent.r1", "note", "--data", '{"n": 1}', "--json").stdout
    )
    assert list(first) == ["id", "stream", "version", "position"]
    assert (first["stream"], first["version"]) == ("agent.r1", 1)
    second = json.loads(
        fuse(
            fuse_args,
            "publish",
            "agent.r1",
            "note",
            "--data",
            '{"n": 2}',
            "--expected-version",
            "1",
            "--json",
        ).stdout
    )
    assert second["version"] == 2 and second["position"] > first["position"]


def test_publish_with_a_stale_expected_version_exits_non_zero_naming_the_conflict(
    fuse_args: list[str],
) -> None:
    fuse(fuse_args, "publish", "agent.r1", "note", "--data", "{}")
    result = fuse(
        fuse_args,
        "publish",
        "agent.r1",
        "note",
        "--data",
        "{}",
        "--expected-version",
        "0",
        check=False,
    )
    assert result.returncode == 1
    assert "append to 'agent.r1': expected version 0, stream is at version 1" in result.stderr
    replay = fuse(fuse_args, "replay", "--json").stdout.splitlines()
    assert len(replay) == 1


def test_publish_rejects_bad_json_and_bad_stream_names_clearly(fuse_args: list[str]) -> None:
    bad_json = fuse(fuse_args, "publish", "agent.r1", "note", "--data", "{nope", check=False)
    assert (
        bad_json.returncode == 1
        and "--data" in bad_json.stderr
        and "not valid JSON" in bad_json.stderr
    )
    bad_name = fuse(fuse_args, "publish", "agent.r 1", "note", "--data", "{}", check=False)
    assert bad_name.returncode == 1 and "a space" in bad_name.stderr
    bad_payload = fuse(
        fuse_args,
        "publish",
        "agent.r1",
        "agent.state_update",
        "--data",
        '{"agentId": "r1"}',
        check=False,
    )
    assert bad_payload.returncode == 1 and "missing required field `version`" in bad_payload.stderr


def test_replay_filters_and_prints_a_table_or_json_lines(fuse_args: list[str]) -> None:
    fuse(fuse_args, "publish", "agent.r1", "note", "--data", '{"n": 1}', "--correlation", "c1")
    fuse(fuse_args, "publish", "saga.s1", "step", "--data", '{"n": 2}', "--correlation", "c1")
    fuse(
        fuse_args,
        "publish",
        "agent.r2",
        "agent.state_update",
        "--data",
        '{"agentId": "r2", "state": {"x": 1}, "version": 1}',
    )
    lines = [json.loads(line) for line in fuse(fuse_args, "replay", "--json").stdout.splitlines()]
    assert [line["stream"] for line in lines] == ["agent.r1", "saga.s1", "agent.r2"]
    assert all(
        {"position", "id", "type", "version", "data", "timestamp"} <= set(line) for line in lines
    )
    assert lines[2]["data"] == {
        "agentId": "r2",
        "state": {"x": 1},
        "version": 1,
        "timestamp": lines[2]["data"]["timestamp"],
    }

    def streams(*flags: str) -> list[str]:
        out = fuse(fuse_args, "replay", "--json", *flags).stdout.splitlines()
        return [json.loads(line)["stream"] for line in out]

    assert streams("--category", "agent") == ["agent.r1", "agent.r2"]
    assert streams("--type", "step") == ["saga.s1"]
    assert streams("--correlation", "c1") == ["agent.r1", "saga.s1"]
    assert streams("--stream", "agent.r2") == ["agent.r2"]
    assert streams("--limit", "2") == ["agent.r1", "saga.s1"]
    assert streams("--from-position", str(lines[1]["position"])) == ["saga.s1", "agent.r2"]
    assert streams("--since", "1h") == ["agent.r1", "saga.s1", "agent.r2"]
    assert streams("--until", "1h") == []
    table = fuse(fuse_args, "replay").stdout
    assert table.splitlines()[0].split()[:3] == ["POSITION", "TIMESTAMP", "STREAM"]
    assert "agent.state_update" in table and "saga.s1" in table


def test_replay_with_a_bad_time_names_the_flag(fuse_args: list[str]) -> None:
    result = fuse(fuse_args, "replay", "--since", "yesterday-ish", check=False)
    assert result.returncode == 1 and "--since='yesterday-ish'" in result.stderr


def test_tail_prints_new_events_live_and_stops_on_sigint(fuse_args: list[str]) -> None:
    fuse(fuse_args, "publish", "agent.r1", "note", "--data", '{"n": 0}')
    tail = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "newfuse",
            *fuse_args,
            "tail",
            "--json",
            "--category",
            "agent",
            "--from-position",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tail.stdout is not None
        assert json.loads(tail.stdout.readline())["data"] == {"n": 0}
        fuse(fuse_args, "publish", "saga.s1", "note", "--data", '{"n": 1}')
        fuse(fuse_args, "publish", "agent.r2", "note", "--data", '{"n": 2}')
        assert json.loads(tail.stdout.readline())["data"] == {"n": 2}
    finally:
        tail.send_signal(signal.SIGINT)
        _, stderr = tail.communicate(timeout=30)
    assert tail.returncode == 0, stderr


def test_tail_since_a_time_replays_from_then_and_follows(fuse_args: list[str]) -> None:
    fuse(fuse_args, "publish", "agent.r1", "note", "--data", '{"n": 0}')
    tail = subprocess.Popen(
        [sys.executable, "-m", "newfuse", *fuse_args, "tail", "--json", "--since", "1h"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tail.stdout is not None
        assert json.loads(tail.stdout.readline())["data"] == {"n": 0}
        fuse(fuse_args, "publish", "agent.r1", "note", "--data", '{"n": 1}')
        assert json.loads(tail.stdout.readline())["data"] == {"n": 1}
    finally:
        tail.send_signal(signal.SIGINT)
        _, stderr = tail.communicate(timeout=30)
    assert tail.returncode == 0, stderr


def test_replay_follow_prints_the_stored_events_then_new_ones_row_by_row(
    fuse_args: list[str],
) -> None:
    fuse(fuse_args, "publish", "agent.r1", "note", "--data", '{"n": 0}')
    follow = subprocess.Popen(
        [sys.executable, "-m", "newfuse", *fuse_args, "replay", "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        assert follow.stdout is not None
        assert follow.stdout.readline().split()[:2] == ["POSITION", "TIMESTAMP"]
        assert '{"n":0}' in follow.stdout.readline()  # a row of the table, while it runs
        fuse(fuse_args, "publish", "agent.r2", "note", "--data", '{"n": 1}')
        row = follow.stdout.readline().split()
        assert row[2:5] == ["agent.r2", "1", "note"] and row[-1] == '{"n":1}'
    finally:
        follow.send_signal(signal.SIGINT)
        _, stderr = follow.communicate(timeout=30)
    assert follow.returncode == 0, stderr


def test_streams_list_and_info_show_version_count_positions_and_times(
    fuse_args: list[str],
) -> None:
    fuse(fuse_args, "publish", "saga.s1", "step", "--data", "{}")
    fuse(fuse_args, "publish", "agent.r1", "note", "--data", "{}")
    fuse(fuse_args, "publish", "agent.r1", "note", "--data", "{}")
    listed = [
        json.loads(line)
        for line in fuse(fuse_args, "streams", "list", "--json").stdout.splitlines()
    ]
    assert [(s["stream"], s["version"], s["count"]) for s in listed] == [
        ("agent.r1", 2, 2),
        ("saga.s1", 1, 1),
    ]
    info = json.loads(fuse(fuse_args, "streams", "info", "agent.r1", "--json").stdout)
    placement = info.pop("jetstream", None)  # the JetStream stream's copies (JetStream only)
    assert placement is None if "--store" in fuse_args else placement["replicas"] == 1
    events = [
        json.loads(line)
        for line in fuse(fuse_args, "replay", "--json", "--stream", "agent.r1").stdout.splitlines()
    ]
    assert info == {
        "stream": "agent.r1",
        "version": 2,
        "count": 2,
        "first_position": events[0]["position"],
        "last_position": events[1]["position"],
        "first_timestamp": events[0]["timestamp"],
        "last_timestamp": events[1]["timestamp"],
    }
    assert info["first_timestamp"].endswith("Z")
    table = fuse(fuse_args, "streams", "list", "--category", "saga").stdout.splitlines()
    assert table[0].split()[:3] == ["STREAM", "VERSION", "COUNT"] and "saga.s1" in table[2]
    missing = fuse(fuse_args, "streams", "info", "agent.nobody", check=False)
    assert missing.returncode == 1 and "no stream 'agent.nobody'" in missing.stderr


def test_events_show_prints_one_event_by_id_or_by_position(fuse_args: list[str]) -> None:
    fuse(fuse_args, "publish", "agent.r1", "note", "--data", '{"n": 1}')
    written = json.loads(
        fuse(fuse_args, "publish", "agent.r2", "note", "--data", '{"n": 2}', "--json").stdout
    )
    by_id = json.loads(fuse(fuse_args, "events", "show", written["id"], "--json").stdout)
    by_position = json.loads(
        fuse(fuse_args, "events", "show", "--position", str(written["position"]), "--json").stdout
    )
    assert by_id == by_position
    assert (by_id["stream"], by_id["data"], by_id["position"]) == (
        "agent.r2",
        {"n": 2},
        written["position"],
    )
    assert '"n": 2' in fuse(fuse_args, "events", "show", written["id"]).stdout  # indented
    unknown = fuse(fuse_args, "events", "show", "--position", "99", check=False)
    assert unknown.returncode == 1 and "no event with position 99" in unknown.stderr


def test_a_command_that_only_reads_creates_no_store(nats_url: str, tmp_path: Path) -> None:
    known = new_prefix("k")  # registered: the session removes its stream
    fuse(["--nats", nats_url, "--prefix", known], "publish", "agent.r1", "note", "--data", "{}")
    typo = new_prefix("typo")
    for command in (
        ["replay"],
        ["tail"],
        ["streams", "list"],
        ["events", "show", "--position", "1"],
    ):
        result = fuse(["--nats", nats_url, "--prefix", typo], *command, check=False)
        assert result.returncode == 1, command
        assert f"no event store at JetStream stream {typo.upper()}_EVENTS (prefix '{typo}')" in (
            result.stderr
        )
        assert f"prefix '{known}'" in result.stderr
    # Nothing was created: the typo's prefix is still not there.
    again = fuse(["--nats", nats_url, "--prefix", typo], "replay", check=False)
    assert f"prefix '{typo}'" not in again.stderr.split("(there:")[1]

    path = tmp_path / "missing.db"
    missing = fuse(["--store", f"sqlite://{path}"], "replay", check=False)
    assert missing.returncode == 1 and f"no event store at SQLite file '{path}'" in missing.stderr
    assert not path.exists()


async def test_a_command_that_only_reads_makes_no_key_bucket(nats_url: str) -> None:
    """A log with no keys' bucket (nothing was ever sealed) is read without making one."""
    prefix = new_prefix("nokeys")  # registered: the session removes its streams
    store = await open_event_store(nats_url, prefix=prefix)
    async with store:
        update = StateUpdate(agent_id="r1", state={}, version=1)
        await store.append("agent.r1", NewEvent(data=update))
    for command in (["replay"], ["streams", "list"], ["events", "show", "--position", "1"]):
        fuse(["--nats", nats_url, "--prefix", prefix], *command)
    nc = await nats.connect(nats_url)
    try:
        names = [info.config.name for info in await nc.jetstream().streams_info()]
    finally:
        await nc.close()
    assert f"{prefix.upper()}_EVENTS" in names and f"KV_{prefix}_keys" not in names
    fuse(["--nats", nats_url, "--prefix", prefix], "publish", "agent.r1", "note", "--data", "{}")
    nc = await nats.connect(nats_url)
    try:
        names = [info.config.name for info in await nc.jetstream().streams_info()]
    finally:
        await nc.close()
    assert f"KV_{prefix}_keys" in names  # a command that writes makes it
