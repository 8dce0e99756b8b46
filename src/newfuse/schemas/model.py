"""Model calls on the wire: chat messages, tools and tool calls, and the `model.invoked` record.

Field names on the wire are camelCase, like the A2A types (`requestModel`, `inputTokens`);
chat messages keep the OpenAI chat-completions shape (`role`, `content`, `tool_calls`,
`tool_call_id`) because that is what every OpenAI-compatible server and SDK speaks.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from newfuse.schemas.payloads import Timestamp, utcnow

ChatRole = Literal["system", "user", "assistant", "tool"]
ModelOutcome = Literal["ok", "error"]


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A function the model asks to call: `arguments` is the JSON text the model wrote (it may
    not parse: models make mistakes, so it is kept as written)."""

    id: str
    name: str
    arguments: str = "{}"


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One message of a chat: a system prompt, a user turn, an assistant turn (with the tool
    calls it asked for), or a tool's result (`tool_call_id` names the call it answers)."""

    role: ChatRole
    content: str | None = None
    tool_calls: list[ToolCall] = []
    tool_call_id: str | None = None
    name: str | None = None


class Tool(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A function tool the model may call: its name, what it does, and its parameters as a JSON
    Schema object (`{"type": "object", "properties": {...}}`)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )


class ModelInvoked(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="camel"):
    """One call of a model (type `model.invoked`): what was asked, what answered, what it cost.

    Attributes:
        provider: who served it (`openai`, `vllm`, `ollama`, `local`, ... :
            `gen_ai.provider.name`).
        operation: `chat` (`gen_ai.operation.name`).
        request_model: the model asked for.
        response_model: the model the response names (may differ: aliases, routers).
        revision: the weights' revision or digest where the server reports one
            (`system_fingerprint`, Ollama's digest).
        params_hash: sha256 of the canonical JSON of model, parameters and tools.
        input_hash: sha256 of the canonical JSON of the input messages.
        params: the parameters as given (temperature, max_tokens, seed, ...).
        input_tokens, output_tokens: as the server counted them (None if it did not say).
        latency_ms: from the request to the last byte of the answer.
        outcome: `ok`, or `error` with `error` (the message) and `error_type`.
        content, tool_calls, finish_reason: the answer, kept so a replay can give it again.
        agent: `type/key` of the agent whose handler called it, if one did.
        correlation: the id of the message that handler was handling.
        context_id: that message's conversation.
        call: the call's index among that handler's model calls (0, 1, ...).
        streamed: whether the answer was streamed.
    """

    provider: str
    request_model: str
    params_hash: str
    input_hash: str
    outcome: ModelOutcome
    latency_ms: float
    operation: str = "chat"
    response_model: str | None = None
    revision: str | None = None
    params: dict[str, Any] = {}
    input_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None
    error_type: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = []
    finish_reason: str | None = None
    agent: str | None = None
    correlation: str | None = None
    context_id: str | None = None
    call: int = 0
    streamed: bool = False
    timestamp: Timestamp = msgspec.field(default_factory=utcnow)
