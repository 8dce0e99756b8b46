"""Model providers against a real OpenAI-compatible HTTP server on loopback, and the local one:
answers, streaming, tools, revisions, the error mapping, and GenAI spans."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from newfuse.agents.models import (
    CallLog,
    ChatChunk,
    ChatMessage,
    ChatResult,
    LocalModelProvider,
    OpenAICompatibleProvider,
    RecordedModel,
    Tool,
    ToolCall,
    collect,
    input_hash,
    params_hash,
    retry_after,
)
from newfuse.errors import (
    ModelRateLimitedError,
    ModelRequestError,
    ModelResponseError,
    ModelUnavailableError,
)
from openai_server import DIGEST, FINGERPRINT, Failure, OpenAIServer, response_model

HELLO = [
    ChatMessage(role="system", content="You answer briefly."),
    ChatMessage(role="user", content="where is Lima"),
]
LOOKUP = Tool(
    name="lookup",
    description="find a city",
    parameters={"type": "object", "properties": {"q": {"type": "string"}}},
)


@pytest.fixture
async def server() -> AsyncIterator[OpenAIServer]:
    async with OpenAIServer() as running:
        yield running


@pytest.fixture
async def provider(server: OpenAIServer) -> AsyncIterator[OpenAICompatibleProvider]:
    async with OpenAICompatibleProvider(server.url, api_key="sk-test", timeout=5.0) as p:
        yield p


async def test_chat_returns_the_answer_the_model_it_names_its_fingerprint_and_usage(
    server: OpenAIServer, provider: OpenAICompatibleProvider
) -> None:
    result = await provider.chat(HELLO, model="gpt-x", params={"temperature": 0.2, "seed": 7})
    assert result == ChatResult(
        content="gpt-x says: where is Lima",
        finish_reason="stop",
        model=response_model("gpt-x"),
        revision=FINGERPRINT,
        input_tokens=6,
        output_tokens=5,
    )
    sent = server.requests[-1]
    assert sent["model"] == "gpt-x"
    assert sent["temperature"] == 0.2 and sent["seed"] == 7
    assert sent["messages"][1] == {"role": "user", "content": "where is Lima"}
    assert "stream" not in sent


async def test_a_stream_yields_the_text_in_pieces_and_ends_with_the_whole_result(
    server: OpenAIServer, provider: OpenAICompatibleProvider
) -> None:
    items = [item async for item in provider.stream(HELLO, model="gpt-x")]
    chunks = [item for item in items if isinstance(item, ChatChunk)]
    assert len(chunks) == 5
    assert "".join(chunk.content for chunk in chunks) == "gpt-x says: where is Lima"
    last = items[-1]
    assert isinstance(last, ChatResult)
    assert last.content == "gpt-x says: where is Lima"
    assert (last.model, last.revision) == (response_model("gpt-x"), FINGERPRINT)
    assert (last.input_tokens, last.output_tokens, last.finish_reason) == (6, 5, "stop")
    sent = server.requests[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "stream"])
async def test_tools_are_sent_as_functions_and_tool_calls_come_back_whole(
    server: OpenAIServer, provider: OpenAICompatibleProvider, streamed: bool
) -> None:
    messages = [ChatMessage(role="user", content="call: Lima")]
    if streamed:
        result = await collect(provider.stream(messages, model="m", tools=[LOOKUP]))
    else:
        result = await provider.chat(messages, model="m", tools=[LOOKUP])
    assert result.tool_calls == [ToolCall(id="call_1", name="lookup", arguments='{"q": "Lima"}')]
    assert result.content is None and result.finish_reason == "tool_calls"
    assert server.requests[-1]["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                "description": "find a city",
            },
        }
    ]


async def test_a_tool_result_goes_back_in_the_openai_shape(
    server: OpenAIServer, provider: OpenAICompatibleProvider
) -> None:
    call = ToolCall(id="call_1", name="lookup", arguments='{"q": "Lima"}')
    await provider.chat(
        [
            ChatMessage(role="user", content="call: Lima"),
            ChatMessage(role="assistant", tool_calls=[call]),
            ChatMessage(role="tool", tool_call_id="call_1", content="Peru"),
        ],
        model="m",
    )
    assert server.requests[-1]["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"q": "Lima"}'},
                }
            ],
        },
        {"role": "tool", "content": "Peru", "tool_call_id": "call_1"},
    ]


async def test_ollamas_constant_fingerprint_is_no_revision_and_its_digest_is_looked_up(
    server: OpenAIServer,
) -> None:
    server.fingerprint = "fp_ollama"
    async with OpenAICompatibleProvider(server.url, name="ollama") as plain:
        assert (await plain.chat(HELLO, model="llama3")).revision is None
    async with OpenAICompatibleProvider(server.url, name="ollama", ollama_digests=True) as ollama:
        assert (await ollama.chat(HELLO, model="llama3")).revision == DIGEST
        assert (await collect(ollama.stream(HELLO, model="llama3"))).revision == DIGEST
        assert (await ollama.chat(HELLO, model="mistral")).revision is None


@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "stream"])
async def test_429_is_retryable_with_the_wait_retry_after_asks_for(
    server: OpenAIServer, provider: OpenAICompatibleProvider, streamed: bool
) -> None:
    server.fail(Failure(status=429, retry_after="7", body=b'{"error": {"message": "slow down"}}'))
    with pytest.raises(ModelRateLimitedError, match=r"HTTP 429.*slow down.*wait 7s") as caught:
        if streamed:
            await collect(provider.stream(HELLO, model="m"))
        else:
            await provider.chat(HELLO, model="m")
    assert caught.value.retryable and caught.value.retry_after == 7.0
    assert caught.value.status == 429


@pytest.mark.parametrize("status", [500, 502, 503, 408])
async def test_server_failures_are_retryable(
    server: OpenAIServer, provider: OpenAICompatibleProvider, status: int
) -> None:
    server.fail(Failure(status=status))
    with pytest.raises(ModelUnavailableError, match=f"HTTP {status}.*failed on purpose") as caught:
        await provider.chat(HELLO, model="m")
    assert caught.value.retryable and caught.value.retry_after is None


@pytest.mark.parametrize(
    ("status", "body", "hint"),
    [
        (400, b'{"error": {"message": "unknown parameter: tempreature"}}', "parameters"),
        (401, b'{"error": {"message": "bad key"}}', "API key"),
        (404, b'{"error": "model \\"nope\\" not found"}', "base URL"),  # Ollama's shape
        (422, b"plain text refusal", "parameters"),
    ],
)
async def test_refusals_of_the_request_are_not_retryable_and_quote_the_server(
    server: OpenAIServer,
    provider: OpenAICompatibleProvider,
    status: int,
    body: bytes,
    hint: str,
) -> None:
    server.fail(Failure(status=status, body=body))
    with pytest.raises(ModelRequestError, match=f"HTTP {status}") as caught:
        await provider.chat(HELLO, model="m")
    assert not caught.value.retryable
    detail = json.loads(body)["error"] if body.startswith(b"{") else body.decode()
    expected = detail["message"] if isinstance(detail, dict) else detail
    assert caught.value.detail == expected
    assert hint in str(caught.value)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>gateway</html>", "JSON"),
        (b"[" * 200 + b"]" * 200, "nest"),
        (b'{"choices": "many"}', "Expected `array"),
        (b'{"choices": []}', "no choices"),
    ],
    ids=["not-json", "deep", "wrong-type", "no-choices"],
)
async def test_a_hostile_answer_is_a_response_error_naming_what_is_wrong(
    server: OpenAIServer, provider: OpenAICompatibleProvider, body: bytes, reason: str
) -> None:
    server.fail(Failure(status=200, body=body))
    with pytest.raises(ModelResponseError, match=reason) as caught:
        await provider.chat(HELLO, model="m")
    assert not caught.value.retryable


async def test_an_answer_over_the_size_bound_is_refused(server: OpenAIServer) -> None:
    async with OpenAICompatibleProvider(server.url, max_response_bytes=100) as small:
        with pytest.raises(ModelResponseError, match="larger than 100 bytes"):
            await small.chat(HELLO, model="m")
        with pytest.raises(ModelResponseError, match="longer than 100 bytes"):
            await collect(small.stream(HELLO, model="m"))


async def test_a_dropped_connection_and_a_closed_port_are_retryable(
    server: OpenAIServer, provider: OpenAICompatibleProvider
) -> None:
    server.fail(Failure(close=True))
    with pytest.raises(ModelUnavailableError, match="cannot reach it") as caught:
        await provider.chat(HELLO, model="m")
    assert caught.value.retryable
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    async with OpenAICompatibleProvider(f"http://127.0.0.1:{port}/v1") as nowhere:
        with pytest.raises(ModelUnavailableError, match=f"127.0.0.1:{port}.*cannot reach"):
            await nowhere.chat(HELLO, model="m")


def test_retry_after_reads_seconds_and_http_dates_and_bounds_them() -> None:
    assert retry_after("3") == 3.0
    assert retry_after(" 1.5 ") == 1.5
    assert retry_after("-4") == 0.0
    assert retry_after("999999999") == 86400.0
    assert retry_after(None) is None
    assert retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    wait = retry_after(later)
    assert wait is not None and 100 < wait <= 120


def test_hashes_are_canonical_and_tell_different_calls_apart() -> None:
    assert params_hash("m", {"a": 1, "b": 2}, None) == params_hash("m", {"b": 2, "a": 1}, [])
    assert params_hash("m", {"a": 1}, None) != params_hash("m2", {"a": 1}, None)
    assert params_hash("m", None, [LOOKUP]) != params_hash("m", None, None)
    assert input_hash(HELLO).startswith("sha256:") and len(input_hash(HELLO)) == 71
    assert input_hash(HELLO) != input_hash(HELLO[:1])


async def test_the_local_model_is_deterministic_and_a_custom_one_plugs_in() -> None:
    local = LocalModelProvider()
    first = await local.chat(HELLO, model="tiny")
    assert first == await local.chat(HELLO, model="tiny")
    assert first.content == "tiny: where is Lima"
    assert (first.model, first.input_tokens, first.output_tokens) == ("tiny", 6, 4)
    assert first.revision is not None and first.revision.startswith("local-")
    assert (await local.chat(HELLO, model="other")).content != first.content
    streamed = [item async for item in local.stream(HELLO, model="tiny")]
    assert "".join(i.content for i in streamed if isinstance(i, ChatChunk)) == first.content
    assert streamed[-1] == first

    async def shout(
        messages: Sequence[ChatMessage], model: str, tools: Sequence[Tool], params: dict[str, Any]
    ) -> ChatResult:
        return ChatResult(content=(messages[-1].content or "").upper(), output_tokens=1)

    custom = LocalModelProvider(shout, name="shouter", revision="v3")
    loud = await custom.chat(HELLO, model="big")
    assert (loud.content, loud.revision, loud.output_tokens) == ("WHERE IS LIMA", "v3", 1)
    assert custom.name == "shouter"


async def test_each_call_is_a_span_with_the_genai_attributes_and_errors_say_so(
    server: OpenAIServer, provider: OpenAICompatibleProvider
) -> None:
    exporter = InMemorySpanExporter()
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(exporter))
    log = CallLog(agent="geo/1")
    model = RecordedModel(provider, log, tracer=tracing.get_tracer("test"))
    await model.chat(HELLO, model="gpt-x")
    await collect(model.stream(HELLO, model="gpt-x"))
    server.fail(Failure(status=503))
    with pytest.raises(ModelUnavailableError):
        await model.chat(HELLO, model="gpt-x")
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == ["chat gpt-x"] * 3
    for span in spans[:2]:
        assert dict(span.attributes or {}) == {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-x",
            "gen_ai.response.model": response_model("gpt-x"),
            "gen_ai.usage.input_tokens": 6,
            "gen_ai.usage.output_tokens": 5,
            "gen_ai.response.finish_reasons": ("stop",),
        }
    failed = spans[2]
    assert (failed.attributes or {})["error.type"] == "ModelUnavailableError"
    assert not failed.status.is_ok
    assert [(r.call, r.outcome, r.streamed) for r in log.records] == [
        (0, "ok", False),
        (1, "ok", True),
        (2, "error", False),
    ]
    assert log.records[2].error is not None and "HTTP 503" in log.records[2].error
    assert log.records[0].content == log.records[1].content == "gpt-x says: where is Lima"
    assert log.records[0].revision == FINGERPRINT
