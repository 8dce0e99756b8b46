"""The `fuse` entry point: global flags, subcommands loaded when used, errors turned into exits.

`fuse --help` imports no command module: each is imported only when its command runs (or when
`fuse completion` needs the whole parser), so the help is quick and a broken optional backend
cannot break unrelated commands.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

Handler = Callable[[argparse.Namespace], Awaitable[int]]

USAGE_ERROR = 2  # argparse's status for a bad command line


class Command(NamedTuple):
    """A subcommand as `fuse --help` lists it: the module that registers it and its help."""

    module: str
    help: str


# In the order `fuse --help` lists them; a module may register several commands.
COMMANDS: dict[str, Command] = {
    "demo": Command("newfuse.cli.demo", "the tour: agents talk through the log, a human answers"),
    "dev": Command("newfuse.cli.dev", "run embedded NATS and valkey servers for development"),
    "publish": Command("newfuse.cli.events", "append one event to a stream"),
    "replay": Command("newfuse.cli.events", "print stored events that match the filters"),
    "tail": Command("newfuse.cli.events", "follow new events that match the filters"),
    "streams": Command("newfuse.cli.streams", "list the streams, or one stream's facts"),
    "events": Command("newfuse.cli.streams", "show one event, by id or position"),
    "schemas": Command("newfuse.cli.schemas", "export or list the event schemas"),
    "projections": Command("newfuse.cli.read_side", "run, inspect and rebuild projections"),
    "agents": Command("newfuse.cli.read_side", "run agents, their read models, dead letters"),
    "audit": Command(
        "newfuse.cli.read_side", "query the audit index; sign and verify the log (tamper-evident)"
    ),
    "tasks": Command("newfuse.cli.tasks", "list, show and answer A2A tasks"),
    "sagas": Command("newfuse.cli.sagas", "list sagas and show one: steps, Transaction view"),
    "forget": Command("newfuse.cli.forget", "delete a data subject's key: its fields redacted"),
    "locks": Command("newfuse.cli.locks", "resource locks of sagas: holders and waiters"),
    "review": Command("newfuse.cli.review", "human review of saga steps, feedback on results"),
    "queues": Command("newfuse.cli.queues", "task queues: depth per priority, workers, oldest"),
    "models": Command("newfuse.cli.models", "what model calls cost, per agent and model version"),
    "auth": Command("newfuse.cli.auth", "identities (nkeys) and the permissions NATS enforces"),
    "completion": Command("newfuse.cli.completion", "print a bash or zsh completion script"),
}

# Global flags: (flags, metavar, help); each also accepted after the subcommand.
_VALUED_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--nats", "URL", "NATS server URL (default: $FUSE_NATS_URL, else the running fuse dev's)"),
    ("--redis", "URL", "Redis URL (default: $FUSE_REDIS_URL, else the running fuse dev's)"),
    ("--store", "URL", "event store URL, nats://… or sqlite:///… ($FUSE_STORE)"),
    (
        "--credentials",
        "FILE",
        "connect to NATS as this identity, a file of `fuse auth add` ($FUSE_NATS_CREDENTIALS)",
    ),
    (
        "--ca",
        "FILE",
        "verify NATS servers' TLS certificates with this CA (PEM); connections are then TLS "
        "($FUSE_NATS_CA; default: the credentials' `ca`, else the running fuse dev's)",
    ),
    ("--prefix", "NAME", "subject prefix (default: $FUSE_PREFIX, the running fuse dev's, 'fuse')"),
    ("--audit-db", "PATH", "SQLite file of the read models ($FUSE_AUDIT_DB)"),
    (
        "--replicas",
        "N",
        "copies of the JetStream stream when it is created ($FUSE_REPLICAS; default 3 on a "
        "cluster, 1 on one server; an existing stream keeps its count)",
    ),
)


class _VersionAction(argparse.Action):
    """`--version`, looked up only when asked (importlib.metadata is slow to import)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        from importlib.metadata import version

        print(f"fuse (newfuse) {version('newfuse')}")
        parser.exit()


class FuseParser(argparse.ArgumentParser):
    """An ArgumentParser whose every (sub)command accepts the global flags.

    The top parser's flags default to None; a subcommand's default to SUPPRESS, so a flag given
    before the subcommand is not reset by its absence after it.
    """

    def __init__(self, *args: Any, top: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        default = None if top else argparse.SUPPRESS
        group = self.add_argument_group("global options (before or after the command)")
        for flag, metavar, text in _VALUED_FLAGS:
            group.add_argument(flag, metavar=metavar, help=text, default=default)
        group.add_argument(
            "--json",
            action="store_true",
            default=False if top else argparse.SUPPRESS,
            help="JSON output: one object, or JSON Lines for listings",
        )


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv`: its first word that is not a global flag or its value."""
    valued = {flag for flag, _, _ in _VALUED_FLAGS}
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in valued:
            skip = True
        elif not word.startswith("-"):
            return word
    return None


class _Commands:
    """What a module's `register(commands)` receives: add_parser with the help of COMMANDS."""

    def __init__(self, action: Any) -> None:
        self._action = action

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("help", COMMANDS[name].help)
        kwargs.setdefault("description", COMMANDS[name].help)
        parser: argparse.ArgumentParser = self._action.add_parser(name, **kwargs)
        return parser


def build_parser(argv: Sequence[str] | None = None) -> FuseParser:
    """The `fuse` parser: complete, or (given `argv`) only able to parse the command it names,
    whose module is then the only one imported."""
    parser = FuseParser(
        prog="fuse",
        description="newfuse: an event-sourced agent-to-agent bus on NATS JetStream",
        top=True,
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    action = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands = _Commands(action)
    full = argv is None
    command = None if argv is None else _command_of(argv)
    chosen = COMMANDS[command].module if command in COMMANDS else None
    registered: set[str] = set()
    for name, (module, text) in COMMANDS.items():
        if module in registered:
            continue
        if full or module == chosen:
            importlib.import_module(module).register(commands)
            registered.add(module)
        else:
            action.add_parser(name, help=text, description=text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `fuse` with `argv`; returns the exit status (errors go to stderr, status 1)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    for index, word in enumerate(arguments, start=1):
        try:
            word.encode("utf-8")
        except UnicodeEncodeError:
            # argv bytes that are not UTF-8 arrive as lone surrogates (PEP 383).
            raw = os.fsencode(word)
            print(
                f"fuse: argument {index} ({raw!r}) is not valid UTF-8; stream names, types "
                "and data are UTF-8 text: re-encode it (e.g. with iconv) and try again",
                file=sys.stderr,
            )
            return USAGE_ERROR
    args = build_parser(arguments).parse_args(arguments)
    handler: Handler = args.handler
    from newfuse.errors import FuseError

    try:
        return run(handler(args))
    except FuseError as error:
        from newfuse.cli._output import print_error

        print_error(str(error))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _broken_pipe()


def _broken_pipe() -> int:
    """The reader of stdout went away (`fuse replay | head`): end as coreutils and `nats` do.

    Python ignores SIGPIPE, so the write raised instead; what is still buffered goes nowhere,
    then the process ends by the signal itself (shell status 141), quietly.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    return 128 + signal.SIGPIPE  # pragma: no cover - the signal ends the process first


def run(coro: Awaitable[int]) -> int:
    """Run a coroutine on uvloop where available."""

    async def wrapper() -> int:
        return await coro

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        import asyncio

        return asyncio.run(wrapper())
    return uvloop.run(wrapper())
