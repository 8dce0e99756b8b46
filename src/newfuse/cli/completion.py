"""`fuse completion bash|zsh`: a completion script generated from the parser itself (shtab).

shtab writes a static script from the argparse tree, so completing never starts Python (unlike
argcomplete, which runs `fuse` on every Tab) and a new flag is completed as soon as it exists.
"""

from __future__ import annotations

import argparse
import sys

from newfuse.cli._common import Commands

SHELLS = ("bash", "zsh")


def register(commands: Commands) -> None:
    """Add `fuse completion SHELL`."""
    parser = commands.add_parser(
        "completion",
        description="Print a completion script for SHELL. bash: `source <(fuse completion "
        'bash)` in ~/.bashrc; zsh: `fuse completion zsh > "${fpath[1]}/_fuse"`, then a new '
        "shell.",
    )
    parser.add_argument("shell", choices=SHELLS, metavar="SHELL", help=" or ".join(SHELLS))
    parser.set_defaults(handler=run_completion)


async def run_completion(args: argparse.Namespace) -> int:
    import shtab

    from newfuse.cli.main import build_parser

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return 0
