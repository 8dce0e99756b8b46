"""newfuse: an event-sourced agent-to-agent message bus on NATS JetStream."""
