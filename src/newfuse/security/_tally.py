"""Refusals counted so that a flood of them cannot flood the log: what the recorders of security
events (`permission.denied`, `auth.failed`) share.

A recorder counts each refusal under a key (who, what, where). A key's first refusal makes an
event at once; the ones after it within `window` seconds are counted, and the count goes out in
one event when the window is over (a writer task looks every quarter window), or at close. At
most `max_tracked` keys are tracked at once: keys that stayed quiet for a window are forgotten,
and while every slot is taken, a new key is counted under its overflow key (`*` in place of the
names). So a recorder appends at most `max_tracked` + (overflow keys) events a window, however
many names a flood makes up, and every refusal is in the count of one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Generic, TypeVar

import msgspec

from newfuse.errors import FuseError
from newfuse.eventstore import EventStore
from newfuse.schemas import NewEvent
from newfuse.schemas.payloads import utcnow

log = logging.getLogger("newfuse.security")

MAX_TEXT: Final[int] = 256
"""Characters kept of each text a recorded refusal quotes (what a stranger sent)."""

K = TypeVar("K", bound=Hashable)
S = TypeVar("S")


def clamp(text: str) -> str:
    """`text` fit for the log and a terminal: control characters escaped, at most `MAX_TEXT`
    characters (the cut marked with '…')."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: MAX_TEXT + 1])
    return shown if len(shown) <= MAX_TEXT else shown[: MAX_TEXT - 1] + "…"


@dataclass(frozen=True, slots=True)
class Batch(Generic[K, S]):
    """What one event says: the refusals of `key` since its previous event."""

    key: K
    count: int
    first: datetime
    last: datetime
    sample: S
    """The last refusal counted (what the event quotes of it)."""


class _Tally(Generic[S]):
    __slots__ = ("count", "first", "last", "sample", "written")

    def __init__(self, sample: S, when: datetime) -> None:
        self.count = 0
        self.first = self.last = when
        self.sample = sample
        self.written = -math.inf  # monotonic time of its last event: the first goes out at once


class BoundedRecorder(Generic[K, S]):
    """Appends one event per key and window to `stream` of `store` (see the module's text).

    Subclasses say what the event is (`_payload`); callers `count` refusals from a running event
    loop and `close()` at the end, which writes out what is counted and not written yet.

    Args:
        store: where the events go.
        stream: the stream they go to.
        seen_by: who records them (each event's `metadata.sender`).
        what: the event type, for log lines.
        overflow: the key a new key is counted under while every slot is taken.
        window: seconds within which one key's refusals make one event.
        max_tracked: keys tracked at once.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        stream: str,
        seen_by: str,
        what: str,
        overflow: Callable[[K], K],
        window: float,
        max_tracked: int,
    ) -> None:
        self.store = store
        self.stream = stream
        self.seen_by = seen_by
        self.window = window
        self.max_tracked = max_tracked
        self.written = 0
        """Events appended."""
        self._what = what
        self._overflow = overflow
        self._tallies: dict[K, _Tally[S]] = {}
        self._due: list[Batch[K, S]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Refusals counted and not written yet."""
        return sum(t.count for t in self._tallies.values()) + sum(b.count for b in self._due)

    def count(self, key: K, sample: S, when: datetime | None = None) -> None:
        """Count one refusal under `key` (`when` it happened: now by default); its event is
        queued at once if the key wrote none within the window."""
        moment = when or utcnow()
        tally = self._tallies.get(key)
        if tally is None:
            if len(self._tallies) >= self.max_tracked:
                self._forget_quiet(time.monotonic())
            if len(self._tallies) >= self.max_tracked:
                key = self._overflow(key)
            tally = self._tallies.setdefault(key, _Tally(sample, moment))
        if not tally.count:
            tally.first = moment
        tally.count += 1
        tally.last, tally.sample = moment, sample
        if time.monotonic() - tally.written >= self.window:
            self._queue(key, tally)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name=f"record {self._what}"
            )

    async def close(self) -> None:
        """Write out what was counted and wait for it (5 s at most). A refusal counted after
        this starts the recorder again."""
        writer = self._writer
        if writer is None:
            return
        self._closing = True
        self._wake.set()
        try:
            done, _ = await asyncio.wait({writer}, timeout=5.0)
            if not done:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
                log.warning("%s: the store did not take the last counts within 5 s", self._what)
            elif writer.exception() is not None:  # it stopped early: say why, once
                log.error("%s: recording stopped: %r", self._what, writer.exception())
        finally:
            self._writer, self._closing = None, False

    async def _payload(self, batch: Batch[K, S]) -> msgspec.Struct:
        """The event's payload for `batch`."""
        raise NotImplementedError

    def _queue(self, key: K, tally: _Tally[S]) -> None:
        self._due.append(Batch(key, tally.count, tally.first, tally.last, tally.sample))
        tally.count, tally.written = 0, time.monotonic()
        self._wake.set()

    def _forget_quiet(self, now: float) -> None:
        """Drop the keys with nothing pending whose window is over (their next refusal goes out
        at once anyway, so forgetting them loosens no bound)."""
        for key, tally in list(self._tallies.items()):
            if not tally.count and now - tally.written >= self.window:
                del self._tallies[key]

    def _sweep(self) -> None:
        """Queue the pending counts whose window is over, then forget the quiet keys."""
        now = time.monotonic()
        for key, tally in self._tallies.items():
            if tally.count and now - tally.written >= self.window:
                self._queue(key, tally)
        self._forget_quiet(now)

    async def _write_loop(self) -> None:
        while True:
            if not self._closing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.window / 4):
                        await self._wake.wait()
                self._wake.clear()
            if self._closing:  # everything counted goes out, whatever its window
                for key, tally in self._tallies.items():
                    if tally.count:
                        self._queue(key, tally)
            else:
                self._sweep()
            due, self._due = self._due, []
            for batch in due:
                await self._append(await self._payload(batch))
            if self._closing and not self.pending:
                self._tallies.clear()
                return

    async def _append(self, payload: msgspec.Struct) -> None:
        try:
            await self.store.append(
                self.stream, NewEvent(data=payload, metadata={"sender": self.seen_by})
            )
            self.written += 1
        except FuseError as error:  # refused too, or the store is down: say so, go on
            log.warning("%s not recorded: %s", self._what, error)
