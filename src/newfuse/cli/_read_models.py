"""The projections every `fuse` process that runs or reads the built-in ones knows: the
projections layer's own, and the saga layer's `transactions` in the same SQLite file."""

from __future__ import annotations

from newfuse.core import transactions
from newfuse.projections.base import Projection
from newfuse.projections.builtin import BUILTIN_NAMES
from newfuse.projections.sqlite_model import SQLiteBatch

ALL_NAMES: tuple[str, ...] = (*BUILTIN_NAMES, transactions.NAME)


def extra_projections() -> list[Projection[SQLiteBatch]]:
    """The SQLite projections of higher layers, for `BuiltinProjections(extra=...)`."""
    return [transactions.transactions_projection()]
