"""RFC 6962 tree hashes as the log grows, and C2SP signed notes with Ed25519 keys."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from newfuse.errors import KeyFileError, SignedNoteError
from newfuse.security.merkle import EMPTY_ROOT, Frontier, leaf_hash, node_hash, root_of
from newfuse.security.notes import DASH, SigningKey, VerifierKey, key_id, open_note


def test_the_hashes_are_those_of_rfc_6962() -> None:
    assert EMPTY_ROOT.hex() == hashlib.sha256(b"").hexdigest()
    # SHA-256(0x00): the hash of a tree of one empty leaf, as Certificate Transparency has it
    assert leaf_hash(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    a, b, c = (leaf_hash(x) for x in (b"a", b"b", b"c"))
    # three leaves split at 2 (the largest power of two below 3), not at 3/2 rounded up
    assert root_of([a, b, c]) == node_hash(node_hash(a, b), c)
    assert root_of([a, b, c]) != node_hash(a, node_hash(b, c))


def test_a_growing_tree_has_the_root_of_the_recursive_definition_at_every_size() -> None:
    leaves = [leaf_hash(os.urandom(8)) for _ in range(130)]
    tree = Frontier()
    assert tree.root() == EMPTY_ROOT
    for n, leaf in enumerate(leaves, start=1):
        tree.append(leaf)
        assert tree.size == n
        assert tree.root() == root_of(leaves[:n]), n
        assert len(tree.subtrees) == n.bit_count()
    resumed = Frontier(tree.size, tree.subtrees)  # what a checkpoint stores to grow on
    more = leaf_hash(b"more")
    resumed.append(more)
    assert resumed.root() == root_of([*leaves, more])


def test_a_frontier_that_does_not_fit_its_size_is_refused() -> None:
    with pytest.raises(ValueError, match="a tree of 3 leaves has 2 perfect subtrees, not 1"):
        Frontier(3, [leaf_hash(b"x")])
    with pytest.raises(ValueError, match="32 bytes"):
        Frontier(1, [b"short"])


def test_a_signed_note_has_the_c2sp_form_and_verifies_with_the_public_key_alone() -> None:
    key = SigningKey.generate("audit.example")
    note = key.sign("origin\n3\nroot\n")
    text, signature = note.split("\n\n")
    assert text == "origin\n3\nroot"
    dash, name, blob = signature.rstrip("\n").split(" ")
    assert (dash, name) == (DASH, "audit.example")
    raw = base64.b64decode(blob)
    public = key.verifier.public
    assert raw[:4] == hashlib.sha256(b"audit.example\n\x01" + public).digest()[:4]
    assert raw[:4] == key_id("audit.example", public)
    Ed25519PublicKey.from_public_bytes(public).verify(raw[4:], b"origin\n3\nroot\n")
    verified = open_note(note, [VerifierKey.decode(key.verifier.encode())])
    assert verified.text == "origin\n3\nroot\n" and verified.key.name == "audit.example"


def test_a_note_changed_or_signed_by_a_stranger_is_refused() -> None:
    key, stranger = SigningKey.generate("k"), SigningKey.generate("k")
    note = key.sign("origin\n3\nroot\n")
    with pytest.raises(SignedNoteError, match="the signature of 'k' does not verify"):
        open_note(note.replace("\n3\n", "\n4\n"), [key.verifier])
    with pytest.raises(SignedNoteError, match=r"signed by no known key \(signers: k\)"):
        open_note(note, [stranger.verifier])  # same name, another key: another key id
    with pytest.raises(SignedNoteError, match="no signature block"):
        open_note("origin\n3\nroot\n", [key.verifier])
    with pytest.raises(SignedNoteError, match="longer than"):
        open_note("x" * 20000, [key.verifier])


def test_a_private_key_file_is_owner_only_and_never_overwritten(tmp_path: Path) -> None:
    key = SigningKey.generate("audit")
    path = tmp_path / "keys" / "audit.key"
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SigningKey.load(path).verifier == key.verifier
    with pytest.raises(KeyFileError, match="exists already"):
        SigningKey.generate("other").save(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match=r"readable by others \(mode 644\); chmod 600 it"):
        SigningKey.load(path)
    with pytest.raises(KeyFileError, match="key id 00000000 does not match"):
        VerifierKey.decode(key.verifier.encode().replace(key.verifier.id.hex(), "00000000"))
    with pytest.raises(KeyFileError, match="no spaces"):
        SigningKey.generate("a b")
