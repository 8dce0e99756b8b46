"""The local JetStream cluster: it comes up, an R3 stream outlives its leader's SIGKILL and keeps
every event on every node, a paused node catches up, `fuse dev --cluster 3` leaves no process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nats
from nats.js.api import StreamConfig

from newfuse.nats.cluster import NatsCluster
from support import dev_environment, start_fuse_dev, wait_for


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


async def _replicas_current(cluster: NatsCluster, stream: str) -> bool:
    info = await cluster.stream_cluster(stream)
    replicas = info.get("replicas") or []
    return (
        bool(info.get("leader"))
        and len(replicas) == cluster.size - 1
        and all(peer.get("current") and not peer.get("offline") for peer in replicas)
    )


async def test_an_r3_stream_keeps_its_events_on_every_node_across_a_leader_kill(
    healthy_cluster: NatsCluster,
) -> None:
    cluster = healthy_cluster
    assert len({node.pid for node in cluster}) == 3 and all(node.running for node in cluster)
    ports = [(node.port, node.cluster_port, node.monitor_port) for node in cluster]
    assert len({port for triple in ports for port in triple}) == 9
    nc = await nats.connect(cluster.urls)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="KILLED_LEADER", subjects=["kl.>"], num_replicas=3))
        # the stream answers once its group has a leader (a loaded machine elects it later
        # than add_stream returns: a publish before that meets no responders)
        await cluster.stream_leader("KILLED_LEADER", timeout=30)
        for i in range(50):
            await js.publish("kl.a", str(i).encode(), timeout=10)
        leader = await cluster.stream_leader("KILLED_LEADER")
        pid = leader.pid
        assert pid is not None
        await leader.kill()
        assert not _alive(pid)
        successor = await cluster.stream_leader("KILLED_LEADER", timeout=30)
        assert successor is not leader
        for i in range(50, 80):
            await js.publish("kl.a", str(i).encode(), timeout=10)
        await leader.restart()
        assert [(node.port, node.cluster_port, node.monitor_port) for node in cluster] == ports
        await cluster.wait_ready()
        await wait_for(lambda: _replicas_current(cluster, "KILLED_LEADER"), timeout=30)
        info = await js.stream_info("KILLED_LEADER")
        assert info.state.messages == 80 and info.state.last_seq == 80
        # every node answers from its own copy (direct get is served by any replica)
        for node in cluster:
            one = await nats.connect(node.url)
            try:
                reply = await one.request(
                    "$JS.API.STREAM.MSG.GET.KILLED_LEADER", b'{"seq": 80}', timeout=5
                )
                assert json.loads(reply.data)["message"]["seq"] == 80
            finally:
                await one.close()
        await js.delete_stream("KILLED_LEADER")
    finally:
        await nc.close()


async def test_a_paused_follower_leaves_the_stream_writable_and_catches_up_when_continued(
    healthy_cluster: NatsCluster,
) -> None:
    cluster = healthy_cluster
    nc = await nats.connect(cluster.urls)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="PAUSED", subjects=["pz.>"], num_replicas=3))
        leader = await cluster.stream_leader("PAUSED")
        follower = next(node for node in cluster if node is not leader)
        if nc.connected_url is not None and nc.connected_url.port == follower.port:
            await nc.close()
            nc = await nats.connect(leader.url)
            js = nc.jetstream()
        follower.pause()
        assert follower.paused and follower.running
        for i in range(20):
            await js.publish("pz.a", str(i).encode(), timeout=10)
        follower.resume()
        await cluster.wait_ready()
        await wait_for(lambda: _replicas_current(cluster, "PAUSED"), timeout=30)
        assert (await js.stream_info("PAUSED")).state.messages == 20
        await js.delete_stream("PAUSED")
    finally:
        await nc.close()


def test_fuse_dev_cluster_3_runs_three_nodes_and_stops_leaving_no_process(tmp_path: Path) -> None:
    env = dev_environment(tmp_path / "state")
    with start_fuse_dev(env, "dev", "--cluster", "3") as dev:
        urls = dev.urls
        assert len(urls["FUSE_NATS_URL"].split(",")) == 3
        state = json.loads((tmp_path / "state" / "dev.json").read_text())
        names = [server["name"] for server in state["servers"]]
        assert names == [f"nats-server fuse-dev-n{i}" for i in (1, 2, 3)] + ["valkey-server"]
        pids = [server["pid"] for server in state["servers"]]
        assert all(_alive(pid) for pid in pids)
        published = subprocess.run(
            [sys.executable, "-m", "newfuse", "publish", "agent.c1", "note", "--data", "{}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert published.returncode == 0, published.stderr
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)
    assert not (tmp_path / "state" / "dev.json").exists()
