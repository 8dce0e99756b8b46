"""The event store contract on the SQLite backend (a file per test, as several processes see it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from contract import EventStoreContract, StoreFactory
from limits import LimitsContract

from newfuse.eventstore import EventStore, open_event_store


class TestSQLiteEventStore(EventStoreContract, LimitsContract):
    defaults: ClassVar[dict[str, Any]] = {}
    """Options every store of the class opens with (a test's own options win)."""

    @pytest.fixture
    async def open_store(self, tmp_path: Path) -> AsyncIterator[StoreFactory]:
        opened: list[EventStore] = []

        async def factory(**options: Any) -> EventStore:
            path = f"sqlite://{tmp_path / 'events.db'}"
            store = await open_event_store(path, **{**self.defaults, **options})
            opened.append(store)
            return store

        yield factory
        for store in opened:
            await store.close()


class TestSQLiteEventStoreInlineCommits(TestSQLiteEventStore):
    """The same contract with synchronous=NORMAL, where a lone append commits on the event loop
    (inline) and overlapping ones go to the writer thread: both paths keep every guarantee."""

    defaults: ClassVar[dict[str, Any]] = {"synchronous": "NORMAL"}
