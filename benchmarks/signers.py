"""What checking signers costs a JetStream reader: `read_all` and `read` of signed events with
the store's Trust, next to the same store reading them with `signers=False`.

The events are signed as a secured bus signs them (a certificate issued by an admin key, an
Ed25519 signature per message), on a plain nats-server: signing and checking are the client's
work, the server only stores the headers. Both sides read the same log on one connection, in
alternating rounds, best round kept.

Usage: `python benchmarks/signers.py [--quick]` (see benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import nats
from _events import ours_read_all, populate
from _harness import Sizes, emit, parser, progress, run_benchmark, run_id, sizes_of, timed, workdir

from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import NatsServer
from newfuse.nats.signing import Signer, Trust, issue, sign_on, trust_on
from newfuse.schemas import Certified
from newfuse.security.identities import new_seed, public_key_of

STREAM_SIZE = 1_000
"""Events per stream (what `read` of one stream reads)."""


async def ours_read_streams(store: JetStreamEventStore, streams: list[str]) -> int:
    count = 0
    for stream in streams:
        async for event in store.read(stream):
            if event.signer is None and store.verifies_signers:
                raise AssertionError(f"event {event.id} read without its signer")
            count += 1
    return count


async def main(sizes: Sizes) -> None:
    admin_seed = new_seed()
    admin = public_key_of(admin_seed)
    writer_seed = new_seed()
    holder = Certified(name="writer", role="service", key=public_key_of(writer_seed))
    certificate = issue(admin_seed.decode(), holder)
    n = min(sizes.read_events, 50_000)  # one signature check each: the full log takes long
    async with workdir("signers") as path, NatsServer(data_dir=path / "nats") as server:
        writer_nc, reader_nc = await nats.connect(server.url), await nats.connect(server.url)
        sign_on(writer_nc, Signer(writer_seed.decode(), certificate))
        trust_on(reader_nc, Trust((admin,)))
        prefix = f"bs{run_id()}"
        writer = JetStreamEventStore(writer_nc, prefix=prefix)
        checked = JetStreamEventStore(reader_nc, prefix=prefix)
        unchecked = JetStreamEventStore(reader_nc, prefix=prefix, signers=False)
        try:
            progress(f"signers: appending {n:,} signed events")
            streams = await populate(writer, n, STREAM_SIZE, "signed")
            some = streams[: max(1, len(streams) // 5)]
            read_n = len(some) * STREAM_SIZE
            phases: dict[str, dict[str, Callable[[], Awaitable[int]]]] = {
                "read_all": {
                    "checked": lambda: ours_read_all(checked, n),
                    "unchecked": lambda: ours_read_all(unchecked, n),
                },
                "read": {
                    "checked": lambda: ours_read_streams(checked, some),
                    "unchecked": lambda: ours_read_streams(unchecked, some),
                },
            }
            for phase, sides in phases.items():
                best = dict.fromkeys(sides, 0.0)
                for side in sides.values():
                    await side()  # warm-up
                for round_no in range(sizes.rounds):
                    for key, side in sides.items():
                        count, seconds = await timed(side)
                        best[key] = max(best[key], count / seconds)
                        progress(f"  {phase} round {round_no + 1} {key}: {count / seconds:,.0f}/s")
                emit(
                    f"jetstream.{phase}.signers_checked",
                    best["checked"],
                    best["unchecked"],
                    f"events/s ({phase} of signed events, each signature checked against a "
                    "Trust; baseline: the same store with signers=False)",
                    n=n if phase == "read_all" else read_n,
                    lower_is_better=False,
                )
        finally:
            for store in (writer, checked, unchecked):
                await store.close()
            await writer_nc.close()
            await reader_nc.close()
    progress("done")


if __name__ == "__main__":
    run_benchmark(main(sizes_of(parser(__doc__).parse_args())))
