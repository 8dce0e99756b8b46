"""Raw SQL on the audit index has a time limit, stops when its caller gives up (Ctrl-C), and keeps
every column it returns; through the Python API and `fuse audit sql`, on real SQLite files."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from newfuse.errors import QueryTimeoutError
from newfuse.projections import AuditIndex
from support import run_fuse

RUNAWAY = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "read-models.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE t (x)")
    return path


async def test_a_query_past_its_time_limit_is_stopped_and_says_how_to_allow_more(
    database: Path,
) -> None:
    async with await AuditIndex.open(str(database)) as audit:
        started = time.monotonic()
        with pytest.raises(
            QueryTimeoutError, match=r"stopped at its time limit of 0\.2s"
        ) as caught:
            await audit.sql(RUNAWAY, time_limit=0.2)
        assert time.monotonic() - started < 5
        assert caught.value.time_limit == 0.2 and not caught.value.retryable
        assert "time_limit=SECONDS" in str(caught.value)
        # The connection is usable again, and short queries keep the default limit.
        assert (await audit.sql("SELECT 7")).rows == [(7,)]


async def test_a_cancelled_query_stops_in_sqlite_instead_of_running_on(database: Path) -> None:
    async with await AuditIndex.open(str(database)) as audit:
        query = asyncio.create_task(audit.sql(RUNAWAY, time_limit=None))
        await asyncio.sleep(0.3)  # let it run on SQLite's thread; nothing to wait on otherwise
        assert not query.done()
        started = time.monotonic()
        query.cancel()
        with pytest.raises(asyncio.CancelledError):
            await query
        async with asyncio.timeout(10):
            assert (await audit.sql("SELECT 1")).rows == [(1,)]
        assert time.monotonic() - started < 10


async def test_duplicate_column_names_are_kept(database: Path) -> None:
    async with await AuditIndex.open(str(database)) as audit:
        result = await audit.sql("SELECT 1 AS a, 2 AS a, 3 AS b")
    assert result.columns == ["a", "a", "b"] and result.rows == [(1, 2, 3)]


def _env(database: Path) -> dict[str, str]:
    return {**os.environ, "FUSE_AUDIT_DB": str(database)}


def test_fuse_audit_sql_keeps_duplicate_columns_in_table_and_json(database: Path) -> None:
    env = _env(database)
    rows = run_fuse("audit", "sql", "SELECT 1 AS a, 2 AS a", "--json", env=env).stdout
    assert [json.loads(line) for line in rows.splitlines()] == [{"a": 1, "a:2": 2}]
    header, _, values = run_fuse(
        "audit", "sql", "SELECT 1 AS a, 2 AS a", env=env
    ).stdout.splitlines()
    assert header.split() == ["a", "a"] and values.split() == ["1", "2"]


def test_fuse_audit_sql_timeout_flag_stops_a_runaway_query(database: Path) -> None:
    started = time.monotonic()
    result = run_fuse("audit", "sql", RUNAWAY, "--timeout", "0.5", env=_env(database), check=False)
    assert result.returncode == 1 and "time limit of 0.5s" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 30


def _has_open(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.path.realpath(fd) == str(path) for fd in fds.iterdir())
    except OSError:
        return False


def test_ctrl_c_stops_a_runaway_query_without_a_limit(database: Path) -> None:
    query = subprocess.Popen(
        [sys.executable, "-m", "newfuse", "audit", "sql", RUNAWAY, "--timeout", "0"],
        env=_env(database),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _has_open(query.pid, database.resolve()):  # the query is running
            assert query.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)
        query.send_signal(signal.SIGINT)
        _, stderr = query.communicate(timeout=15)
    finally:
        if query.poll() is None:
            query.kill()
            query.wait(timeout=10)
    assert query.returncode == 130 and "Traceback" not in stderr
