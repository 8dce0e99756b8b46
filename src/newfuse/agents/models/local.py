"""A model in the process: deterministic by default (an echo), or any function you plug in.

`LocalModelProvider()` answers `<model>: <the last user message>` and counts tokens as words,
so tests and the demo get the same answer every time, and a different model name gives a
different answer (which is what a replay with another model shows). A custom model is a
function `(messages, model, tools, params) -> ChatResult | str` (sync or async) passed as
`LocalModelProvider(fn, revision="v3")`; a class of your own only needs `name`, `chat` and
`stream` (the ModelProvider protocol).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import msgspec

from newfuse.agents.models.base import ChatChunk, ChatResult, chunked
from newfuse.schemas import ChatMessage, Tool

LocalModel = Callable[
    [Sequence[ChatMessage], str, Sequence[Tool], dict[str, Any]],
    "ChatResult | str | Awaitable[ChatResult | str]",
]
"""A custom model: (messages, model, tools, params) -> its answer (a ChatResult or the text)."""


def echo(
    messages: Sequence[ChatMessage], model: str, tools: Sequence[Tool], params: dict[str, Any]
) -> str:
    """The default local model: `<model>: <the last user message>`."""
    last = next((m.content or "" for m in reversed(messages) if m.role == "user"), "")
    return f"{model}: {last}"


def _words(text: str | None) -> int:
    return len((text or "").split())


class LocalModelProvider:
    """A ModelProvider that runs `model` (default: `echo`) in the process.

    Args:
        model: the function that answers; its result's missing fields are filled in (the
            response model is the one asked for, tokens are counted as words).
        name: the provider's name in records and spans.
        revision: what the records give as the weights' revision (default: `local-` and the
            first 12 hex digits of a sha256 of the function's qualified name).
    """

    def __init__(
        self,
        model: LocalModel = echo,
        *,
        name: str = "local",
        revision: str | None = None,
    ) -> None:
        self.name = name
        self._model = model
        qualified = f"{getattr(model, '__module__', '')}.{getattr(model, '__qualname__', model)}"
        self.revision = revision or "local-" + hashlib.sha256(qualified.encode()).hexdigest()[:12]

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        tools: Sequence[Tool] | None = None,
        params: dict[str, Any] | None = None,
    ) -> ChatResult:
        answer = self._model(messages, model, tools or (), params or {})
        if inspect.isawaitable(answer):
            answer = await answer
        if isinstance(answer, str):
            answer = ChatResult(content=answer)
        return msgspec.structs.replace(
            answer,
            finish_reason=answer.finish_reason or ("tool_calls" if answer.tool_calls else "stop"),
            model=answer.model or model,
            revision=answer.revision or self.revision,
            input_tokens=answer.input_tokens
            if answer.input_tokens is not None
            else sum(_words(m.content) for m in messages),
            output_tokens=answer.output_tokens
            if answer.output_tokens is not None
            else _words(answer.content),
        )

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        tools: Sequence[Tool] | None = None,
        params: dict[str, Any] | None = None,
    ) -> AsyncIterator[ChatChunk | ChatResult]:
        result = await self.chat(messages, model=model, tools=tools, params=params)
        async for item in chunked(result):
            yield item
