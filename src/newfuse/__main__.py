"""`python -m newfuse` runs the `fuse` command."""

from newfuse.cli import main

raise SystemExit(main())
