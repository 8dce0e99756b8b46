"""What mypy infers from the public schemas API; checked by tests/typing/test_typing.py.

A trailing "R" comment holds the type `reveal_type` must print on its line; a trailing "E" comment
holds the error code mypy must report there. This file is type-checked, never run.
"""

from __future__ import annotations

from typing import reveal_type

import msgspec

from newfuse.schemas import (
    ENVELOPE_DECODER,
    A2AMessage,
    A2AMetadata,
    Envelope,
    ExportedSchema,
    StateUpdate,
    StreamName,
    Transaction,
    build_export,
    check_type_name,
    default_registry,
    export_schemas,
    new_event_id,
)

registry = default_registry()
reveal_type(registry)  # R: newfuse.schemas.registry.SchemaRegistry
reveal_type(registry.decode("a2a.message", 1, b"{}"))  # R: Any
reveal_type(registry.encode("a2a.message", 1, {}))  # R: bytes
reveal_type(registry.type_of(StateUpdate))  # R: tuple[str, int]
reveal_type(registry.struct_for("transaction"))  # R: type[msgspec.Struct]
reveal_type(registry.latest_version("transaction"))  # R: int
reveal_type(list(registry.upcasters()))  # R: list[tuple[str, int]]


@registry.register("order.placed", 2)
class OrderPlaced(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str


reveal_type(OrderPlaced)  # R: def (*, order_id: str) -> reveal_schemas.OrderPlaced


@registry.upcaster("order.placed", 1)
def order_v1_to_v2(v1: dict[str, object]) -> dict[str, object]:
    return {"order_id": v1["id"]}


reveal_type(order_v1_to_v2)  # R: def (dict[str, Any]) -> dict[str, Any]

envelope = ENVELOPE_DECODER.decode(b"{}")
reveal_type(envelope)  # R: newfuse.schemas.envelope.Envelope
reveal_type(envelope.data)  # R: msgspec.Raw
reveal_type(envelope.timestamp)  # R: datetime.datetime
reveal_type(envelope.correlation_id)  # R: str | None

update = StateUpdate(agent_id="r1", version=1)
reveal_type(update.agent_id)  # R: str
reveal_type(update.state)  # R: dict[str, Any]
status = Transaction(id="t").status
reveal_type(status)  # R: Literal['active'] | Literal['committed'] | Literal['rolled_back']
message = A2AMessage(type="ask", metadata=A2AMetadata(sender="a"))
reveal_type(message.metadata.timestamp)  # R: datetime.datetime

reveal_type(StreamName.parse("agent.r1").category)  # R: str
reveal_type(check_type_name("a2a.message"))  # R: str
reveal_type(new_event_id())  # R: str
reveal_type(build_export())  # R: dict[str, dict[str, Any]]
reveal_type(export_schemas("out"))  # R: list[newfuse.schemas.export.ExportedSchema]
reveal_type(ExportedSchema.__struct_fields__)  # R: tuple[str, ...]

Transaction(id="t", status="done")  # E: arg-type
StateUpdate(agentId="r1", version=1)  # E: call-arg
Envelope(id="e", stream="a.b", type="t", version=1)  # E: call-arg
update.version = 2  # E: misc
registry.encode("t", "1", {})  # E: arg-type
