"""The messaging attribute names newfuse's spans use are OpenTelemetry's, and the parent of a
consumer's span comes from the message (headers first), never from hostile input or from
whatever span is current."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.semconv._incubating.attributes import messaging_attributes as semconv

from newfuse import telemetry

HEADER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ENVELOPE = "00-11111111111111111111111111111111-2222222222222222-00"


@pytest.mark.parametrize(
    "name",
    [
        "MESSAGING_SYSTEM",
        "MESSAGING_DESTINATION_NAME",
        "MESSAGING_OPERATION_TYPE",
        "MESSAGING_OPERATION_NAME",
        "MESSAGING_MESSAGE_ID",
        "MESSAGING_MESSAGE_CONVERSATION_ID",
        "MESSAGING_CONSUMER_GROUP_NAME",
    ],
)
def test_messaging_attribute_names_are_the_semantic_conventions_ones(name: str) -> None:
    assert getattr(telemetry, name) == getattr(semconv, name)


def test_operation_types_are_semconv_values() -> None:
    values = {value.value for value in semconv.MessagingOperationTypeValues}
    assert {"send", "process"} <= values


def parent(context: object) -> str | None:
    if context is None:
        return None
    span_context = trace.get_current_span(context).get_span_context()  # type: ignore[arg-type]
    if not span_context.is_valid:
        return None
    return f"{span_context.trace_id:032x}-{span_context.span_id:016x}"


@pytest.mark.parametrize(
    ("headers", "traceparent", "expected"),
    [
        ({"traceparent": HEADER}, ENVELOPE, HEADER),
        ({"traceparent": "nonsense"}, ENVELOPE, ENVELOPE),
        ({}, ENVELOPE, ENVELOPE),
        (None, ENVELOPE, ENVELOPE),
        ({"traceparent": ""}, None, None),
        ({"traceparent": HEADER + "x" * 1000}, None, None),
        ({"traceparent": 7}, "also nonsense", None),
        (None, None, None),
    ],
)
def test_remote_parent_prefers_a_valid_header_then_the_envelope_then_none(
    headers: dict[str, object] | None, traceparent: str | None, expected: str | None
) -> None:
    found = telemetry.remote_parent(headers, traceparent)  # type: ignore[arg-type]
    assert parent(found) == (None if expected is None else "-".join(expected.split("-")[1:3]))


def test_remote_parent_is_never_the_current_span() -> None:
    with TracerProvider().get_tracer("test").start_as_current_span("caller"):
        assert telemetry.remote_parent(None) is None
        assert telemetry.remote_parent({"traceparent": "junk"}, "junk") is None


def test_only_a_no_op_or_an_unbacked_proxy_tracer_records_nothing() -> None:
    assert telemetry.records_nothing(trace.NoOpTracer())
    assert telemetry.records_nothing(trace.ProxyTracer("newfuse"))  # no global provider here
    assert not telemetry.records_nothing(TracerProvider().get_tracer("test"))


def test_records_nothing_reads_the_global_provider_as_the_public_getter_does() -> None:
    # it reads the API's private global (the public getter costs an os.environ lookup per
    # message): this fails if OpenTelemetry stops keeping the provider there
    assert telemetry._GLOBAL_READABLE
    unbacked = isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert telemetry.records_nothing(trace.ProxyTracer("newfuse")) == unbacked


def test_trace_context_of_a_span_is_its_w3c_traceparent_with_its_state() -> None:
    context = trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=trace.TraceFlags(1),
        trace_state=trace.TraceState([("vendor", "1")]),
    )
    assert telemetry.trace_context_of(trace.NonRecordingSpan(context)) == (HEADER, "vendor=1")
    assert telemetry.trace_context_of(trace.INVALID_SPAN) is None
