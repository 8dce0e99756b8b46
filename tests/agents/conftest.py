"""Agent test fixtures: a connection, and the message stream with a short duplicate window."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client

from newfuse.nats import MessageStreamSpec, Subjects, connect, ensure_event_stream

SHORT_WINDOW = 0.5
"""Seconds of the test message stream's duplicate window: redeliveries in these tests come
after it, so only the handled marker can keep effects from repeating."""


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await connect(nats_url, name="agents-test")
    yield client
    await client.close()


@pytest.fixture
async def stream(nc: Client, prefix: str) -> MessageStreamSpec:
    """The message stream of this test's prefix, created with the short duplicate window."""
    spec = MessageStreamSpec(subjects=Subjects(prefix), duplicate_window=SHORT_WINDOW)
    await ensure_event_stream(nc, spec)
    return spec
