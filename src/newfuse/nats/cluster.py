"""A local JetStream cluster: `size` nats-server processes on loopback, routed to each other.

Readiness and leaders are read from the servers themselves: HTTP monitoring `/jsz` gives the meta
group (`meta_cluster.leader`, and on the leader `replicas[].current`/`offline` for every other
peer), and `$JS.API.STREAM.INFO.<stream>` gives a stream's `cluster.leader` and replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from nats.aio.client import Client
from nats.errors import Error as NatsError

from newfuse.errors import ClusterNotReadyError, ConnectionLostError, ServerStartError
from newfuse.nats.connection import connect
from newfuse.nats.embedded import NatsServer, find_nats_server

_READY_TIMEOUT = 30.0
_START_ATTEMPTS = 3


def _free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (all held open at once)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


async def _get_json(port: int, path: str, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    """GET http://127.0.0.1:<port><path> and decode its JSON body (HTTP/1.0: read to EOF)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            await writer.drain()
            response = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise OSError(f"GET {path} on port {port}: {head[:80]!r}")
    decoded: dict[str, Any] = json.loads(body)
    return decoded


class NatsCluster:
    """A real JetStream cluster of `size` nats-server nodes on 127.0.0.1, for tests and `fuse dev`.

    Each node has its own client, route and monitoring port (free loopback ports chosen before
    the start, kept across restarts), its own store directory (`<data_dir>/n<i>`), routes to
    every other node, JetStream with the cluster name, its own session, and is stopped by its
    pid. Nodes are `NatsServer`s, so each can be broken and mended on its own.

    Example:
        async with NatsCluster(size=3) as cluster:        # started, meta leader elected
            store = await JetStreamEventStore.connect(cluster.url, replicas=3)
            leader = await cluster.stream_leader("FUSE_EVENTS")
            await leader.kill()                           # SIGKILL; or stop() for SIGTERM
            ...                                           # the stream elects another leader
            await leader.restart()                        # same ports, same data
            await cluster.wait_ready()
            node = cluster.nodes[1]
            node.pause()                                  # SIGSTOP: holds sockets, answers nothing
            node.resume()                                 # SIGCONT
            await cluster.heal()                          # every node up and current again

    API:
        nodes: the `NatsServer` of each node (`server_name` `<name>-n<i>`, `port`,
            `cluster_port`, `monitor_port`, `pid`, `data_dir`, `running`, `paused`), with
            `kill()`, `stop()`, `restart()`, `pause()`, `resume()`.
        url / urls: the client URLs of every node (comma separated for `connect`), or
            `live_url()` for the nodes running and not paused.
        wait_ready(timeout): a meta leader, and every peer current in its view.
        meta_leader(): the node leading the meta group.
        stream_leader(stream, timeout): the node leading a stream's group (after an election).
        stream_cluster(stream): the stream's `cluster` info as the server returns it.
        node_named(server_name): the node of that name.
        heal(timeout): resume paused nodes, restart stopped or killed ones, wait_ready.
        close(): stop every node (SIGTERM, then SIGKILL), remove directories it created.

    Args:
        size: how many nodes (at least 2; 3 tolerates the loss of one).
        binary: the nats-server executable (default: `find_nats_server()`).
        data_dir: parent of the nodes' directories (default: a temporary one, removed by close).
        name: the cluster's name, and the prefix of its nodes' server names.
        extra_args: more nats-server arguments for every node (e.g. `-c` of a file with
            `jetstream { sync_interval: always }`; command-line flags win over the file).
    """

    def __init__(
        self,
        size: int = 3,
        *,
        binary: Path | None = None,
        data_dir: str | Path | None = None,
        name: str = "newfuse",
        extra_args: list[str] | None = None,
    ) -> None:
        if size < 2:
            raise ValueError(f"a cluster needs at least 2 nodes, got size={size}")
        self.size = size
        self.name = name
        self.binary = binary or find_nats_server()
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="newfuse-cluster-"))
        self.nodes: list[NatsServer] = []
        self.extra_args = list(extra_args or [])

    def __iter__(self) -> Iterator[NatsServer]:
        return iter(self.nodes)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node's client URL, comma separated (what `connect` and the stores take)."""
        return ",".join(self.urls)

    def live_url(self) -> str:
        """The client URLs of the nodes running and not paused, comma separated."""
        return ",".join(node.url for node in self.nodes if node.running and not node.paused)

    def node_named(self, server_name: str) -> NatsServer:
        """The node whose server name is `server_name`."""
        for node in self.nodes:
            if node.server_name == server_name:
                return node
        raise LookupError(f"no node named {server_name!r} in cluster {self.name!r}")

    # -- lifecycle ---------------------------------------------------------------------------

    def _configure(self) -> None:
        ports = _free_ports(3 * self.size)
        clients, routes, monitors = (
            ports[: self.size],
            ports[self.size : 2 * self.size],
            ports[2 * self.size :],
        )
        route_urls = [f"nats://127.0.0.1:{port}" for port in routes]
        self.nodes = [
            NatsServer(
                binary=self.binary,
                data_dir=self.data_dir / f"n{index + 1}",
                port=clients[index],
                server_name=f"{self.name}-n{index + 1}",
                monitor_port=monitors[index],
                cluster_name=self.name,
                cluster_port=routes[index],
                routes=[url for i, url in enumerate(route_urls) if i != index],
                extra_args=self.extra_args,
            )
            for index in range(self.size)
        ]

    async def start(self, timeout: float = _READY_TIMEOUT) -> Self:  # noqa: ASYNC109
        """Start every node and wait until the cluster is ready (see `wait_ready`).

        Raises:
            ServerStartError: a node did not start (its log quoted), three times over with
                fresh ports when one was taken.
            ClusterNotReadyError: no meta leader with every peer current within `timeout`.
        """
        if self.nodes and all(node.running for node in self.nodes):
            return self
        for attempt in range(_START_ATTEMPTS):
            if not self.nodes:
                self._configure()
            # every start runs to its end (no orphan task) before a failure is looked at
            results = await asyncio.gather(
                *(node.start() for node in self.nodes if not node.running), return_exceptions=True
            )
            failures = [result for result in results if isinstance(result, BaseException)]
            if not failures:
                break
            await self.stop()
            error = failures[0]
            if not isinstance(error, ServerStartError):
                raise error
            if "in use" not in error.reason or attempt == _START_ATTEMPTS - 1:
                raise error
            self.nodes = []  # a port was taken meanwhile: choose them all again
        await self.wait_ready(timeout)
        return self

    async def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL); the data stays. Idempotent."""
        await asyncio.gather(*(node.stop() for node in self.nodes))

    async def close(self) -> None:
        """Stop every node and remove the data directory if this cluster created it."""
        await self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    async def heal(self, timeout: float = _READY_TIMEOUT) -> None:  # noqa: ASYNC109
        """Resume paused nodes, restart stopped or killed ones, then `wait_ready`."""
        for node in self.nodes:
            if node.paused:
                node.resume()
        await asyncio.gather(*(node.restart() for node in self.nodes if not node.running))
        await self.wait_ready(timeout)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- what the servers say ----------------------------------------------------------------

    async def _meta(self, node: NatsServer) -> dict[str, Any]:
        assert node.monitor_port is not None
        jsz = await _get_json(node.monitor_port, "/jsz", timeout=1.0)
        meta: dict[str, Any] = jsz.get("meta_cluster") or {}
        return meta

    async def _meta_state(self) -> tuple[NatsServer | None, str]:
        """The meta leader if every peer is current in its view, else None and why not."""
        reason = "no node answered /jsz"
        for node in self.nodes:
            if not node.running or node.paused:
                continue
            try:
                leader_name = (await self._meta(node)).get("leader")
                if not leader_name:
                    reason = f"{node.server_name} sees no meta leader"
                    continue
                leader = self.node_named(leader_name)
                meta = await self._meta(leader)
            except (OSError, TimeoutError, ValueError, LookupError) as error:
                reason = f"{node.server_name}: {type(error).__name__}: {error}"
                continue
            if meta.get("leader") != leader.server_name:
                reason = f"{leader.server_name} no longer leads the meta group"
                continue
            peers = meta.get("replicas") or []
            behind = [
                peer.get("name") for peer in peers if not peer.get("current") or peer.get("offline")
            ]
            if len(peers) != self.size - 1 or behind:
                reason = f"meta leader {leader.server_name}: peers not current: {behind or peers}"
                continue
            return leader, ""
        return None, reason

    async def wait_ready(self, timeout: float = _READY_TIMEOUT) -> NatsServer:  # noqa: ASYNC109
        """Wait until the meta group has a leader and every other peer is current in its view.

        Returns:
            The meta leader.

        Raises:
            ClusterNotReadyError: not so within `timeout` (with what the servers last said).
        """
        deadline = time.monotonic() + timeout
        while True:
            leader, reason = await self._meta_state()
            if leader is not None:
                return leader
            if time.monotonic() > deadline:
                raise ClusterNotReadyError(
                    server=f"cluster {self.name!r}",
                    reason=f"not ready after {timeout:g}s: {reason}",
                )
            await asyncio.sleep(0.1)

    async def meta_leader(self) -> NatsServer:
        """The node that leads the meta group now (waiting up to 10 s for one)."""
        return await self.wait_ready(10.0)

    async def _client(self) -> Client:
        url = self.live_url()
        if not url:
            raise ConnectionLostError(
                server=f"cluster {self.name!r}", url=self.url, reason="no node is running"
            )
        return await connect(url, name="newfuse-cluster-probe", timeout=5.0)

    async def stream_cluster(self, stream: str) -> dict[str, Any]:
        """The `cluster` part of `$JS.API.STREAM.INFO.<stream>`: leader, replicas (may be empty).

        Raises:
            LookupError: the servers answer with an error (no such stream, ...).
        """
        nc = await self._client()
        try:
            reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2.0)
        finally:
            await nc.close()
        info: dict[str, Any] = json.loads(reply.data)
        if "error" in info:
            raise LookupError(f"stream {stream!r}: {info['error']}")
        cluster: dict[str, Any] = info.get("cluster") or {}
        return cluster

    async def stream_leader(
        self,
        stream: str,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> NatsServer:
        """The node that leads `stream`'s group, waiting up to `timeout` for an election.

        Raises:
            ClusterNotReadyError: no leader within `timeout` (the last answer quoted).
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                leader = (await self.stream_cluster(stream)).get("leader")
                if leader:
                    return self.node_named(leader)
                reason = "no leader in the stream's cluster info"
            except (OSError, LookupError, ValueError, ConnectionLostError, NatsError) as error:
                reason = f"{type(error).__name__}: {error}"  # no responders, timeout, ...
            if time.monotonic() > deadline:
                raise ClusterNotReadyError(
                    server=f"cluster {self.name!r}",
                    reason=f"stream {stream!r} has no leader after {timeout:g}s: {reason}",
                )
            await asyncio.sleep(0.1)
