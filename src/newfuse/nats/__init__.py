"""NATS plumbing: embedded servers, connections, subjects, stream provisioning, batch publish."""

from newfuse.nats.embedded import NatsServer, ValkeyServer, find_nats_server, find_valkey_server

__all__ = ["NatsServer", "ValkeyServer", "find_nats_server", "find_valkey_server"]
