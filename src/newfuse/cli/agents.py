"""`fuse agents run MODULE:AGENT`: one agent instance as a process, until SIGTERM/Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from newfuse.agents import Agent
from newfuse.cli._common import load_attribute, resolve_nats_url, settings_from_args
from newfuse.errors import ConfigError
from newfuse.nats import connect


def register_agent_actions(actions: Any) -> None:
    run = actions.add_parser(
        "run",
        help="run one instance of an agent until SIGTERM/Ctrl-C",
        description="Import MODULE, take its AGENT (an newfuse.agents.Agent) and run one "
        "instance on the NATS server; messages in flight at SIGTERM are redelivered.",
    )
    run.add_argument("agent", metavar="MODULE:AGENT", help="e.g. myapp.agents:geo")
    run.add_argument("--key", help="the instance's key (AgentId key; default: a random one)")
    run.add_argument("--no-fast-path", action="store_true", help="do not answer core NATS requests")
    run.set_defaults(handler=run_agent)


def load_agent(spec: str) -> Agent:
    """The Agent named by `module:attribute`.

    Raises:
        ConfigError: it cannot be found, or is not an Agent.
    """
    found = load_attribute(spec, option="MODULE:AGENT", example="myapp.agents:geo")
    if not isinstance(found, Agent):
        raise ConfigError(
            variable="MODULE:AGENT",
            value=spec,
            reason=f"it is a {type(found).__name__}, not a newfuse.agents.Agent",
        )
    return found


async def run_agent(args: argparse.Namespace) -> int:
    agent = load_agent(args.agent)
    settings = settings_from_args(args)
    nc = await connect(resolve_nats_url(settings), name=f"fuse-agent-{agent.type}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        running = agent.run(
            nc, key=args.key, prefix=settings.prefix, fast_path=not args.no_fast_path
        )
        async with running:
            print(
                f"fuse agents: {running.agent_id} handles "
                f"{', '.join(sorted(agent.routes)) or 'nothing'}; SIGTERM to stop",
                file=sys.stderr,
                flush=True,
            )
            await stop.wait()
        print(
            f"fuse agents: {running.agent_id} stopped after {running.handled} messages "
            f"({running.dead_lettered} dead letters)",
            file=sys.stderr,
        )
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await nc.close()
    return 0
