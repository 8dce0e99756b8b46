"""The `fuse` command: dev servers, schemas, publish/replay/tail, projections, audit."""

from newfuse.cli.main import main

__all__ = ["main"]
