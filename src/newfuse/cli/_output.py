"""How `fuse` prints: JSON in the wire vocabulary, rich tables, a streamed table, progress, errors.

Colour and progress come from rich, which leaves colour out when the stream is not a terminal
or NO_COLOR is set. JSON output uses the envelope's field names and one time format, RFC 3339 in
UTC with `Z` and microseconds (`2026-12-02T20:45:01.123456Z`).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec
from rich import box
from rich.cells import cell_len, set_cell_size
from rich.console import Console
from rich.json import JSON
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from newfuse.schemas import RecordedEvent

_JSON = msgspec.json.Encoder()


def rfc3339(moment: datetime | None) -> str | None:
    """`moment` as RFC 3339 in UTC with `Z` and microseconds; a naive time is taken as UTC."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def event_json(event: RecordedEvent) -> dict[str, Any]:
    """An event as `--json` prints it: every envelope field (null when unset) and `position`;
    `data` is the payload as stored (of `schema_version`), byte for byte, except for sealed
    fields, which show opened; `redacted` (only when some are) lists those whose data
    subject is forgotten."""
    envelope = event.envelope
    shown: dict[str, Any] = {
        "id": envelope.id,
        "stream": envelope.stream,
        "type": envelope.type,
        "schema_version": envelope.schema_version,
        "version": envelope.version,
        "position": event.position,
        "timestamp": rfc3339(envelope.timestamp),
        "correlation_id": envelope.correlation_id,
        "causation_id": envelope.causation_id,
        "trace": envelope.trace,
        "metadata": envelope.metadata,
        "data": envelope.data,
    }
    if event.redacted:
        shown["redacted"] = list(event.redacted)
    return shown


def print_json(value: Any) -> None:
    """One JSON value on one line of stdout (a listing prints one per item: JSON Lines)."""
    sys.stdout.write(_JSON.encode(value).decode() + "\n")


def print_pretty_json(value: Any) -> None:
    """One JSON value indented for people (coloured on a colour terminal)."""
    stdout_console().print(JSON(_JSON.encode(value).decode()), soft_wrap=True)


def _width() -> int:
    return shutil.get_terminal_size((160, 24)).columns


def stdout_console() -> Console:
    """Stdout as rich sees it; off a terminal the width is $COLUMNS or 160, not rich's 80."""
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console.width = _width()
    return console


def print_error(text: str) -> None:
    """`fuse: <text>` on stderr, the prefix in red on a colour terminal; never wrapped."""
    Console(stderr=True, highlight=False).print(
        f"[bold red]fuse:[/] {escape(text)}", soft_wrap=True
    )


def note(text: str) -> None:
    """A remark for people (counts, what a limit cut) on stderr, dimmed on a colour terminal."""
    sys.stdout.flush()  # after the rows it speaks of, when both go to one terminal
    Console(stderr=True, highlight=False).print(f"[dim]{escape(text)}[/]", soft_wrap=True)


def cell(value: Any) -> str:
    """A table cell's text: None is empty, times are RFC 3339."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return rfc3339(value) or ""
    return str(value)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """A table of a bounded listing; columns shrink to the width, long cells end in `…`.

    Duplicate headers stay separate columns.
    """
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, header_style="bold")
    for header in headers:
        table.add_column(header, no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(*(escape(cell(value)) for value in row))
    stdout_console().print(table)


class StreamedTable:
    """A table printed row by row as rows come (a replay of millions never waits or piles up).

    Column widths are fixed up front, so a row never waits for the widest one. `None` marks the
    one column that takes the width left; cells are measured in terminal cells (a CJK character
    is two) and cut with `…`.
    """

    def __init__(self, columns: Sequence[tuple[str, int | None]]) -> None:
        fixed = sum(width or 0 for _, width in columns) + 2 * (len(columns) - 1)
        rest = max(_width() - fixed, 20)
        self._widths = [width if width is not None else rest for _, width in columns]
        self._last = len(columns) - 1
        self._console = stdout_console()
        header = self._line([name for name, _ in columns])
        self._console.print(Text(header, style="bold"), soft_wrap=True)
        self.rows = 0

    def _line(self, cells: Sequence[str]) -> str:
        parts = []
        for index, (text, width) in enumerate(zip(cells, self._widths, strict=True)):
            if cell_len(text) > width:
                text = set_cell_size(text, width - 1) + "…"
            elif index < self._last:
                text = set_cell_size(text, width)
            parts.append(text)
        return "  ".join(parts).rstrip()

    def row(self, cells: Sequence[Any]) -> None:
        sys.stdout.write(self._line([cell(value) for value in cells]) + "\n")
        self.rows += 1


class _Rate(ProgressColumn):
    """Items per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s", style="cyan")


class Meter:
    """What a long command reports its progress to."""

    def __init__(self, progress: Progress | None, total: int | None) -> None:
        self._progress = progress
        self._task = progress.add_task("", total=total) if progress is not None else None
        self.done = 0

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._progress is not None and self._task is not None and (self.done & 0xFF) < count:
            self._progress.update(self._task, completed=self.done)  # every 256: rich locks

    def finish(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self.done)

    def set_total(self, total: int | None) -> None:
        if self._progress is not None and self._task is not None and total:
            self._progress.update(self._task, total=total)


@contextmanager
def progress(label: str, total: int | None) -> Iterator[Meter]:
    """A progress bar with count, rate and ETA on stderr, shown only when stderr is a terminal
    and stdout is not (rows streaming to the same terminal would tear the bar)."""
    console = Console(stderr=True)
    if not console.is_terminal or sys.stdout.isatty():
        yield Meter(None, total)
        return
    with Progress(
        TextColumn(escape(label)),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        redirect_stdout=False,
        redirect_stderr=False,
    ) as bar:
        meter = Meter(bar, total)
        yield meter
        meter.finish()
