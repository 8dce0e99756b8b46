"""An agent process for the crash test: `python agent_worker.py NATS_URL PREFIX HANDLED_LOG`.

The relay agent forwards each order to the sink and answers it; it sleeps mid-handler, after
emitting its effects (they are buffered, not stored yet), so a SIGKILL usually lands there.
Each handler start is appended to HANDLED_LOG (`n attempt`), so the test counts runs.
"""

from __future__ import annotations

import asyncio
import sys

from newfuse.agents import Agent, Context
from newfuse.nats import MessageStreamSpec, Subjects, connect

relay = Agent("relay", ack_wait=1.0, concurrency=4)


async def main(url: str, prefix: str, handled_log: str) -> None:
    @relay.handler("order")
    async def order(ctx: Context, body: dict[str, int]) -> dict[str, int]:
        with open(handled_log, "a") as log:  # noqa: ASYNC230 - a tiny append, the test's record
            log.write(f"{body['n']} {ctx.attempt}\n")
        ctx.send("sink", "shipped", {"n": body["n"]})
        await asyncio.sleep(0.05)
        return {"n": body["n"]}

    nc = await connect(url, name="agent-worker")
    stream = MessageStreamSpec(subjects=Subjects(prefix), duplicate_window=0.5)
    async with relay.run(nc, key="1", prefix=prefix, stream=stream):
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
