"""NATS plumbing: embedded servers, connections, subjects, stream provisioning, batch publish."""

from newfuse.nats import headers
from newfuse.nats.batch import MAX_BATCH_MESSAGES, publish_atomic_batch
from newfuse.nats.connection import connect
from newfuse.nats.embedded import NatsServer, ValkeyServer, find_nats_server, find_valkey_server
from newfuse.nats.jserrors import PubAck, decode_pub_ack
from newfuse.nats.provision import (
    EventStreamSpec,
    StreamState,
    ensure_event_stream,
    server_supports_atomic,
    server_version,
)
from newfuse.nats.subjects import Subjects

__all__ = [
    "MAX_BATCH_MESSAGES",
    "EventStreamSpec",
    "NatsServer",
    "PubAck",
    "StreamState",
    "Subjects",
    "ValkeyServer",
    "connect",
    "decode_pub_ack",
    "ensure_event_stream",
    "find_nats_server",
    "find_valkey_server",
    "headers",
    "publish_atomic_batch",
    "server_supports_atomic",
    "server_version",
]
