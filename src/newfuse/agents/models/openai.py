"""A model provider for OpenAI-compatible chat-completions endpoints, over httpx.

`POST <base_url>/chat/completions` with the model, the messages, the tools (`{"type":
"function", ...}`) and the parameters as given (temperature, max_tokens, seed, ...); streamed
answers are Server-Sent Events (`stream: true`, `stream_options: {"include_usage": true}`, one
`data: {...}` chunk per line, `data: [DONE]` at the end). The same code serves OpenAI, vLLM,
Ollama (`http://host:11434/v1`) and LM Studio (`http://host:1234/v1`); what differs:

- the revision: OpenAI sends `system_fingerprint`; vLLM and LM Studio usually none; Ollama
  sends `fp_ollama`, which names no weights, so with `ollama_digests=True` the provider asks
  Ollama's `/api/tags` once per model for its digest;
- tool-call arguments: OpenAI sends JSON text, some servers an object, which is kept as JSON;
- usage: some servers send none when streaming (tokens are then None, not 0);
- errors: OpenAI's `{"error": {"message": ...}}`, Ollama's `{"error": "..."}`, or text.

Every answer is read with a size bound, checked for nesting and decoded into typed structs:
a server is trusted no more than a message from the bus. Failures become ModelError
subclasses: 429, 408, 5xx, timeouts and refused connections are retryable (with `retry_after`
from a Retry-After header); other refusals are not. A call goes through the optional rate
limiter, circuit breaker and retry policy (newfuse.reliability's API: `limiter.acquire()`,
`breaker.call(fn)`, `retry.run(fn, operation=, retryable=)`); a stream retries only until
its answer starts.
"""

from __future__ import annotations

import email.utils
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol, Self, TypeVar

import httpx
import msgspec

from newfuse.agents.models.base import ChatChunk, ChatResult
from newfuse.errors import (
    FuseError,
    ModelError,
    ModelRateLimitedError,
    ModelRequestError,
    ModelResponseError,
    ModelUnavailableError,
)
from newfuse.schemas import ChatMessage, Tool, ToolCall, check_depth

T = TypeVar("T")

MAX_RESPONSE_BYTES: Final = 8 * 1024 * 1024
"""The most a provider reads of one answer (a whole completion, or all of a stream)."""
_LONGEST_RETRY_AFTER: Final = 86400.0
_ENCODER: Final = msgspec.json.Encoder()


class RetryLike(Protocol):
    """What the provider needs of a retry policy (newfuse.reliability.RetryPolicy)."""

    async def run(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        operation: str,
        retryable: Callable[[BaseException], bool] | None = None,
    ) -> T: ...


class BreakerLike(Protocol):
    """What the provider needs of a circuit breaker (newfuse.reliability.CircuitBreaker)."""

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T: ...


class LimiterLike(Protocol):
    """What the provider needs of a rate limiter (newfuse.reliability.RateLimiter and
    RedisRateLimiter)."""

    async def acquire(self) -> None: ...


# -- the answer as servers send it (unknown fields ignored, every field optional) ------------------


class _Function(msgspec.Struct, kw_only=True):
    name: str | None = None
    arguments: Any = None


class _ToolCall(msgspec.Struct, kw_only=True):
    index: int | None = None
    id: str | None = None
    function: _Function | None = None


class _Message(msgspec.Struct, kw_only=True):
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: _Message | None = None
    delta: _Message | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Completion(msgspec.Struct, kw_only=True):
    model: str | None = None
    system_fingerprint: str | None = None
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None


class _Tag(msgspec.Struct, kw_only=True):
    name: str | None = None
    model: str | None = None
    digest: str | None = None


class _Tags(msgspec.Struct, kw_only=True):
    models: list[_Tag] = []


_COMPLETION: Final = msgspec.json.Decoder(_Completion)
_TAGS: Final = msgspec.json.Decoder(_Tags)


def _arguments(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return _ENCODER.encode(value).decode()


def _wire_message(message: ChatMessage) -> dict[str, Any]:
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        wire["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        wire["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        wire["name"] = message.name
    return wire


def _wire_tool(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date, RFC 9110 10.2.3);
    None when absent or unreadable; at least 0, at most a day."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), _LONGEST_RETRY_AFTER)


def _retryable(error: BaseException) -> bool:
    if isinstance(error, FuseError):
        return error.retryable
    return False


class OpenAICompatibleProvider:
    """A ModelProvider for an OpenAI-compatible endpoint (an async context manager).

    Example:
        async with OpenAICompatibleProvider("http://127.0.0.1:11434/v1", name="ollama") as p:
            result = await p.chat([ChatMessage(role="user", content="hi")], model="llama3.2")

    Args:
        base_url: the API root, ending in `/v1` (`https://api.openai.com/v1`).
        api_key: sent as `Authorization: Bearer <key>` when given.
        name: the provider's name in records and spans (`openai`, `vllm`, `ollama`, ...).
        timeout: seconds to wait for each part of the answer (httpx's read timeout).
        connect_timeout: seconds to connect.
        max_response_bytes: the most read of one answer.
        ollama_digests: ask Ollama's `/api/tags` for the model's digest (its revision).
        retry, breaker, limiter: newfuse.reliability's RetryPolicy, CircuitBreaker and
            RateLimiter (or anything with their methods); each call goes through them.
        client: an httpx.AsyncClient to use (not closed by this provider).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        name: str = "openai",
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        ollama_digests: bool = False,
        retry: RetryLike | None = None,
        breaker: BreakerLike | None = None,
        limiter: LimiterLike | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self._headers = {"Accept": "application/json, text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._max = max_response_bytes
        self._ollama_digests = ollama_digests
        self._digests: dict[str, str | None] = {}
        self._retry = retry
        self._breaker = breaker
        self._limiter = limiter
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout)
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client (if this provider made it). Idempotent."""
        if self._own_client:
            await self._client.aclose()

    # -- the calls --------------------------------------------------------------------------------

    def _body(
        self,
        messages: Sequence[ChatMessage],
        model: str,
        tools: Sequence[Tool] | None,
        params: dict[str, Any] | None,
        *,
        stream: bool,
    ) -> bytes:
        body: dict[str, Any] = dict(params or {})
        body["model"] = model
        body["messages"] = [_wire_message(message) for message in messages]
        if tools:
            body["tools"] = [_wire_tool(tool) for tool in tools]
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        else:
            body.pop("stream", None)
        return _ENCODER.encode(body)

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        tools: Sequence[Tool] | None = None,
        params: dict[str, Any] | None = None,
    ) -> ChatResult:
        body = self._body(messages, model, tools, params, stream=False)

        async def once() -> ChatResult:
            response = await self._open(body)
            try:
                data = await self._read(response)
            finally:
                await response.aclose()
            return self._result(self._decode(data))

        result = await self._guarded(once, f"chat with {model!r} at {self.url}")
        return await self._with_digest(result, model)

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        tools: Sequence[Tool] | None = None,
        params: dict[str, Any] | None = None,
    ) -> AsyncIterator[ChatChunk | ChatResult]:
        body = self._body(messages, model, tools, params, stream=True)
        response = await self._guarded(
            lambda: self._open(body), f"stream from {model!r} at {self.url}"
        )
        try:
            content: list[str] = []
            calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
            finish: str | None = None
            last = _Completion()
            usage: _Usage | None = None
            async for chunk in self._events(response):
                last = chunk
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices or ():
                    if choice.index != 0:
                        continue
                    if choice.finish_reason:
                        finish = choice.finish_reason
                    delta = choice.delta or choice.message
                    if delta is None:
                        continue
                    if delta.content:
                        content.append(delta.content)
                        yield ChatChunk(content=delta.content)
                    for position, call in enumerate(delta.tool_calls or ()):
                        index = call.index if call.index is not None else position
                        slot = calls.setdefault(index, ["", "", ""])
                        if call.id:
                            slot[0] = call.id
                        if call.function is not None:
                            slot[1] += call.function.name or ""
                            slot[2] += _arguments(call.function.arguments)
        finally:
            await response.aclose()
        result = ChatResult(
            content="".join(content) if content or not calls else None,
            tool_calls=[
                ToolCall(id=slot[0] or f"call_{index}", name=slot[1], arguments=slot[2] or "{}")
                for index, slot in sorted(calls.items())
            ],
            finish_reason=finish,
            model=last.model,
            revision=self._revision(last.system_fingerprint),
            input_tokens=usage.prompt_tokens if usage is not None else None,
            output_tokens=usage.completion_tokens if usage is not None else None,
        )
        yield await self._with_digest(result, model)

    # -- the parts --------------------------------------------------------------------------------

    async def _guarded(self, fn: Callable[[], Awaitable[T]], operation: str) -> T:
        async def attempt() -> T:
            if self._limiter is not None:
                await self._limiter.acquire()
            if self._breaker is not None:
                return await self._breaker.call(fn)
            return await fn()

        if self._retry is not None:
            return await self._retry.run(attempt, operation=operation, retryable=_retryable)
        return await attempt()

    async def _open(self, body: bytes) -> httpx.Response:
        """The answer's status and headers (its body unread); a refusal is raised as its error."""
        request = self._client.build_request(
            "POST",
            self.url,
            content=body,
            headers={**self._headers, "Content-Type": "application/json"},
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            raise ModelUnavailableError(
                provider=self.name, url=self.url, reason="no answer in time (timeout)"
            ) from None
        except httpx.TransportError as error:
            raise ModelUnavailableError(
                provider=self.name,
                url=self.url,
                reason=f"cannot reach it: {type(error).__name__}: {error}",
            ) from None
        if response.status_code == 200:
            return response
        try:
            detail = await self._read(response, limit=64 * 1024)
        except ModelError:
            detail = b""
        finally:
            await response.aclose()
        raise self._refusal(response, _detail(detail))

    def _refusal(self, response: httpx.Response, detail: str) -> ModelError:
        status = response.status_code
        wait = retry_after(response.headers.get("retry-after"))
        if status == 429:
            return ModelRateLimitedError(
                provider=self.name,
                url=self.url,
                status=status,
                reason=f"too many requests: {detail}",
                retry_after=wait,
            )
        if status == 408 or status >= 500:
            return ModelUnavailableError(
                provider=self.name,
                url=self.url,
                status=status,
                reason=f"the server failed: {detail}",
                retry_after=wait,
            )
        if 400 <= status < 500:
            return ModelRequestError(provider=self.name, url=self.url, status=status, detail=detail)
        return ModelResponseError(
            provider=self.name, url=self.url, reason=f"HTTP {status} is not an answer"
        )

    async def _read(self, response: httpx.Response, *, limit: int | None = None) -> bytes:
        most = self._max if limit is None else limit
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > most:
                    raise ModelResponseError(
                        provider=self.name,
                        url=self.url,
                        reason=f"the answer is larger than {most} bytes",
                    )
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise ModelUnavailableError(
                provider=self.name, url=self.url, reason="the answer stopped coming (timeout)"
            ) from None
        except httpx.TransportError as error:
            raise ModelUnavailableError(
                provider=self.name, url=self.url, reason=f"the answer broke off: {error}"
            ) from None
        return b"".join(chunks)

    def _decode(self, data: bytes) -> _Completion:
        try:
            check_depth(data, f"the answer of {self.url}")
            completion = _COMPLETION.decode(data)
        except (FuseError, msgspec.DecodeError, msgspec.ValidationError) as error:
            raise ModelResponseError(provider=self.name, url=self.url, reason=str(error)) from None
        if completion.error is not None:
            raise ModelUnavailableError(
                provider=self.name,
                url=self.url,
                reason=f"it reported an error: {_error_text(completion.error)}",
            )
        return completion

    async def _events(self, response: httpx.Response) -> AsyncIterator[_Completion]:
        """The `data:` chunks of an SSE answer, decoded, until `[DONE]` or its end."""
        size = 0
        try:
            async for line in response.aiter_lines():
                size += len(line) + 1
                if size > self._max:
                    raise ModelResponseError(
                        provider=self.name,
                        url=self.url,
                        reason=f"the stream is longer than {self._max} bytes",
                    )
                if not line.startswith("data:"):
                    continue  # comments (`:`), `event:`, `id:`, `retry:` and blank lines
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                if data:
                    yield self._decode(data.encode())
        except httpx.TimeoutException:
            raise ModelUnavailableError(
                provider=self.name, url=self.url, reason="the stream stopped coming (timeout)"
            ) from None
        except httpx.TransportError as error:
            raise ModelUnavailableError(
                provider=self.name, url=self.url, reason=f"the stream broke off: {error}"
            ) from None

    def _result(self, completion: _Completion) -> ChatResult:
        choices = completion.choices or []
        if not choices or choices[0].message is None:
            raise ModelResponseError(
                provider=self.name, url=self.url, reason="it has no choices[0].message"
            )
        choice = choices[0]
        message = choice.message
        assert message is not None
        usage = completion.usage
        return ChatResult(
            content=message.content,
            tool_calls=[
                ToolCall(
                    id=call.id or f"call_{index}",
                    name=(call.function.name if call.function else None) or "",
                    arguments=_arguments(call.function.arguments if call.function else None)
                    or "{}",
                )
                for index, call in enumerate(message.tool_calls or ())
            ],
            finish_reason=choice.finish_reason,
            model=completion.model,
            revision=self._revision(completion.system_fingerprint),
            input_tokens=usage.prompt_tokens if usage is not None else None,
            output_tokens=usage.completion_tokens if usage is not None else None,
        )

    def _revision(self, fingerprint: str | None) -> str | None:
        if fingerprint == "fp_ollama":  # Ollama's constant: it names no weights
            return None
        return fingerprint

    async def _with_digest(self, result: ChatResult, model: str) -> ChatResult:
        if not self._ollama_digests or result.revision is not None:
            return result
        if model not in self._digests:
            self._digests[model] = await self._ollama_digest(model)
        digest = self._digests[model]
        return result if digest is None else msgspec.structs.replace(result, revision=digest)

    async def _ollama_digest(self, model: str) -> str | None:
        root = self.base_url.removesuffix("/v1")
        try:
            response = await self._client.get(f"{root}/api/tags", headers=self._headers)
            if response.status_code != 200 or len(response.content) > self._max:
                return None
            tags = _TAGS.decode(response.content)
        except (httpx.HTTPError, msgspec.DecodeError, msgspec.ValidationError):
            return None  # a revision is nice to have; the call itself succeeded
        names = {model, f"{model}:latest"}
        for tag in tags.models:
            if (tag.name in names or tag.model in names) and tag.digest:
                return tag.digest
        return None


def _error_text(value: Any) -> str:
    if isinstance(value, dict):
        message = value.get("message")
        if isinstance(message, str):
            return message
    if isinstance(value, str):
        return value
    return _ENCODER.encode(value).decode()[:300]


def _detail(body: bytes) -> str:
    """What a refusal's body says: its `error.message` or `error`, else its text."""
    try:
        check_depth(body, "a refusal")
        decoded = msgspec.json.decode(body)
    except (FuseError, msgspec.DecodeError):
        return body.decode("utf-8", "replace").strip()[:300] or "(no body)"
    if isinstance(decoded, dict) and "error" in decoded:
        return _error_text(decoded["error"])[:300]
    return body.decode("utf-8", "replace").strip()[:300]
