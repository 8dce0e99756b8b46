"""A projection runner in its own process, for the crash tests: `python projection_worker.py
STORE_URL REDIS_URL ROOT BATCH_SIZE`. SIGTERM stops it at a checkpoint (exit 0); SIGKILL is the
crash the tests inflict.

Its projection `counts` appends each applied position to the list `applied` and adds each note's
`n` to the hash `sum` by stream: a fold the tests recompute from the log on their own.
"""

from __future__ import annotations

import asyncio
import sys

from newfuse.eventstore import open_event_store
from newfuse.projections import (
    Projection,
    ProjectionGroup,
    ProjectionRunner,
    RedisBatch,
    RedisReadModel,
)
from newfuse.schemas import RecordedEvent


def counting() -> Projection[RedisBatch]:
    projection: Projection[RedisBatch] = Projection("counts")

    @projection.on("note")
    def _apply(event: RecordedEvent, batch: RedisBatch) -> None:
        batch.rpush(batch.key("applied"), event.position)
        batch.hincrby(batch.key("sum"), event.stream, event.data["n"])

    return projection


async def main(store_url: str, redis_url: str, root: str, batch_size: int) -> None:
    store = await open_event_store(store_url)
    model = await RedisReadModel.connect(redis_url, root=root)
    try:
        runner = ProjectionRunner(counting(), store, model, batch_size=batch_size, linger=0)
        await ProjectionGroup([runner]).run()
    finally:
        await model.close()
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
