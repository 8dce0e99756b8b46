"""The smallest agent there is: one handler, one request through the log, one reply.

Run with `.venv/bin/python examples/hello_agent.py`: it starts a nats-server from the installed
wheel on a free loopback port, runs the agent, asks it once, and stops the server. Both the
request and the reply are stored on the message stream; `fuse demo` shows the rest.
"""

from __future__ import annotations

import asyncio

import msgspec

from newfuse.agents import Agent, AgentClient, Context
from newfuse.nats import NatsServer, connect


class Greet(msgspec.Struct):
    name: str


greeter = Agent("greeter", description="says hello")


@greeter.handler("greet")
async def greet(ctx: Context, request: Greet) -> dict[str, str]:
    return {"text": f"hello, {request.name} (from {ctx.agent_id})"}


async def main() -> None:
    async with NatsServer() as server:
        nc = await connect(server.url)
        try:
            async with greeter.run(nc, key="1"), AgentClient(nc, sender="me") as client:
                reply = await client.request("greeter", "greet", Greet(name="Ada"))
                print(reply.payload["text"])
        finally:
            await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
