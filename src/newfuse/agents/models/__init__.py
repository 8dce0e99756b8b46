"""Model providers (LLM integration): the ModelProvider protocol, an OpenAI-compatible HTTP
provider, a deterministic local one, and the `model.invoked` records every call leaves."""

from newfuse.agents.models.base import (
    ChatChunk,
    ChatResult,
    ModelProvider,
    collect,
    input_hash,
    params_hash,
)
from newfuse.agents.models.local import LocalModel, LocalModelProvider, echo
from newfuse.agents.models.openai import (
    BreakerLike,
    LimiterLike,
    OpenAICompatibleProvider,
    RetryLike,
    retry_after,
)
from newfuse.agents.models.recording import (
    INVOKED_TYPE,
    CallLog,
    ModelRecorder,
    RecordedModel,
    StoredInvocation,
    decode_invoked,
    result_of,
)
from newfuse.schemas import ChatMessage, ModelInvoked, Tool, ToolCall

__all__ = [
    "INVOKED_TYPE",
    "BreakerLike",
    "CallLog",
    "ChatChunk",
    "ChatMessage",
    "ChatResult",
    "LimiterLike",
    "LocalModel",
    "LocalModelProvider",
    "ModelInvoked",
    "ModelProvider",
    "ModelRecorder",
    "OpenAICompatibleProvider",
    "RecordedModel",
    "RetryLike",
    "StoredInvocation",
    "Tool",
    "ToolCall",
    "collect",
    "decode_invoked",
    "echo",
    "input_hash",
    "params_hash",
    "result_of",
    "retry_after",
]
