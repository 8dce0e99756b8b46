"""NATS plumbing the other layers build on: connections, subjects, stream provisioning, publishing
(PubAck inbox, atomic batch), reading (direct get, ordered push consumer), the embedded servers."""

from newfuse.nats import headers
from newfuse.nats.batch import MAX_BATCH_MESSAGES, publish_atomic_batch
from newfuse.nats.connection import connect
from newfuse.nats.direct import DirectGet
from newfuse.nats.durable import DurableSpec, PullLoop, ensure_durable
from newfuse.nats.embedded import NatsServer, ValkeyServer, find_nats_server, find_valkey_server
from newfuse.nats.jserrors import PubAck
from newfuse.nats.micro import Endpoint, MicroService
from newfuse.nats.ordered import FeedMessage, OrderedPushConsumer
from newfuse.nats.provision import (
    EventStreamSpec,
    LivenessStreamSpec,
    MessageStreamSpec,
    StreamState,
    TimerStreamSpec,
    ensure_event_stream,
)
from newfuse.nats.publish import PubAckInbox
from newfuse.nats.subjects import Subjects
from newfuse.nats.tls import Certificates, client_context, make_certificates, server_tls_block

__all__ = [
    # connecting and naming
    "Subjects",
    "connect",
    "headers",
    # TLS: certificates (a throwaway CA), the server's block, the client's context
    "Certificates",
    "client_context",
    "make_certificates",
    "server_tls_block",
    # the events' stream
    "EventStreamSpec",
    "StreamState",
    "ensure_event_stream",
    # the messages' stream and its durable consumers
    "DurableSpec",
    "MessageStreamSpec",
    "PullLoop",
    "ensure_durable",
    # the agents' liveness stream and ADR-32 micro services
    "Endpoint",
    "LivenessStreamSpec",
    "MicroService",
    # the timers' stream (message schedules, ADR-51)
    "TimerStreamSpec",
    # publishing
    "MAX_BATCH_MESSAGES",
    "PubAck",
    "PubAckInbox",
    "publish_atomic_batch",
    # reading
    "DirectGet",
    "FeedMessage",
    "OrderedPushConsumer",
    # embedded servers (development and tests)
    "NatsServer",
    "ValkeyServer",
    "find_nats_server",
    "find_valkey_server",
]
