"""The event store contract on the SQLite backend (a file per test, as several processes see it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from contract import EventStoreContract, StoreFactory
from limits import LimitsContract

from newfuse.eventstore import EventStore, open_event_store


class TestSQLiteEventStore(EventStoreContract, LimitsContract):
    @pytest.fixture
    async def open_store(self, tmp_path: Path) -> AsyncIterator[StoreFactory]:
        opened: list[EventStore] = []

        async def factory(**options: Any) -> EventStore:
            store = await open_event_store(f"sqlite://{tmp_path / 'events.db'}", **options)
            opened.append(store)
            return store

        yield factory
        for store in opened:
            await store.close()
