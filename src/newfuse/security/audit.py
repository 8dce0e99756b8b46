"""The tamper-evident audit trail: the log as an RFC 6962 Merkle tree, with signed checkpoints.

Leaf i of the tree is the i-th message the log stores, in position order, valid or not:

    leaf data = <position, decimal ASCII> 0x0A <stream, UTF-8> 0x0A <body, the stored bytes>

(JetStream: the message's sequence, its subject after `<prefix>.ev.`, its data; SQLite: the
row's position, stream and body), hashed as RFC 6962 says (`security/merkle.py`). Any language
with SHA-256 recomputes it from what the server returns.

`checkpoint()` grows the tree from the last checkpoint to the head and appends an
`audit.checkpoint` event to the stream `audit.checkpoints`: a C2SP signed checkpoint note
(`<origin>\\n<size>\\n<base64 root>\\n`, Ed25519) plus, unsigned, the 8-byte prefix of each new
leaf hash, so that `verify()` can name the first position that differs. The checkpoint event is
in the log itself, and the next checkpoint covers it.

`verify()` recomputes every leaf from position 1 and compares: against the leaf prefixes to find
the first position that was changed, deleted, reordered or inserted; against each trusted
checkpoint's signed root at its size (the proof; prefixes only locate). Its answer is either
"verified up to position N, checkpoint signed by K" (events after N are not yet checkpointed)
or the first position where history differs from what was signed, and how.

What it cannot see: a change made before the first checkpoint was signed; the deletion of the
newest checkpoints together with everything after an older one (keep a copy of the newest note
elsewhere — `fuse audit checkpoint` prints it — and pass it to `verify` as `expected`).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from newfuse.errors import SignedNoteError
from newfuse.eventstore import EventStore, StoredRecord
from newfuse.schemas import AuditCheckpoint, NewEvent
from newfuse.security.merkle import HASH_SIZE, Frontier, leaf_hash
from newfuse.security.notes import SigningKey, VerifierKey, open_note

log = logging.getLogger("newfuse.audit")

CHECKPOINTS: Final[str] = "audit.checkpoints"
"""The stream the checkpoints are appended to."""
PREFIX_BYTES: Final[int] = 8
"""Bytes of each leaf hash a checkpoint keeps to locate a change (the root proves it)."""
MAX_LEAVES: Final[int] = 8192
"""Leaves one checkpoint covers at most (64 KiB of prefixes); a longer stretch takes several."""
MAX_FRONTIER: Final[int] = 64

Progress = Callable[[int], None]
"""Called with the number of records read so far (every 1000 and at the end)."""


def leaf_of(record: StoredRecord) -> bytes:
    """The leaf hash of one stored message."""
    head = b"%d\n%s\n" % (record.position, record.stream.encode("utf-8", "surrogateescape"))
    return leaf_hash(head + record.body)


def origin_of(store: EventStore) -> str:
    """The checkpoint origin line of a store: which log the tree is of."""
    stream_name = getattr(store, "stream_name", None)
    if isinstance(stream_name, str):
        return f"newfuse/jetstream/{stream_name}"
    return "newfuse/sqlite"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as read back: what its note signs, and the unsigned helpers."""

    position: int
    """Where the checkpoint event itself is in the log."""
    origin: str
    size: int
    root: bytes
    key: VerifierKey
    last_position: int
    since: int
    prefixes: bytes
    frontier: Frontier
    note: str


def checkpoint_body(origin: str, size: int, root: bytes) -> str:
    """The text a checkpoint note signs (C2SP tlog-checkpoint)."""
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n"


def parse_checkpoint(
    data: AuditCheckpoint, position: int, keys: Sequence[VerifierKey]
) -> Checkpoint:
    """A checkpoint event's payload, checked: signed by one of `keys`, well formed.

    Raises:
        SignedNoteError: it is not (the reason names what is wrong).
    """
    verified = open_note(data.note, list(keys))
    lines = verified.text.split("\n")
    if len(lines) != 4 or lines[3] != "":
        raise SignedNoteError(reason="a checkpoint has three lines: origin, size, root")
    origin, size_text, root_text = lines[:3]
    try:
        size = int(size_text)
        root = base64.b64decode(root_text, validate=True)
        prefixes = base64.b64decode(data.leaves, validate=True)
        subtrees = [base64.b64decode(h, validate=True) for h in data.frontier[:MAX_FRONTIER]]
    except (ValueError, binascii.Error):
        raise SignedNoteError(reason="size, root, leaves or frontier is not well formed") from None
    if size < 0 or len(root) != HASH_SIZE or not 0 <= data.since <= size:
        raise SignedNoteError(reason=f"size {size} / root / since {data.since} out of range")
    if len(prefixes) != (size - data.since) * PREFIX_BYTES:
        raise SignedNoteError(
            reason=f"leaves holds {len(prefixes) // PREFIX_BYTES} prefixes, "
            f"its range {data.since}..{size} needs {size - data.since}"
        )
    try:
        frontier = Frontier(size, subtrees)
    except ValueError as error:
        raise SignedNoteError(reason=f"frontier: {error}") from None
    return Checkpoint(
        position=position,
        origin=origin,
        size=size,
        root=root,
        key=verified.key,
        last_position=data.last_position,
        since=data.since,
        prefixes=prefixes,
        frontier=frontier,
        note=data.note,
    )


async def read_checkpoints(
    store: EventStore, keys: Sequence[VerifierKey], origin: str
) -> tuple[list[Checkpoint], list[str]]:
    """The trusted checkpoints of `store` (by size), and why each other one was ignored."""
    found: list[Checkpoint] = []
    ignored: list[str] = []
    async for event in store.read(CHECKPOINTS):
        if not isinstance(event.data, AuditCheckpoint):
            ignored.append(f"position {event.position}: a {event.type}, not a checkpoint")
            continue
        try:
            checkpoint = parse_checkpoint(event.data, event.position, keys)
        except SignedNoteError as error:
            ignored.append(f"position {event.position}: {error}")
            continue
        if checkpoint.origin != origin:
            ignored.append(f"position {event.position}: of log {checkpoint.origin!r}")
            continue
        found.append(checkpoint)
    found.sort(key=lambda c: c.size)
    return found, ignored


async def _last_own(store: EventStore, key: VerifierKey, origin: str) -> Checkpoint | None:
    """The newest checkpoint `key` signed for `origin` (read backwards: others are skipped)."""
    async for event in store.read(CHECKPOINTS, backwards=True):
        if isinstance(event.data, AuditCheckpoint):
            try:
                found = parse_checkpoint(event.data, event.position, [key])
            except SignedNoteError:
                continue
            if found.origin == origin:
                return found
    return None


@dataclass(frozen=True)
class Written:
    """What one `checkpoint()` call appended (None fields: nothing new to checkpoint)."""

    checkpoints: list[Checkpoint]
    head: int


async def checkpoint(
    store: EventStore,
    key: SigningKey,
    *,
    progress: Progress | None = None,
) -> Written:
    """Grow the tree from this key's last checkpoint to the head and append signed
    checkpoints (one per `MAX_LEAVES` leaves). Nothing is appended when the only message since
    the last checkpoint is that checkpoint itself.

    Raises:
        FuseError: the store's errors; WrongExpectedVersionError when another checkpointer
            appended at the same time (run it again).
    """
    origin = origin_of(store)
    last = await _last_own(store, key.verifier, origin)
    tree = Frontier(last.frontier.size, last.frontier.subtrees) if last else Frontier()
    if last is not None and tree.root() != last.root:
        raise SignedNoteError(
            reason=f"the frontier of checkpoint at position {last.position} does not give its "
            "root; run `fuse audit verify`"
        )
    after = last.last_position if last else 0
    head = await store.head_position()
    version = await store.stream_version(CHECKPOINTS)
    written: list[Checkpoint] = []
    since, prefixes, last_position, read = tree.size, bytearray(), after, 0
    own = last.position if last else None

    async def flush() -> None:
        nonlocal since, prefixes, version
        body = checkpoint_body(origin, tree.size, tree.root())
        data = AuditCheckpoint(
            note=key.sign(body),
            last_position=last_position,
            since=since,
            leaves=base64.b64encode(bytes(prefixes)).decode(),
            frontier=[base64.b64encode(h).decode() for h in tree.subtrees],
        )
        result = await store.append(CHECKPOINTS, NewEvent(data=data), version)
        version = result.version
        written.append(parse_checkpoint(data, result.position, [key.verifier]))
        since, prefixes = tree.size, bytearray()

    only_own = True
    async for record in store.records(after + 1):
        if record.position > head:
            break
        leaf = leaf_of(record)
        tree.append(leaf)
        prefixes += leaf[:PREFIX_BYTES]
        last_position = record.position
        only_own = only_own and record.position == own
        read += 1
        if progress is not None and read % 1000 == 0:
            progress(read)
        if tree.size - since >= MAX_LEAVES:
            await flush()
    if progress is not None:
        progress(read)
    if tree.size > since and not only_own:
        await flush()
    return Written(written, head)


Finding = Literal["verified", "changed", "deleted", "reordered", "inserted", "truncated"]


@dataclass
class Report:
    """What `verify()` found."""

    origin: str
    status: Finding = "verified"
    position: int | None = None
    """The first position where history differs (None: none does)."""
    detail: str = ""
    verified_to: int = 0
    """The last position a trusted checkpoint's signed root covers, all leaves matching."""
    verified_size: int = 0
    key: str | None = None
    """The key that signed that checkpoint."""
    head: int = 0
    records: int = 0
    checkpoints: int = 0
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "verified"

    def summary(self) -> str:
        if not self.ok:
            return f"{self.status} at position {self.position}: {self.detail}"
        if self.checkpoints == 0:
            return f"no trusted checkpoint: nothing verified ({self.records} records read)"
        tail = self.head - self.verified_to
        more = f"; {tail} position(s) after it not checkpointed yet" if tail > 0 else ""
        return f"verified up to position {self.verified_to}, checkpoint signed by {self.key}{more}"


async def verify(
    store: EventStore,
    keys: Sequence[VerifierKey],
    *,
    expected: str | None = None,
    progress: Progress | None = None,
) -> Report:
    """Recompute the tree of `store` and compare it with every checkpoint a key of `keys`
    signed (and with `expected`, a checkpoint note kept elsewhere, which must be there).

    Raises:
        SignedNoteError: `expected` is given and no key of `keys` signed it.
    """
    origin = origin_of(store)
    checkpoints, ignored = await read_checkpoints(store, keys, origin)
    report = Report(origin, ignored=ignored, checkpoints=len(checkpoints))
    outside = _expected_size(expected, keys, origin)
    prefixes = _prefix_index(checkpoints)
    pending = list(checkpoints)
    tree = Frontier()
    report.head = await store.head_position()
    previous = 0
    records = store.records()
    async for record in records:
        if record.position > report.head:
            break
        leaf = leaf_of(record)
        index = tree.size
        want = prefixes.get(index)
        if want is not None and leaf[:PREFIX_BYTES] != want:
            following = await anext(records, None)
            return _located(report, record, following, previous, index, prefixes)
        tree.append(leaf)
        previous = record.position
        report.records += 1
        if progress is not None and report.records % 1000 == 0:
            progress(report.records)
        while pending and pending[0].size == tree.size:
            done = pending.pop(0)
            if tree.root() != done.root:
                report.status, report.position = "changed", _first_of(done, checkpoints)
                report.detail = (
                    f"the tree of the first {done.size} messages does not hash to the root "
                    f"signed by {done.key.name} (checkpoint at position {done.position}); the "
                    "leaf prefixes match, so the change is not located more closely"
                )
                return report
            report.verified_to, report.verified_size = record.position, done.size
            report.key = done.key.name
    if progress is not None:
        progress(report.records)
    short = pending[0].size if pending else outside
    if short is not None and short > tree.size:
        report.status, report.position = "truncated", previous + 1
        report.detail = (
            f"the log has {tree.size} messages; a checkpoint signed {short} "
            f"(messages from position {previous + 1} on were deleted)"
        )
    return report


def _expected_size(note: str | None, keys: Sequence[VerifierKey], origin: str) -> int | None:
    if note is None:
        return None
    text = open_note(note, list(keys)).text.split("\n")
    if len(text) != 4 or text[0] != origin or not text[1].isdigit():
        raise SignedNoteError(reason=f"the expected checkpoint is not one of log {origin!r}")
    return int(text[1])


def _prefix_index(checkpoints: Sequence[Checkpoint]) -> dict[int, bytes]:
    """Leaf index -> the prefix a trusted checkpoint recorded for it."""
    index: dict[int, bytes] = {}
    for c in checkpoints:
        for i in range(c.size - c.since):
            index[c.since + i] = c.prefixes[i * PREFIX_BYTES : (i + 1) * PREFIX_BYTES]
    return index


def _first_of(done: Checkpoint, checkpoints: Sequence[Checkpoint]) -> int:
    """The first position a checkpoint covers that the one before it did not."""
    before = [c for c in checkpoints if c.size < done.size]
    return before[-1].last_position + 1 if before else 1


def _located(
    report: Report,
    record: StoredRecord,
    following: StoredRecord | None,
    previous: int,
    index: int,
    prefixes: dict[int, bytes],
) -> Report:
    """Name what happened at leaf `index`, the first that differs from its recorded prefix
    (`following`: the record after it, if any). A message's leaf depends on its position, so
    where it may have moved from is tried as the position it had there (leaf j at position
    j + 1: positions are dense from 1 in a log nobody deleted from)."""

    def as_at(r: StoredRecord, position: int) -> bytes:
        return leaf_of(StoredRecord(position, r.stream, r.body))[:PREFIX_BYTES]

    position = record.position
    report.position = position
    moved = _moved(record, index, prefixes, as_at)
    replaced = following is not None and prefixes.get(index) == as_at(following, position)
    if position > previous + 1:
        report.status, report.position = "deleted", previous + 1
        report.detail = f"no message at position {previous + 1} (the next is at {position})"
    elif moved is not None:
        if moved == index + 1 and not replaced:
            report.status = "deleted"
            report.detail = (
                f"the message checkpointed at position {position} is gone, and the ones after "
                "it were moved down"
            )
        else:
            report.status = "reordered"
            report.detail = f"its message was checkpointed at position {moved + 1}"
    elif replaced:
        report.status = "inserted"
        report.detail = (
            f"no checkpoint recorded this message; the one checkpointed at position {position} "
            f"now follows it"
        )
    else:
        report.status = "changed"
        report.detail = "its bytes differ from what the checkpoint recorded"
    return report


def _moved(
    record: StoredRecord,
    index: int,
    prefixes: dict[int, bytes],
    as_at: Callable[[StoredRecord, int], bytes],
) -> int | None:
    """The leaf index, within `MAX_LEAVES` of `index`, whose recorded prefix is `record`'s as
    if it were at that leaf's position (it moved from there)."""
    for other in range(max(0, index - MAX_LEAVES), index + MAX_LEAVES):
        want = prefixes.get(other)
        if other != index and want is not None and want == as_at(record, other + 1):
            return other
    return None


__all__ = [
    "CHECKPOINTS",
    "Checkpoint",
    "Report",
    "Written",
    "checkpoint",
    "leaf_of",
    "origin_of",
    "read_checkpoints",
    "verify",
]
