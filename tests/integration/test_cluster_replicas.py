"""Replicas as configuration: a store on a cluster picks R3 and says so, an existing stream is used
with the count it has, more replicas than nodes is a permanent error with advice."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from newfuse.errors import StreamCreateError
from newfuse.eventstore import open_event_store
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats.cluster import NatsCluster
from newfuse.schemas import NewEvent
from support import wait_for


async def test_a_store_on_a_cluster_creates_three_replicas_and_says_so(
    nats_cluster: NatsCluster, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="newfuse.nats")
    async with await JetStreamEventStore.connect(nats_cluster.url, prefix=prefix) as store:
        assert store.replicas == 3
        await store.append("agent.r1", NewEvent(type="note", data={"n": 1}))
        cluster = await nats_cluster.stream_cluster(store.stream_name)
        assert len(cluster["replicas"]) == 2  # the leader and two followers
    assert "with 3 replica(s) (chosen" in caplog.text and "3 node(s) seen" in caplog.text


async def test_an_existing_r3_stream_is_used_by_a_store_that_asks_for_one_replica(
    nats_cluster: NatsCluster, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with await JetStreamEventStore.connect(
        nats_cluster.url, prefix=prefix, replicas=3
    ) as first:
        await first.append("agent.r1", NewEvent(type="note", data={"n": 1}))
    caplog.set_level(logging.WARNING, logger="newfuse.nats")
    async with await open_event_store(nats_cluster.url, prefix=prefix, replicas=1) as store:
        assert isinstance(store, JetStreamEventStore) and store.replicas == 3
        assert [event.data for event in [e async for e in store.read("agent.r1")]] == [{"n": 1}]
    assert "keeps 3 replica(s), not the 1 asked for" in caplog.text
    async with await open_event_store(nats_cluster.url, prefix=prefix) as default:
        assert isinstance(default, JetStreamEventStore) and default.replicas == 3


async def test_more_replicas_than_nodes_is_a_permanent_error_with_advice(
    nats_cluster: NatsCluster, prefix: str
) -> None:
    with pytest.raises(
        StreamCreateError, match=r"5 replicas asked for, the cluster has 3 node\(s\).*at most 3"
    ) as caught:
        await JetStreamEventStore.connect(nats_cluster.url, prefix=prefix, replicas=5)
    assert not caught.value.retryable


async def test_a_single_server_defaults_to_one_replica(nats_url: str, prefix: str) -> None:
    async with await JetStreamEventStore.connect(nats_url, prefix=prefix) as store:
        assert store.replicas == 1


def _fuse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "newfuse", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=60,
    )


async def test_fuse_publish_and_replay_use_an_r3_stream_whatever_replicas_they_are_given(
    nats_cluster: NatsCluster, prefix: str
) -> None:
    base = ["--nats", nats_cluster.url, "--prefix", prefix]
    created = _fuse(*base, "--replicas", "3", "publish", "agent.r1", "note", "--data", "{}")
    assert created.returncode == 0, created.stderr
    for flags in (["--replicas", "1"], []):
        replay = _fuse(*base, *flags, "replay", "--json")
        assert replay.returncode == 0, replay.stderr
        assert [json.loads(line)["stream"] for line in replay.stdout.splitlines()] == ["agent.r1"]
    refused = _fuse(
        *base[:2],
        "--prefix",
        prefix + "x",
        "publish",
        "agent.r1",
        "note",
        "--data",
        "{}",
        "--replicas",
        "4",
    )
    assert refused.returncode == 1
    assert "4 replicas asked for, the cluster has 3 node(s)" in refused.stderr
    bad = _fuse(*base, "--replicas", "many", "replay")
    assert bad.returncode != 0 and "--replicas='many': must be a whole number" in bad.stderr


async def test_fuse_streams_info_shows_the_leader_and_each_replicas_state_and_lag(
    healthy_cluster: NatsCluster, prefix: str
) -> None:
    base = ["--nats", healthy_cluster.url, "--prefix", prefix]
    assert _fuse(*base, "publish", "agent.r1", "note", "--data", "{}").returncode == 0
    stream = f"{prefix.upper()}_EVENTS"
    leader = await healthy_cluster.stream_leader(stream)
    shown = _fuse(*base, "streams", "info", "agent.r1", "--json")
    assert shown.returncode == 0, shown.stderr
    placement = json.loads(shown.stdout)["jetstream"]
    assert (placement["stream"], placement["replicas"], placement["leader"]) == (
        stream,
        3,
        leader.server_name,
    )
    assert placement["cluster"] == healthy_cluster.name
    copies = {copy["server"]: copy for copy in placement["copies"]}
    assert set(copies) == {node.server_name for node in healthy_cluster}
    assert copies[leader.server_name]["state"] == "leader"
    follower = next(node for node in healthy_cluster if node is not leader)
    await follower.kill()

    async def silent() -> bool:  # a live peer is heard from about every second
        shown = _fuse(*base, "streams", "info", "agent.r1", "--json")
        assert shown.returncode == 0, shown.stderr
        copies = {copy["server"]: copy for copy in json.loads(shown.stdout)["jetstream"]["copies"]}
        return copies[follower.server_name]["seen"] > 2.0

    await wait_for(silent, timeout=30)
    table = _fuse(*base, "streams", "info", "agent.r1").stdout
    assert f"3 replica(s) on cluster {healthy_cluster.name}, leader {leader.server_name}" in table


async def test_fuse_streams_info_on_a_single_server_says_so(nats_url: str, prefix: str) -> None:
    base = ["--nats", nats_url, "--prefix", prefix]
    assert _fuse(*base, "publish", "agent.r1", "note", "--data", "{}").returncode == 0
    table = _fuse(*base, "streams", "info", "agent.r1").stdout
    assert f"JetStream stream {prefix.upper()}_EVENTS: 1 replica(s) on a single server" in table
