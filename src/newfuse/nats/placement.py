"""Where a JetStream stream lives in a cluster: its leader and each replica's state and lag.

From the `cluster` object of `$JS.API.STREAM.INFO` (nats-server 2.15): `name` (the cluster),
`leader` (a server name; absent during an election), and `replicas`, the peers other than the
leader, each with `name`, `current` (caught up with the leader), `offline`, `active`
(nanoseconds since the leader last heard from it) and `lag` (log entries behind the leader).
A single server has no `cluster` object, or one without a leader or replicas.
"""

from __future__ import annotations

from typing import Any

import msgspec

from newfuse.nats.jsapi import NANOSECONDS


class Replica(msgspec.Struct, frozen=True, kw_only=True):
    """One copy of the stream.

    Attributes:
        server: the server's name.
        state: `leader`, `current` (caught up), `not current` (behind, or silent: the leader
            says so about 10 s after a peer died) or `offline`.
        lag: log entries behind the leader (0 for the leader).
        seen: seconds since the leader last heard from it (0 for the leader); a live peer is
            heard from about every second, so a larger value is the first sign of a dead one.
    """

    server: str
    state: str
    lag: int = 0
    seen: float = 0.0


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """The JetStream stream's copies.

    Attributes:
        stream: the JetStream stream's name.
        cluster: the cluster's name; None on a single server.
        leader: the leading server; None on a single server or during an election.
        replicas: copies the stream keeps (its `num_replicas`).
        copies: the leader first, then the other replicas by server name.
    """

    stream: str
    cluster: str | None
    leader: str | None
    replicas: int
    copies: tuple[Replica, ...]


def placement_of(info: dict[str, Any]) -> Placement:
    """The placement in a `STREAM.INFO` answer (one that succeeded)."""
    cluster: dict[str, Any] = info.get("cluster") or {}
    leader: str | None = cluster.get("leader") or None
    copies = [Replica(server=leader, state="leader")] if leader else []
    for peer in sorted(cluster.get("replicas") or (), key=lambda peer: str(peer.get("name"))):
        if peer.get("offline"):
            state = "offline"
        elif peer.get("current"):
            state = "current"
        else:
            state = "not current"  # behind, or not heard from for a while (see `seen`)
        copies.append(
            Replica(
                server=str(peer.get("name")),
                state=state,
                lag=int(peer.get("lag") or 0),
                seen=round(int(peer.get("active") or 0) / NANOSECONDS, 3),
            )
        )
    config: dict[str, Any] = info.get("config") or {}
    return Placement(
        stream=str(config.get("name")),
        cluster=cluster.get("name") if leader or cluster.get("replicas") else None,
        leader=leader,
        replicas=int(config.get("num_replicas") or 1),
        copies=tuple(copies),
    )
