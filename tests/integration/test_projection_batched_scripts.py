"""Runs of one Lua script in a Redis batch go as one call of its batched form: same effects, in
the same order as one call per event, interleaved with plain commands and other scripts, with
non-ASCII text, floats, and bytes (which fall back to one call each)."""

from __future__ import annotations

from pathlib import Path

from newfuse.eventstore import open_event_store
from newfuse.projections import Projection, RedisBatch, RedisReadModel, rebuild
from newfuse.schemas import NewEvent, RecordedEvent

# Appends "<tag>:<n>:<keys>" to the log list (KEYS[1]) and to every further key it is given.
_LOG = """
local entry = ARGV[1] .. ':' .. ARGV[2] .. ':' .. #KEYS
for i = 1, #KEYS do redis.call('RPUSH', KEYS[i], entry) end
return #KEYS
"""
_OTHER = "redis.call('RPUSH', KEYS[1], 'other:' .. ARGV[1])"


def tag(n: int) -> str | bytes:
    """Mostly "log"; non-ASCII text now and then, and bytes (which go one call each)."""
    if n % 13 == 0:
        return b"log"
    return "l\u00f6g" if n % 5 == 1 else "log"


def value(n: int) -> int | float:
    return n + 0.5 if n % 4 == 2 else n


def logging_projection() -> Projection[RedisBatch]:
    projection: Projection[RedisBatch] = Projection("logged")

    @projection.on("note")
    def _apply(event: RecordedEvent, batch: RedisBatch) -> None:
        n = event.data["n"]
        log = batch.key("log")
        extra = [batch.key("extra", i) for i in range(n % 3)]  # 0..2 more keys per call
        if n % 7 == 3:
            batch.rpush(log, f"plain:{n}")  # a plain command cuts the run of script calls
        if n % 11 == 5:
            batch.eval(_OTHER, [log], [n])  # so does another script
        batch.eval(_LOG, [log, *extra], [tag(n), value(n)])

    return projection


def expected_log(numbers: range) -> list[str]:
    entries = []
    for n in numbers:
        if n % 7 == 3:
            entries.append(f"plain:{n}")
        if n % 11 == 5:
            entries.append(f"other:{n}")
        entries.append(entry(n))
    return entries


def entry(n: int) -> str:
    text = tag(n)
    return f"{text.decode() if isinstance(text, bytes) else text}:{value(n)}:{1 + n % 3}"


async def test_a_batch_of_script_calls_has_the_effects_of_one_call_per_event_in_order(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    store = await open_event_store(f"sqlite://{tmp_path / 'events.db'}")
    model = await RedisReadModel.connect(redis_url, root=f"{prefix}:proj")
    numbers = range(60)
    try:
        result = await store.append(
            "test.a", [NewEvent(type="note", data={"n": n}) for n in numbers]
        )
        # rebuild() applies read_all in chunks of batch_size: all 60 events in one batch.
        rebuilt = await rebuild(logging_projection(), store, model, batch_size=1000)
        assert rebuilt.checkpoint == result.last_position
        generation = await model.active_generation("logged")
        assert generation is not None
        base = model.model_prefix("logged", generation)
        assert await model.client.lrange(base + "log", 0, -1) == expected_log(numbers)  # type: ignore[misc]
        for i in range(2):
            want = [entry(n) for n in numbers if n % 3 > i]
            assert await model.client.lrange(f"{base}extra:{i}", 0, -1) == want  # type: ignore[misc]
    finally:
        await model.close()
        await store.close()


_SHEBANG = "#!lua\nredis.call('RPUSH', KEYS[1], ARGV[1])\n"


async def test_a_script_with_a_shebang_line_is_sent_one_call_at_a_time(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    projection: Projection[RedisBatch] = Projection("shebang")

    @projection.on("note")
    def _apply(event: RecordedEvent, batch: RedisBatch) -> None:
        batch.eval(_SHEBANG, [batch.key("log")], [event.data["n"]])

    store = await open_event_store(f"sqlite://{tmp_path / 'events.db'}")
    model = await RedisReadModel.connect(redis_url, root=f"{prefix}:proj")
    try:
        await store.append("test.a", [NewEvent(type="note", data={"n": n}) for n in range(5)])
        await rebuild(projection, store, model, batch_size=1000)
        generation = await model.active_generation("shebang")
        assert generation is not None
        key = model.model_prefix("shebang", generation) + "log"
        assert await model.client.lrange(key, 0, -1) == ["0", "1", "2", "3", "4"]  # type: ignore[misc]
    finally:
        await model.close()
        await store.close()
