"""`fuse dev`: run an embedded NATS (JetStream) and valkey until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

from newfuse.cli._common import DevState, dev_state_path, settings_from_args, write_dev_state
from newfuse.nats.embedded import NatsServer, ValkeyServer


def register(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "dev",
        help="run embedded NATS and valkey servers for development",
        description=(
            "Start nats-server (JetStream) and valkey-server on free loopback ports, print their "
            "URLs as FUSE_NATS_URL=/FUSE_REDIS_URL= lines, and run until Ctrl-C or SIGTERM. "
            "Other fuse commands find them when no URL is configured."
        ),
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="keep server data here (default: a temporary directory removed on exit)",
    )
    parser.set_defaults(handler=run_dev)


async def run_dev(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    data_dir: Path | None = args.data_dir
    nats_dir = data_dir / "nats" if data_dir else None
    valkey_dir = data_dir / "valkey" if data_dir else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    state_path = dev_state_path(settings)
    async with NatsServer(data_dir=nats_dir) as nats, ValkeyServer(data_dir=valkey_dir) as valkey:
        write_dev_state(
            settings,
            DevState(
                pid=os.getpid(),
                nats_url=nats.url,
                redis_url=valkey.url,
                data_dir=str(data_dir) if data_dir else "",
            ),
        )
        try:
            print(f"FUSE_NATS_URL={nats.url}")
            print(f"FUSE_REDIS_URL={valkey.url}")
            sys.stdout.flush()
            print(
                f"fuse dev: nats-server pid {nats.pid}, valkey-server pid {valkey.pid}; "
                f"recorded in {state_path}; Ctrl-C to stop",
                file=sys.stderr,
            )
            await stop.wait()
            print("fuse dev: stopping", file=sys.stderr)
        finally:
            with contextlib.suppress(FileNotFoundError):
                state_path.unlink()
    return 0
