"""AsyncClosing: `async with` for objects whose whole cleanup is an idempotent `close()`.

A leaf like errors.py: it imports nothing of newfuse, and every layer may use it.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class AsyncClosing:
    """Mixin: `async with obj:` returns `obj` and awaits `obj.close()` on the way out."""

    async def close(self) -> None:
        """Release what the object holds. Idempotent."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
