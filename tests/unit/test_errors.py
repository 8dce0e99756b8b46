"""The FuseError hierarchy: facts as keyword attributes, messages that name the thing, retryable."""

from __future__ import annotations

import ast
import inspect

import pytest

from newfuse import errors
from newfuse.errors import (
    BatchTooLargeError,
    ClosedDuringAppendError,
    ConfigError,
    ConnectionLostError,
    FuseError,
    InvalidEnvelopeError,
    InvalidEventError,
    InvalidNameError,
    InvalidPayloadError,
    MissingUpcasterError,
    NoDevServerError,
    SchemaError,
    SchemaRegistrationError,
    ServerStartError,
    StoreClosedError,
    StoreUnavailableError,
    UnknownTypeError,
    UnknownVersionError,
    UnsupportedStoreError,
    WrongExpectedVersionError,
)

ALL_ERRORS = sorted(
    (
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type)
        and issubclass(cls, FuseError)
        and cls.__module__ == errors.__name__
    ),
    key=lambda cls: cls.__name__,
)


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda cls: cls.__name__)
def test_every_error_follows_the_house_rules(cls: type[FuseError]) -> None:
    assert cls.__name__.endswith("Error")
    assert cls.__doc__ and cls.__doc__.strip(), "a docstring says when it is raised"
    assert isinstance(cls.retryable, bool)
    if "__init__" in vars(cls):
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters), (
            f"{cls.__name__} takes its facts as keyword arguments"
        )


def test_config_error_names_variable_and_value_and_is_a_value_error() -> None:
    error = ConfigError(variable="FUSE_PREFIX", value="a.b", reason="no dots")
    assert str(error) == "FUSE_PREFIX='a.b': no dots"
    assert isinstance(error, ValueError)
    assert (error.variable, error.value, error.reason) == ("FUSE_PREFIX", "a.b", "no dots")


def test_server_start_error_quotes_the_log_tail_indented() -> None:
    error = ServerStartError(server="nats-server", reason="exited 1", log_tail="one\ntwo")
    assert str(error) == (
        "nats-server did not start: exited 1\nlast lines of its log:\n    one\n    two"
    )
    assert str(ServerStartError(server="valkey", reason="timeout")) == (
        "valkey did not start: timeout"
    )


def test_no_dev_server_error_says_what_to_do() -> None:
    message = str(NoDevServerError(what="NATS server", state_file="/s/dev.json"))
    assert "no NATS server configured" in message
    assert "/s/dev.json" in message
    assert "fuse dev" in message and "FUSE_NATS_URL" in message


def test_only_transient_failures_are_retryable() -> None:
    assert ConnectionLostError.retryable
    assert StoreUnavailableError.retryable
    assert not FuseError.retryable
    assert not WrongExpectedVersionError.retryable
    assert not InvalidPayloadError.retryable
    assert not MissingUpcasterError.retryable


def test_wrong_expected_version_names_stream_expected_and_actual() -> None:
    assert str(WrongExpectedVersionError(stream="agent.r1", expected=7, actual=9)) == (
        "append to 'agent.r1': expected version 7, stream is at version 9; read the stream and "
        "retry with its current version"
    )
    assert "expected stream-exists, stream is empty (no stream)" in str(
        WrongExpectedVersionError(stream="agent.r1", expected="stream-exists", actual=0)
    )


def test_schema_errors_name_type_version_and_field_path() -> None:
    error = InvalidPayloadError(
        type_name="a2a.message", version=1, path="$.metadata.sender", reason="missing"
    )
    assert str(error) == "invalid payload for 'a2a.message' v1 at $.metadata.sender: missing"
    assert isinstance(error, SchemaError) and isinstance(error, ValueError)
    assert str(UnknownVersionError(type_name="t", version=3, known=[1, 2])).startswith(
        "event type 't' has no schema version 3 (known versions: 1, 2)"
    )
    assert "(known versions: none)" in str(UnknownVersionError(type_name="t", version=1, known=[]))
    assert "(strict category)" in str(UnknownTypeError(type_name="t", context="strict category"))
    assert isinstance(UnknownTypeError(type_name="t"), LookupError)
    assert str(InvalidEnvelopeError(where="seq 9", path="$.id", reason="missing")) == (
        "invalid envelope seq 9 at $.id: missing"
    )


def test_missing_upcaster_is_an_unknown_version_with_the_gap_and_the_fix() -> None:
    error = MissingUpcasterError(
        type_name="order.placed", version=1, known=[1, 2, 3], missing_from=2, newest=3
    )
    assert isinstance(error, UnknownVersionError)
    assert (error.type_name, error.version, error.known) == ("order.placed", 1, [1, 2, 3])
    assert str(error) == (
        "event type 'order.placed' v1 cannot be upcast to v3: no upcaster from v2 to v3 (known "
        "versions: 1, 2, 3); register one with @registry.upcaster('order.placed', 2)"
    )


def test_schema_registration_error_names_type_version_and_reason() -> None:
    error = SchemaRegistrationError(type_name="t", version=0, reason="versions start at 1")
    assert str(error) == "cannot register 't' v0: versions start at 1"
    assert isinstance(error, SchemaError) and isinstance(error, ValueError)


def test_name_and_store_errors_say_what_is_wrong_and_what_works() -> None:
    assert str(InvalidNameError(kind="stream id", name="a.b", reason="it contains a dot")) == (
        "invalid stream id 'a.b': it contains a dot"
    )
    assert "split the append" in str(BatchTooLargeError(stream="s.1", size=1001, limit=1000))
    message = str(UnsupportedStoreError(url="postgres://x"))
    assert "'postgres://x'" in message and "sqlite:///" in message


def test_closing_errors_keep_the_store_and_say_what_may_have_happened() -> None:
    closed = StoreClosedError(store="SQLiteEventStore('/tmp/e.db')")
    assert closed.store == "SQLiteEventStore('/tmp/e.db')"
    assert str(closed) == "SQLiteEventStore('/tmp/e.db') is closed"
    during = ClosedDuringAppendError(store="JetStreamEventStore", subject="fuse.ev.agent.a")
    assert isinstance(during, StoreClosedError)
    assert (during.store, during.subject) == ("JetStreamEventStore", "fuse.ev.agent.a")
    assert str(during).startswith(
        "JetStreamEventStore was closed while an append to 'fuse.ev.agent.a' waited"
    )


def test_an_event_without_a_type_names_the_stream_the_event_and_the_fix() -> None:
    error = InvalidEventError(stream="agent.a", event_id="e1", reason="has no type; give one")
    assert isinstance(error, SchemaError) and isinstance(error, ValueError)
    assert str(error) == "append to agent.a: event e1 has no type; give one"


def test_no_error_skips_its_parents_init() -> None:
    """A subclass that needs another text overrides `message()`; it never calls a grandparent's
    `__init__` (which would skip the attributes its parent sets)."""
    tree = ast.parse(inspect.getsource(errors))
    bypasses = [
        f"line {node.lineno}: {ast.unparse(node.func)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "__init__"
        and not (
            isinstance(node.func.value, ast.Call) and ast.unparse(node.func.value) == "super()"
        )
    ]
    assert bypasses == []
