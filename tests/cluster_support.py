"""Session fixtures for tests on a local 3-node JetStream cluster (`NatsCluster`).

Registered by `pytest_plugins` in tests/conftest.py. The cluster is always our own (fault tests
kill its nodes), started once per session on free loopback ports and stopped by pid at the end.
A test that breaks nodes uses `healthy_cluster`, which mends the cluster before and after it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from newfuse.nats.cluster import NatsCluster
from newfuse.nats.embedded import find_nats_server


@pytest.fixture(scope="session")
async def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsCluster]:
    """A 3-node JetStream cluster, ready (meta leader, every peer current)."""
    cluster = NatsCluster(
        size=3, binary=find_nats_server(use_path=False), data_dir=tmp_path_factory.mktemp("cluster")
    )
    async with cluster:
        yield cluster


@pytest.fixture
async def healthy_cluster(nats_cluster: NatsCluster) -> AsyncIterator[NatsCluster]:
    """The session's cluster with every node up and current, mended again after the test."""
    await nats_cluster.heal()
    yield nats_cluster
    await nats_cluster.heal()
