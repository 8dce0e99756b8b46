"""Security: signing keys and signed notes, and the tamper-evident audit trail of the log."""

from newfuse.security.audit import CHECKPOINTS, Report, checkpoint, origin_of, verify
from newfuse.security.notes import SigningKey, VerifierKey

__all__ = [
    "CHECKPOINTS",
    "Report",
    "SigningKey",
    "VerifierKey",
    "checkpoint",
    "origin_of",
    "verify",
]
