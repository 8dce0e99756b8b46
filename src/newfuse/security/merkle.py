"""RFC 6962 (RFC 9162) Merkle tree hashes, computed as the log grows.

`leaf_hash(d) = SHA-256(0x00 || d)`, `node_hash(l, r) = SHA-256(0x01 || l || r)`, and the hash
of n leaves splits at k, the largest power of two strictly less than n; the empty tree hashes to
`SHA-256("")`. `Frontier` keeps only the roots of the perfect subtrees that the binary digits of
the tree size describe (at most 64 of them), so appending is O(1) amortized and the root of the
tree so far costs O(log n), without holding the leaves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Final

EMPTY_ROOT: Final[bytes] = hashlib.sha256(b"").digest()
HASH_SIZE: Final[int] = 32


def leaf_hash(data: bytes) -> bytes:
    """The hash of one leaf: SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The hash of an inner node: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_of(leaves: Sequence[bytes]) -> bytes:
    """The tree hash of `leaves` (leaf hashes) by the RFC's recursive definition (the reference
    `Frontier` is checked against; O(n) memory)."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    split = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(root_of(leaves[:split]), root_of(leaves[split:]))


class Frontier:
    """A Merkle tree that only grows: its size and the roots of its perfect subtrees.

    Example:
        >>> tree = Frontier()
        >>> tree.append(leaf_hash(b"a")); tree.append(leaf_hash(b"b"))
        >>> tree.root() == node_hash(leaf_hash(b"a"), leaf_hash(b"b"))
        True
    """

    def __init__(self, size: int = 0, subtrees: Iterable[bytes] = ()) -> None:
        self.size = size
        self._subtrees = list(subtrees)
        """Roots of the perfect subtrees, largest (leftmost) first: one per 1-bit of size."""
        if len(self._subtrees) != size.bit_count() or size < 0:
            raise ValueError(
                f"a tree of {size} leaves has {size.bit_count()} perfect subtrees, "
                f"not {len(self._subtrees)}"
            )
        if any(len(h) != HASH_SIZE for h in self._subtrees):
            raise ValueError(f"subtree hashes are {HASH_SIZE} bytes")

    @property
    def subtrees(self) -> tuple[bytes, ...]:
        """What the tree needs to grow on (store it with a checkpoint to resume from it)."""
        return tuple(self._subtrees)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash on the right."""
        node, size = leaf, self.size
        while size & 1:  # merge equal-sized perfect subtrees, as a binary counter carries
            node = node_hash(self._subtrees.pop(), node)
            size >>= 1
        self._subtrees.append(node)
        self.size += 1

    def root(self) -> bytes:
        """The tree hash of the leaves appended so far."""
        if not self._subtrees:
            return EMPTY_ROOT
        node = self._subtrees[-1]
        for left in reversed(self._subtrees[:-1]):
            node = node_hash(left, node)
        return node
