"""`fuse dev`: run an embedded NATS (JetStream) and valkey until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from newfuse.cli._common import (
    DevState,
    dev_state_path,
    read_dev_state,
    settings_from_args,
    write_dev_state,
)
from newfuse.errors import DevAlreadyRunningError
from newfuse.eventstore import open_event_store
from newfuse.nats.embedded import NatsServer, ValkeyServer
from newfuse.projections import ProjectionGroup
from newfuse.projections.builtin import BuiltinProjections
from newfuse.projections.health import add_health_option, operations


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "dev",
        help="run embedded NATS and valkey servers for development",
        description=(
            "Start nats-server (JetStream) and valkey-server on free loopback ports, run the "
            "built-in projections (agent state, audit index), print FUSE_NATS_URL=, "
            "FUSE_REDIS_URL= and FUSE_AUDIT_DB= lines, and run until Ctrl-C or SIGTERM. "
            "Other fuse commands find them when nothing is configured."
        ),
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="keep server data here (default: a temporary directory removed on exit)",
    )
    add_health_option(parser)
    parser.set_defaults(handler=run_dev)


async def run_dev(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    data_dir: Path | None = args.data_dir
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    state_path = dev_state_path(settings)
    running_dev = read_dev_state(settings)
    if running_dev is not None:
        raise DevAlreadyRunningError(
            pid=running_dev.pid, nats_url=running_dev.nats_url, state_file=str(state_path)
        )
    with contextlib.ExitStack() as cleanup:
        root = data_dir or Path(
            cleanup.enter_context(tempfile.TemporaryDirectory(prefix="fuse-dev-"))
        )
        root.mkdir(parents=True, exist_ok=True)
        audit_db = str(root / "read-models.db")
        async with (
            NatsServer(data_dir=root / "nats") as nats,
            ValkeyServer(data_dir=root / "valkey") as valkey,
            await open_event_store(nats.url, prefix=settings.prefix) as store,
            await BuiltinProjections.open(redis_url=valkey.url, audit_db=audit_db) as builtin,
            operations(settings, store, runners := builtin.runners(store), health=args.health),
        ):
            projections = ProjectionGroup(runners)
            running = asyncio.create_task(projections.run(handle_signals=False))
            write_dev_state(
                settings,
                DevState(
                    pid=os.getpid(),
                    nats_url=nats.url,
                    redis_url=valkey.url,
                    audit_db=audit_db,
                    prefix=settings.prefix,
                    data_dir=str(root),
                ),
            )
            try:
                print(f"FUSE_NATS_URL={nats.url}")
                print(f"FUSE_REDIS_URL={valkey.url}")
                print(f"FUSE_AUDIT_DB={audit_db}")
                sys.stdout.flush()
                print(
                    f"fuse dev: nats-server pid {nats.pid}, valkey-server pid {valkey.pid}, "
                    f"projections {', '.join(builtin.names)} running; recorded in {state_path}; "
                    f"Ctrl-C to stop",
                    file=sys.stderr,
                )
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait([stopping, running], return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                print("fuse dev: stopping", file=sys.stderr)
            finally:
                projections.request_stop()
                await running
                recorded = read_dev_state(settings)
                if recorded is not None and recorded.pid == os.getpid():
                    with contextlib.suppress(FileNotFoundError):
                        state_path.unlink()
    return 0
