"""Helpers shared by the tests (importable as `support`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable


async def wait_for(
    condition: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll `condition` until it is true; fail the test when `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition!r}")
        await asyncio.sleep(interval)


def run_fuse(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `fuse` as a user does (`python -m newfuse`, a real process); 200 columns wide."""
    result = subprocess.run(
        [sys.executable, "-m", "newfuse", *args],
        capture_output=True,
        text=True,
        env={**(os.environ if env is None else env), "COLUMNS": "200"},
        input=stdin,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result
