"""Owner-only files written whole: keys, credentials, a dev's state, a server's authorization.

A leaf like errors.py: it imports nothing of newfuse, and every layer may use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes | str) -> None:
    """Write `data` to `path`, readable by its owner only, replacing what was there.

    Through a temporary file renamed over `path`: a reader (nats-server on a reload, another
    `fuse` command) sees the old file or the new one, never half of one, and the file is
    owner-only from its first byte, never briefly open to others.
    """
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data.encode() if isinstance(data, str) else data)
    temporary.replace(path)
