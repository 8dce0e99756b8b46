"""`open_event_store()` without a URL resolves the store exactly as the CLI does."""

from __future__ import annotations

from pathlib import Path

import pytest

from newfuse.config import Settings, load_settings
from newfuse.errors import NoDevServerError
from newfuse.eventstore import open_event_store
from newfuse.eventstore.sqlite import SQLiteEventStore


async def test_without_a_url_the_store_comes_from_the_settings(tmp_path: Path) -> None:
    settings = Settings(store=f"sqlite://{tmp_path / 'e.db'}", state_dir=str(tmp_path))
    async with await open_event_store(settings=settings) as store:
        assert isinstance(store, SQLiteEventStore)
    assert (tmp_path / "e.db").exists()


async def test_without_a_url_or_a_dev_it_says_where_it_looked(tmp_path: Path) -> None:
    settings = load_settings({"FUSE_STATE_DIR": str(tmp_path)})
    with pytest.raises(NoDevServerError, match=r"no NATS server configured") as caught:
        await open_event_store(settings=settings)
    assert caught.value.state_file == str(tmp_path / "dev.json")
