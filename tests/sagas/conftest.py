"""Saga test fixtures: a JetStream event store of this test's own prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from newfuse.eventstore.jetstream import JetStreamEventStore


@pytest.fixture
async def store(nats_url: str, prefix: str) -> AsyncIterator[JetStreamEventStore]:
    opened = await JetStreamEventStore.connect(nats_url, prefix=prefix)
    yield opened
    await opened.close()
