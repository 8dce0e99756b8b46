"""Audit events: signed checkpoints of the log's Merkle tree (security/audit.py)."""

from __future__ import annotations

from typing import Final

import msgspec

from newfuse.schemas.payloads import Timestamp, utcnow


class AuditCheckpoint(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Type `audit.checkpoint`: the log's first `size` messages hash to the root that `note`
    signs (a C2SP signed checkpoint: `<origin>\\n<size>\\n<base64 root>\\n`, a blank line and
    `— <key> <signature>`).

    What is not signed only helps: `lastPosition` is the position of leaf `size`; `leaves` is
    the first 8 bytes of each leaf hash after the previous checkpoint's `since` leaves (base64),
    so a verifier can name the first position that changed; `frontier` is the tree's perfect
    subtree roots (base64), so the next checkpoint grows the tree without re-reading the log.
    A verifier trusts none of them beyond what the signed root confirms.
    """

    note: str
    last_position: int = msgspec.field(name="lastPosition")
    since: int = 0
    leaves: str = ""
    frontier: list[str] = msgspec.field(default_factory=list)
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)


AUDIT_TYPES: Final[dict[str, type[msgspec.Struct]]] = {"audit.checkpoint": AuditCheckpoint}
"""The audit event types and their payloads (version 1 each)."""
