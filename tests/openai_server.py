"""An OpenAI-compatible chat-completions server on loopback, for tests and the benchmark.

A real HTTP/1.1 server (asyncio streams, keep-alive, chunked Server-Sent Events), not a mock
object: `POST /v1/chat/completions` answers `<model> says: <last user message>` (JSON, or SSE
with `stream: true`, usage in a last chunk when `stream_options.include_usage`), calls the
first tool when the last user message starts with `call:`, and `GET /api/tags` lists one model
with a digest, as Ollama does. `fail(...)` queues failures for the next requests (a status
with a Retry-After, a body that is no JSON, one nested too deep, a connection closed early).
`requests` keeps each request body received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

FINGERPRINT = "fp_loopback_7"
DIGEST = "sha256:4f1c0de0"


@dataclass
class Failure:
    """What the next request gets instead of an answer."""

    status: int = 500
    retry_after: str | None = None
    body: bytes = b'{"error": {"message": "the loopback server failed on purpose"}}'
    close: bool = False  # drop the connection without answering


def response_model(model: str) -> str:
    """The model the server says answered (a dated name, as OpenAI's aliases resolve)."""
    return f"{model}-2026-01-01"


def answer_text(model: str, messages: list[dict[str, Any]]) -> str:
    last = next((m.get("content") or "" for m in reversed(messages) if m["role"] == "user"), "")
    return f"{model} says: {last}"


class OpenAIServer:
    """The server (an async context manager); `url` is its API root (`http://127.0.0.1:N/v1`)."""

    def __init__(self) -> None:
        self.failures: deque[Failure] = deque()
        self.fail_at: dict[int, Failure] = {}
        """Failures by request number (1 is the first chat request this server gets)."""
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.fingerprint: str | None = FINGERPRINT
        """What answers carry as `system_fingerprint` (Ollama's is `fp_ollama`; None: left out)."""
        self._server: asyncio.Server | None = None
        self.url = ""

    def fail(self, failure: Failure, times: int = 1) -> None:
        self.failures.extend([failure] * times)

    async def __aenter__(self) -> OpenAIServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if not await self._answer(method, path, body, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _answer(
        self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        if method == "GET" and path == "/api/tags":
            tags = {"models": [{"name": "llama3:latest", "model": "llama3", "digest": DIGEST}]}
            await self._send(writer, 200, json.dumps(tags).encode())
            return True
        if method != "POST" or path != "/v1/chat/completions":
            await self._send(writer, 404, b'{"error": {"message": "no such route"}}')
            return True
        request = json.loads(body)
        self.requests.append(request)
        failure = self.fail_at.pop(len(self.requests), None)
        if failure is None and self.failures:
            failure = self.failures.popleft()
        if failure is not None:
            if failure.close:
                return False
            extra = {"Retry-After": failure.retry_after} if failure.retry_after else {}
            await self._send(writer, failure.status, failure.body, extra)
            return True
        if request.get("stream"):
            await self._stream(request, writer)
        else:
            await self._send(writer, 200, json.dumps(self._completion(request)).encode())
        return True

    def _base(self, request: dict[str, Any], kind: str) -> dict[str, Any]:
        base: dict[str, Any] = {
            "id": "chatcmpl-loopback",
            "object": kind,
            "created": 1764700000,
            "model": response_model(request["model"]),
        }
        if self.fingerprint is not None:
            base["system_fingerprint"] = self.fingerprint
        return base

    @staticmethod
    def _message(request: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]], str]:
        messages = request["messages"]
        last = next((m.get("content") or "" for m in reversed(messages) if m["role"] == "user"), "")
        tools = request.get("tools") or []
        if tools and last.startswith("call:"):
            call = {
                "id": "call_1",
                "type": "function",
                "function": {
                    "name": tools[0]["function"]["name"],
                    "arguments": json.dumps({"q": last[5:].strip()}),
                },
            }
            return None, [call], "tool_calls"
        return answer_text(request["model"], messages), [], "stop"

    @staticmethod
    def _usage(request: dict[str, Any], content: str | None) -> dict[str, int]:
        prompt = sum(len((m.get("content") or "").split()) for m in request["messages"])
        completion = len((content or "").split())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _completion(self, request: dict[str, Any]) -> dict[str, Any]:
        content, calls, finish = self._message(request)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return {
            **self._base(request, "chat.completion"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": self._usage(request, content),
        }

    async def _stream(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\n"
        )
        content, calls, finish = self._message(request)
        base = self._base(request, "chat.completion.chunk")
        events: list[dict[str, Any]] = [
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
        ]
        for index, word in enumerate((content or "").split(" ") if content else []):
            piece = word if index == 0 else " " + word
            events.append({**base, "choices": [{"index": 0, "delta": {"content": piece}}]})
        for call in calls:  # arguments in two pieces, as OpenAI streams them
            arguments = call["function"]["arguments"]
            half = len(arguments) // 2
            first = {
                "index": 0,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": arguments[:half]},
            }
            rest = {"index": 0, "function": {"arguments": arguments[half:]}}
            for delta in (first, rest):
                events.append({**base, "choices": [{"index": 0, "delta": {"tool_calls": [delta]}}]})
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        if (request.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": self._usage(request, content)})
        for event in events:
            await self._chunk(writer, b": keep-alive\n\n" if event is events[0] else b"")
            await self._chunk(writer, b"data: " + json.dumps(event).encode() + b"\n\n")
        await self._chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    @staticmethod
    async def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        if data:
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        extra: dict[str, str] | None = None,
    ) -> None:
        reason = {200: "OK", 404: "Not Found", 429: "Too Many Requests"}.get(status, "Status")
        head = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in (extra or {}).items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
