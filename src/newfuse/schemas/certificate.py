"""What an identity's certificate says about its holder (the claims `fuse auth add` signs).

The certificate itself, its signature and how a reader checks it are in `newfuse.nats.signing`;
the claims live here because a read event carries its verified signer (`RecordedEvent.signer`)
and schemas import nothing of the layers above them.
"""

from __future__ import annotations

import msgspec


class Certified(msgspec.Struct, frozen=True, gc=False):
    """What a certificate says about its holder: JSON `{name, role, key, agent, groups}`.

    A certificate issued before `groups` existed decodes with none, so it still verifies and
    names its holder; it only lets them decide no review.
    """

    name: str
    role: str
    key: str
    """The holder's public nkey (`U…`)."""
    agent: str = ""
    """`<type>/<key>` for an agent identity."""
    groups: tuple[str, ...] = ()
    """The review groups the holder acts for (`fuse auth add NAME --group ops`): a review
    declared for `ops` counts a decision signed by them (core/review.py)."""
