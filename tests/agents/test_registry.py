"""The agent registry on real servers: card and registration in the log, heartbeats on the
liveness stream, stale then down after a SIGKILL, live-at-T from the log, the ADR-32 micro
service's answers checked against the ADR-32 response schemas, and `fuse agents list`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator, FormatChecker
from nats.aio.client import Client

from newfuse.agents import Agent, AgentClient, Context
from newfuse.agents.registry import (
    Instance,
    Run,
    live_at,
    parse_server_time,
    read_liveness,
    runs,
    status_of,
    stream_of,
    summarize,
)
from newfuse.errors import AgentConfigError, RequestFailedError
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import MessageStreamSpec, Subjects
from newfuse.schemas import AgentRegistered, AgentSkill, utcnow
from support import reap, run_fuse, wait_for

HERE = Path(__file__).parent

# ADR-32 (nats-architecture-and-design), the Service API: the fields of each response, written
# out as JSON Schemas (draft 7, as NATS publishes its schemas) from the ADR's definitions.
_NAME = {"type": "string", "pattern": "^[a-zA-Z0-9_-]+$", "minLength": 1}
_SEMVER = {
    "type": "string",
    "pattern": r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$",
}
_METADATA = {"type": "object", "additionalProperties": {"type": "string"}}
_INT64 = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}


def _response(kind: str, extra: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": f"io.nats.micro.v1.{kind}",
        "type": "object",
        "required": ["type", "name", "id", "version", "metadata", *required],
        "properties": {
            "type": {"type": "string", "const": f"io.nats.micro.v1.{kind}"},
            "name": _NAME,
            "id": {"type": "string", "minLength": 1},
            "version": _SEMVER,
            "metadata": _METADATA,
            **extra,
        },
    }


PING_SCHEMA = _response("ping_response", {}, [])
INFO_SCHEMA = _response(
    "info_response",
    {
        "description": {"type": "string"},
        "endpoints": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "subject", "queue_group", "metadata"],
                "properties": {
                    "name": _NAME,
                    "subject": {"type": "string", "minLength": 1},
                    "queue_group": {"type": "string"},
                    "metadata": _METADATA,
                },
            },
        },
    },
    ["description", "endpoints"],
)
STATS_SCHEMA = _response(
    "stats_response",
    {
        "started": {"type": "string", "format": "date-time"},
        "endpoints": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "name",
                    "subject",
                    "queue_group",
                    "num_requests",
                    "num_errors",
                    "last_error",
                    "processing_time",
                    "average_processing_time",
                ],
                "properties": {
                    "name": _NAME,
                    "subject": {"type": "string", "minLength": 1},
                    "queue_group": {"type": "string"},
                    "num_requests": _INT64,
                    "num_errors": _INT64,
                    "last_error": {"type": "string"},
                    "processing_time": _INT64,
                    "average_processing_time": _INT64,
                    "data": {"type": "object"},
                },
            },
        },
    },
    ["started", "endpoints"],
)
SCHEMAS = {"PING": PING_SCHEMA, "INFO": INFO_SCHEMA, "STATS": STATS_SCHEMA}


def scout(agent_type: str, *, heartbeat: float = 5.0, version: str = "1.2.0") -> Agent:
    agent = Agent(
        agent_type,
        version=version,
        description="looks around",
        skills=(AgentSkill(id="look", name="Look", tags=["eyes"]),),
        heartbeat=heartbeat,
    )

    @agent.handler("look")
    async def look(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("fail"):
            raise ValueError("told to fail")
        return {"seen": body}

    return agent


def unique(name: str) -> str:
    return f"{name}{uuid.uuid4().hex[:6]}"


async def liveness(nc: Client, prefix: str, **options: Any) -> dict[str, Instance]:
    found = await read_liveness(nc, Subjects(prefix), **options)
    return {f"{one.agent_type}/{one.key}": one for one in found}


async def afuse(*args: str) -> subprocess.CompletedProcess[str]:
    """`fuse` off the event loop, so the agents of this process keep beating meanwhile."""
    return await asyncio.to_thread(run_fuse, *args, check=False)


async def test_an_agent_registers_its_card_on_start_and_deregisters_on_close(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    store = JetStreamEventStore(nc, prefix=prefix)
    agent = scout("scout")
    async with agent.run(nc, key="1", prefix=prefix, stream=stream, store=store) as running:
        started = [event async for event in store.read(stream_of("scout", "1"))]
        assert [event.type for event in started] == ["agent.registered", "agent.started"]
        registered = started[0].data
        assert isinstance(registered, AgentRegistered) and registered.card is not None
        card = registered.card
        assert (card.name, card.version, card.description) == ("scout", "1.2.0", "looks around")
        assert card.message_types == ["look"]
        assert [skill.id for skill in card.skills] == ["look"]
        assert card.subjects is not None
        assert card.subjects.inbox == f"{prefix}.a2a.scout"
        assert card.subjects.rpc == f"{prefix}.rpc.scout"
        assert (card.protocol_versions.min, card.protocol_versions.max) == ("1.0", "1.0")
        assert card.protocol_range == ">=1.0,<2.0"  # Agent(protocols=...), the default
        assert {e.data.instance for e in started} == {running.instance}
        assert registered.agent_id == "scout-1" and registered.key == "1"
        now = await liveness(nc, prefix)
        assert now["scout/1"].status == "healthy" and now["scout/1"].state == "running"
        assert now["scout/1"].version == "1.2.0"
    events = [event async for event in store.read(stream_of("scout", "1"))]
    assert [event.type for event in events] == [
        "agent.registered",
        "agent.started",
        "agent.stopped",
        "agent.deregistered",
    ]
    assert {e.data.instance for e in events} == {running.instance}
    after = await liveness(nc, prefix)
    assert after["scout/1"].state == "stopped" and after["scout/1"].status == "down"
    [row] = summarize(after.values())
    assert (row.id, row.version, row.instances, row.status) == ("scout", "1.2.0", 0, "down")
    await store.close()


async def test_heartbeats_move_last_seen_and_keep_one_entry_per_instance(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    agent = scout("pulse", heartbeat=0.2)
    async with agent.run(nc, key="1", prefix=prefix, stream=stream) as running:
        first = (await liveness(nc, prefix))["pulse/1"].last_seen
        assert first is not None

        async def moved() -> bool:
            seen = (await liveness(nc, prefix))["pulse/1"].last_seen
            return seen is not None and seen > first and running.registration.beats >= 4

        await wait_for(moved, timeout=20)
        info = await nc.jetstream().stream_info(Subjects(prefix).liveness_stream_name)
        assert info.state.messages == 1  # beats replace each other: one entry per instance
        assert (await liveness(nc, prefix))["pulse/1"].status == "healthy"


async def test_a_sigkilled_agent_process_goes_stale_then_down(
    nc: Client, nats_url: str, prefix: str, stream: MessageStreamSpec
) -> None:
    command = ["--nats", nats_url, "--prefix", prefix, "agents", "run", "beacon_agent:beacon"]
    process = subprocess.Popen(
        [sys.executable, "-m", "newfuse", *command, "--key", "k1"],
        cwd=HERE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert process.stderr is not None
        banner = await asyncio.wait_for(asyncio.to_thread(process.stderr.readline), timeout=30)
        assert "beacon/k1 handles" in banner, banner
        alive = (await liveness(nc, prefix))["beacon/k1"]
        assert alive.status == "healthy" and alive.name == "Beacon" and alive.version == "3.1.0"
        while_alive = utcnow()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        reap(process)

    async def status_is(wanted: str) -> bool:
        return (await liveness(nc, prefix))["beacon/k1"].status == wanted

    await wait_for(lambda: status_is("stale"), timeout=20, interval=0.05)
    await wait_for(lambda: status_is("down"), timeout=20)
    dead = (await liveness(nc, prefix))["beacon/k1"]
    assert dead.state == "running"  # it never said it stopped: only its silence tells
    assert dead.last_seen is not None
    # The same entry, judged at chosen times: the bounds are 2 and 5 intervals (0.5 s each).
    at = {
        status: (await liveness(nc, prefix, now=dead.last_seen + timedelta(seconds=s)))[
            "beacon/k1"
        ].status
        for status, s in (("healthy", 0.9), ("stale", 2.0), ("down", 2.6))
    }
    assert at == {"healthy": "healthy", "stale": "stale", "down": "down"}
    # The log has no stop for this run: live at T only while its heartbeat was recent.
    async with JetStreamEventStore(nc, prefix=prefix) as store:
        history = await runs(store)
    assert [(r.agent_type, r.key, r.ended) for r in history] == [("beacon", "k1", None)]
    beats = list((await liveness(nc, prefix)).values())
    assert [i.status for i in live_at(while_alive, history, beats)] == ["healthy"]
    assert live_at(dead.last_seen + timedelta(seconds=3), history, beats) == []
    assert live_at(utcnow(), history, beats) == []


async def test_which_agents_at_which_versions_were_live_at_t_is_a_query_on_the_log(
    nc: Client, nats_url: str, prefix: str, stream: MessageStreamSpec
) -> None:
    store = JetStreamEventStore(nc, prefix=prefix)
    before = utcnow()
    old = scout("mapper", version="1.0.0").run(nc, key="a", prefix=prefix, stream=stream)
    new = scout("mapper", version="2.0.0").run(nc, key="b", prefix=prefix, stream=stream)
    await old.__aenter__()
    only_old = utcnow()
    await new.__aenter__()
    both = utcnow()
    await old.close()
    only_new = utcnow()
    try:
        history = await runs(store)
        beats = await read_liveness(nc, Subjects(prefix))

        def live(at: Any) -> list[tuple[str, str, str]]:
            found = live_at(at, history, beats)
            return sorted((i.agent_type, i.key, i.version) for i in found)

        assert live(before) == []
        assert live(only_old) == [("mapper", "a", "1.0.0")]
        assert live(both) == [("mapper", "a", "1.0.0"), ("mapper", "b", "2.0.0")]
        assert live(only_new) == [("mapper", "b", "2.0.0")]
        rows = summarize(live_at(both, history, beats))
        assert [(r.id, r.version, r.instances, r.status) for r in rows] == [
            ("mapper", "1.0.0", 1, "healthy"),
            ("mapper", "2.0.0", 1, "healthy"),
        ]
        # The same query through the CLI, in the wire's time format.
        for moment, expected in ((both, ["1.0.0", "2.0.0"]), (only_new, ["2.0.0"])):
            at = moment.isoformat().replace("+00:00", "Z")
            listed = await afuse(
                "--nats", nats_url, "--prefix", prefix, "agents", "list", "--at", at
            )
            assert listed.returncode == 0, listed.stderr
            as_json = await afuse(
                "--nats", nats_url, "--prefix", prefix, "agents", "list", "--at", at, "--json"
            )
            assert as_json.returncode == 0, as_json.stderr
            rows = [json.loads(line) for line in as_json.stdout.splitlines()]
            assert [(r["id"], r["version"], r["instances"]) for r in rows] == [
                ("mapper", version, 1) for version in expected
            ]
            assert [line.split()[2] for line in listed.stdout.splitlines()[2:]] == expected
    finally:
        await new.close()
        await store.close()


async def request_all(nc: Client, subject: str, *, wanted_id: str) -> dict[str, Any]:
    """Ask `subject` and return the answer of the service `wanted_id` (others may answer)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, b"", reply=inbox)
        while True:
            msg = await sub.next_msg(timeout=10)
            answer = json.loads(msg.data)
            if answer.get("id") == wanted_id:
                return answer  # type: ignore[no-any-return]
    finally:
        await sub.unsubscribe()


async def test_each_instance_answers_srv_ping_info_and_stats_as_adr_32_says(
    nc: Client, prefix: str, stream: MessageStreamSpec
) -> None:
    name = unique("survey")
    agent = scout(name, version="1.2.0-rc.1")
    async with (
        agent.run(nc, key="1", prefix=prefix, stream=stream) as running,
        AgentClient(nc, prefix=prefix, stream=stream) as client,
    ):
        answer = await client.call(name, "look", {"x": 1})
        assert answer.payload == {"seen": {"x": 1}}
        with pytest.raises(RequestFailedError, match="told to fail"):
            await client.call(name, "look", {"fail": True})
        failed = await nc.request(f"{prefix}.rpc.{name}", b"not json", timeout=10)
        assert failed.headers is not None
        assert failed.headers["Nats-Service-Error-Code"] == "400"
        assert "InvalidEnvelopeError" in failed.headers["Nats-Service-Error"]
        sid = running.instance
        for verb, schema in SCHEMAS.items():
            forms = [f"$SRV.{verb}", f"$SRV.{verb}.{name}", f"$SRV.{verb}.{name}.{sid}"]
            for subject in forms:
                if subject.endswith(sid):
                    reply = json.loads((await nc.request(subject, b"", timeout=10)).data)
                else:
                    reply = await request_all(nc, subject, wanted_id=sid)
                Draft7Validator(schema, format_checker=FormatChecker()).validate(reply)
                assert reply["name"] == name and reply["version"] == "1.2.0-rc.1", subject
                assert reply["metadata"]["agent_id"] == f"{name}/1", subject
        info = json.loads((await nc.request(f"$SRV.INFO.{name}.{sid}", b"", timeout=10)).data)
        assert info["description"] == "looks around"
        assert [(e["name"], e["subject"], e["queue_group"]) for e in info["endpoints"]] == [
            ("rpc", f"{prefix}.rpc.{name}", name)
        ]
        stats = json.loads((await nc.request(f"$SRV.STATS.{name}.{sid}", b"", timeout=10)).data)
        [endpoint] = stats["endpoints"]
        assert (endpoint["num_requests"], endpoint["num_errors"]) == (3, 2)
        assert "InvalidEnvelopeError" in endpoint["last_error"]
        assert endpoint["processing_time"] >= endpoint["average_processing_time"] > 0
    # Closed: it no longer answers.
    with pytest.raises(Exception, match="no responders"):
        await nc.request(f"$SRV.PING.{name}.{sid}", b"", timeout=5)


async def test_fuse_agents_list_prints_each_agent_as_a_table_and_as_json(
    nc: Client, nats_url: str, prefix: str, stream: MessageStreamSpec
) -> None:
    gone = scout("ranger", version="0.9.0").run(nc, key="old", prefix=prefix, stream=stream)
    async with gone:
        pass
    async with (
        scout("ranger", version="1.0.0", heartbeat=1.0).run(nc, key="1", prefix=prefix),
        scout("ranger", version="1.0.0", heartbeat=1.0).run(nc, key="2", prefix=prefix),
    ):
        # A hostile entry on the liveness stream is reported and skipped, never fatal.
        await nc.jetstream().publish(f"{prefix}.agents.ranger.evil", b'{"interval": "x"')
        as_json = await afuse("--nats", nats_url, "--prefix", prefix, "agents", "list", "--json")
        table = await afuse("--nats", nats_url, "--prefix", prefix, "agents", "list")
        instances = await afuse(
            "--nats", nats_url, "--prefix", prefix, "agents", "list", "--instances"
        )
    assert as_json.returncode == 0, as_json.stderr
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [list(row) for row in rows] == [
        ["id", "name", "version", "instances", "status", "last_seen"]
    ] * 2
    assert [(r["id"], r["version"], r["instances"], r["status"]) for r in rows] == [
        ("ranger", "0.9.0", 0, "down"),
        ("ranger", "1.0.0", 2, "healthy"),
    ]
    assert all(r["last_seen"].endswith("Z") and r["name"] == "ranger" for r in rows)
    assert "liveness entry 'PREFIX.agents.ranger.evil'".replace("PREFIX", prefix) in (
        as_json.stderr
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "VERSION", "INSTANCES", "STATUS", "LAST", "SEEN"]
    assert [line.split()[:5] for line in lines[2:]] == [
        ["ranger", "ranger", "0.9.0", "0", "down"],
        ["ranger", "ranger", "1.0.0", "2", "healthy"],
    ]
    assert instances.returncode == 0, instances.stderr
    assert [line.split()[0] for line in instances.stdout.splitlines()[2:]] == [
        "ranger/1",
        "ranger/2",
        "ranger/old",
    ]
    empty = await afuse("--nats", nats_url, "--prefix", unique("none"), "agents", "list")
    assert empty.returncode == 0 and empty.stdout.splitlines()[2:] == []
    assert "no agent has run under prefix" in empty.stderr


def test_an_agent_version_must_be_semantic_and_the_heartbeat_positive() -> None:
    with pytest.raises(AgentConfigError, match=r"agent 'x': version='1\.0': use a semantic"):
        Agent("x", version="1.0")
    with pytest.raises(AgentConfigError, match=r"heartbeat=0: seconds between heartbeats"):
        Agent("x", heartbeat=0)


def test_status_bounds_are_two_and_five_of_the_instances_own_intervals() -> None:
    seen = utcnow()

    def at(seconds: float, *, interval: float = 1.0, state: str | None = "running") -> str:
        now = seen + timedelta(seconds=seconds)
        return status_of(state=state, interval=interval, last_seen=seen, now=now)

    assert [at(s) for s in (0, 2.0, 2.1, 5.0, 5.1)] == [
        "healthy",
        "healthy",
        "stale",
        "stale",
        "down",
    ]
    assert at(9, interval=5.0) == "healthy" and at(11, interval=5.0) == "stale"
    assert at(0, state="stopped") == "down"  # stopped is down at once


def test_a_new_registration_ends_the_run_before_and_an_unchecked_open_run_is_unknown() -> None:
    t0 = utcnow()

    def moment(seconds: float) -> Any:
        return t0 + timedelta(seconds=seconds)

    first = Run(
        stream="agent.w-1", agent_type="w", key="1", instance="i1", name="w", version="1.0.0",
        started=moment(0), ended=moment(10),
    )  # fmt: skip
    second = Run(
        stream="agent.w-1", agent_type="w", key="1", instance="i2", name="w", version="1.1.0",
        started=moment(10),
    )  # fmt: skip
    assert [i.version for i in live_at(moment(5), [first, second], [])] == ["1.0.0"]
    [open_run] = live_at(moment(15), [first, second], [])
    assert (open_run.version, open_run.status, open_run.last_seen) == ("1.1.0", "unknown", None)
    beat = Instance(
        agent_type="w", key="1", instance="i2", name="w", version="1.1.0", state="running",
        interval=1.0, started=moment(10), last_seen=moment(20), status="down",
    )  # fmt: skip
    assert [i.status for i in live_at(moment(15), [first, second], [beat])] == ["healthy"]
    assert [i.status for i in live_at(moment(23), [first, second], [beat])] == ["stale"]
    assert live_at(moment(26), [first, second], [beat]) == []


def test_server_times_keep_microseconds_and_a_bad_one_is_none() -> None:
    parsed = parse_server_time("2026-12-03T05:40:00.123456789Z")
    assert parsed is not None and parsed.microsecond == 123456 and parsed.utcoffset() is not None
    assert parse_server_time("yesterday") is None


def test_a_bad_at_time_is_an_error_naming_the_flag(nats_url: str) -> None:
    result = run_fuse("--nats", nats_url, "agents", "list", "--at", "soon", check=False)
    assert result.returncode != 0
    assert "--at='soon'" in result.stderr and "Traceback" not in result.stderr
