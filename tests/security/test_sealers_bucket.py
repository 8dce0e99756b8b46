"""The key service's record of who sealed which event (`<prefix>_sealers`) lives as long as the
messages it is about: its max age is the message stream's, set when `provision` makes it and
set again when `provision` finds the message stream's changed."""

from __future__ import annotations

from newfuse.agents.secure import provision
from newfuse.nats import MessageStreamSpec, Subjects, connect, ensure_event_stream
from newfuse.security.key_service import open_sealers, sealers_bucket
from support import new_prefix


async def test_the_sealers_bucket_keeps_its_entries_as_long_as_the_message_stream(
    nats_url: str,
) -> None:
    prefix = new_prefix()
    subjects = Subjects(prefix)
    nc = await connect(nats_url)
    js = nc.jetstream()

    async def max_age() -> float:
        info = await js.stream_info(f"KV_{sealers_bucket(prefix)}")
        return float(info.config.max_age or 0.0)

    try:
        await open_sealers(nc, prefix)  # before there is a message stream: forever
        assert await max_age() == 0.0
        await ensure_event_stream(nc, MessageStreamSpec(subjects=subjects, max_age=3600.0))
        await open_sealers(nc, prefix)  # opened as it is: only provision (align=True) changes it
        assert await max_age() == 0.0
        await provision(nc, [], prefix)
        assert await max_age() == 3600.0
        await js.delete_key_value(sealers_bucket(prefix))
        await provision(nc, [], prefix)  # made anew: with the message stream's
        assert await max_age() == 3600.0
        records = await open_sealers(nc, prefix)
        await records.create("e-1", b"planner")  # still a working bucket after the update
        assert (await records.get("e-1")).value == b"planner"
    finally:
        await nc.close()
