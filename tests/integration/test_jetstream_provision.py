"""Provisioning the events' JetStream stream: derived names, idempotence, no silent changes."""

from __future__ import annotations

import msgspec
import nats
import pytest
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from newfuse.errors import (
    ConnectionLostError,
    InvalidNameError,
    StreamConfigError,
    StreamCreateError,
    StreamCreateUnavailableError,
)
from newfuse.eventstore.jetstream import JetStreamEventStore
from newfuse.nats import EventStreamSpec, Subjects, connect, ensure_event_stream
from newfuse.nats.embedded import free_port
from newfuse.nats.jserrors import ApiError, stream_create_error
from newfuse.nats.provision import server_supports_atomic


def test_subjects_and_stream_name_derive_from_the_prefix() -> None:
    subjects = Subjects("t-1")
    assert subjects.stream_name == "T_1_EVENTS"
    assert subjects.events("agent.r1") == "t-1.ev.agent.r1"
    assert subjects.category("agent") == "t-1.ev.agent.*"
    assert subjects.all_events == "t-1.ev.>"
    assert subjects.a2a("r1") == "t-1.a2a.r1"
    assert subjects.task("build", 5) == "t-1.task.build.5"
    assert subjects.stream_of("t-1.ev.agent.r1") == "agent.r1"
    with pytest.raises(InvalidNameError, match="does not start with"):
        subjects.stream_of("other.ev.agent.r1")
    with pytest.raises(InvalidNameError, match="a dot"):
        subjects.stream_of("t-1.ev.agent.r1.extra")
    with pytest.raises(InvalidNameError, match="'\\*'"):
        subjects.category("ag*")
    with pytest.raises(InvalidNameError, match="subject prefix"):
        Subjects("a.b")


def test_atomic_batches_need_nats_server_2_12() -> None:
    assert server_supports_atomic("2.15.1")
    assert server_supports_atomic("2.12.0-beta.1")
    assert not server_supports_atomic("2.11.9")
    assert not server_supports_atomic("")


async def test_the_stream_is_created_with_the_configured_limits_then_left_alone(
    nats_url: str, prefix: str
) -> None:
    nc = await connect(nats_url, name="provision-test")
    try:
        spec = EventStreamSpec(
            subjects=Subjects(prefix), max_age=3600.0, max_bytes=50_000_000, duplicate_window=30.0
        )
        first = await ensure_event_stream(nc, spec)
        again = await ensure_event_stream(nc, spec)  # idempotent
        assert first == again and first.atomic and first.name == f"{prefix.upper()}_EVENTS"
        info = await nc.jetstream().stream_info(first.name)
        config = info.config
        assert config.subjects == [f"{prefix}.ev.>"]
        assert config.storage == StorageType.FILE
        assert config.max_age == 3600.0 and config.max_bytes == 50_000_000
        assert config.duplicate_window == 30.0 and config.num_replicas == 1
        assert config.allow_atomic and config.allow_direct
        assert config.max_msgs_per_subject == -1
        other = msgspec.structs.replace(spec, duplicate_window=5.0)
        with pytest.raises(
            StreamConfigError, match=r"duplicate_window \(seconds\)=30\.0, newfuse needs 5\.0"
        ):
            await ensure_event_stream(nc, other)
        assert (await nc.jetstream().stream_info(first.name)).config.duplicate_window == 30.0
    finally:
        await nc.close()


async def test_an_incompatible_existing_stream_is_named_and_never_changed(
    nats_url: str, prefix: str
) -> None:
    nc = await nats.connect(nats_url)
    name = f"{prefix.upper()}_EVENTS"
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=[f"{prefix}.ev.>"],
                storage=StorageType.FILE,
                duplicate_window=120.0,
                max_msgs_per_subject=1,  # would silently drop all but the last event of a stream
                allow_direct=True,
                allow_atomic=True,
            )
        )
        with pytest.raises(StreamConfigError, match=r"max_msgs_per_subject=1.*needs -1") as caught:
            await JetStreamEventStore.connect(nats_url, prefix=prefix)
        assert (caught.value.stream, caught.value.field) == (name, "max_msgs_per_subject")
        assert (caught.value.wanted, caught.value.actual) == (-1, 1)
        assert (await js.stream_info(name)).config.max_msgs_per_subject == 1  # untouched
    finally:
        await nc.close()


async def test_a_stream_without_atomic_batches_is_refused_not_edited(
    nats_url: str, prefix: str
) -> None:
    nc = await nats.connect(nats_url)
    name = f"{prefix.upper()}_EVENTS"
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=[f"{prefix}.ev.>"],
                storage=StorageType.FILE,
                duplicate_window=120.0,
                allow_direct=True,
            )
        )
        with pytest.raises(StreamConfigError, match=r"allow_atomic=False, newfuse needs True"):
            await JetStreamEventStore.connect(nats_url, prefix=prefix)
        assert not (await js.stream_info(name)).config.allow_atomic
    finally:
        await nc.close()


async def test_no_server_gives_connection_lost_within_the_timeout() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionLostError, match=r"nats-server at nats://127\.0\.0\.1:\d+ is"):
        await connect(url, timeout=0.5)


@pytest.mark.parametrize(
    ("options", "err_code", "says"),
    [
        ({"replicas": 3}, 10074, r"replicas > 1 not supported .*use replicas=1"),
        ({"max_bytes": 10**18}, 10047, r"insufficient storage .*lower max_bytes"),
    ],
)
async def test_a_refused_create_says_why_and_what_to_do_not_that_the_stream_differs(
    nats_url: str, prefix: str, options: dict[str, int], err_code: int, says: str
) -> None:
    name = f"{prefix.upper()}_EVENTS"
    with pytest.raises(StreamCreateError, match=rf"could not create stream '{name}': {says}") as e:
        await JetStreamEventStore.connect(nats_url, prefix=prefix, **options)
    assert not isinstance(e.value, StreamConfigError)
    assert (e.value.stream, e.value.err_code) == (name, err_code)
    assert not e.value.retryable  # retrying the same create cannot help
    nc = await nats.connect(nats_url)
    try:
        with pytest.raises(NotFoundError):
            await nc.jetstream().stream_info(name)  # nothing was created
    finally:
        await nc.close()


def test_a_create_refused_for_a_passing_reason_is_retryable() -> None:
    busy = stream_create_error(
        "FUSE_EVENTS",
        ApiError(code=503, err_code=10008, description="JetStream system temporarily unavailable"),
    )
    assert isinstance(busy, StreamCreateUnavailableError) and busy.retryable
    assert "retry shortly" in str(busy)
    other = stream_create_error("FUSE_EVENTS", ApiError(code=400, err_code=10999, description="x"))
    assert type(other) is StreamCreateError and not other.retryable
