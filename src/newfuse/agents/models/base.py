"""The model provider contract: chat and stream over chat messages and tools, and their result.

A provider is anything with these two methods (a Protocol, not a base class): the HTTP
provider, the local one, or a custom model. `stream` yields text chunks as they come and ends
with the whole `ChatResult`, so a caller that streams still gets the tool calls, the usage and
the model's revision at the end.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final, Protocol

import msgspec

from newfuse.schemas import ChatMessage, Tool, ToolCall

_CANONICAL: Final = msgspec.json.Encoder(order="sorted")


class ChatResult(msgspec.Struct, frozen=True, kw_only=True):
    """A model's answer to one chat call.

    Attributes:
        content: the text it wrote (None when it only called tools).
        tool_calls: the functions it asks to call.
        finish_reason: why it stopped (`stop`, `length`, `tool_calls`, ...).
        model: the model the response names.
        revision: the weights' revision or digest where the server reports one.
        input_tokens, output_tokens: as the server counted them (None if it did not say).
    """

    content: str | None = None
    tool_calls: list[ToolCall] = []
    finish_reason: str | None = None
    model: str | None = None
    revision: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


class ChatChunk(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of text of a streamed answer (tool calls come whole, in the final ChatResult)."""

    content: str


class ModelProvider(Protocol):
    """What newfuse calls a model through.

    `name` is the provider's name in records and spans (`gen_ai.provider.name`: `openai`,
    `ollama`, `vllm`, `local`, ...).
    """

    name: str

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        tools: Sequence[Tool] | None = None,
        params: dict[str, Any] | None = None,
    ) -> ChatResult:
        """The model's answer to `messages`."""
        ...

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        tools: Sequence[Tool] | None = None,
        params: dict[str, Any] | None = None,
    ) -> AsyncIterator[ChatChunk | ChatResult]:
        """The answer as it is written: ChatChunks, then one ChatResult (the last item)."""
        ...


def _digest(value: Any) -> str:
    return "sha256:" + hashlib.sha256(_CANONICAL.encode(value)).hexdigest()


def params_hash(model: str, params: dict[str, Any] | None, tools: Sequence[Tool] | None) -> str:
    """sha256 of the canonical JSON (keys sorted, no spaces) of model, parameters and tools:
    two calls with the same hash asked the same model the same way."""
    return _digest({"model": model, "params": params or {}, "tools": list(tools or ())})


def input_hash(messages: Sequence[ChatMessage]) -> str:
    """sha256 of the canonical JSON of the input messages."""
    return _digest(list(messages))


async def collect(stream: AsyncIterator[ChatChunk | ChatResult]) -> ChatResult:
    """The ChatResult a stream ends with (its chunks are dropped)."""
    result: ChatResult | None = None
    async for item in stream:
        if isinstance(item, ChatResult):
            result = item
    return result or ChatResult()


async def chunked(result: ChatResult) -> AsyncIterator[ChatChunk | ChatResult]:
    """A whole result as a stream: its text word by word (spaces kept), then the result."""
    for index, word in enumerate((result.content or "").split(" ") if result.content else []):
        yield ChatChunk(content=word if index == 0 else " " + word)
    yield result
