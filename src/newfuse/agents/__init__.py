"""Agents: runtime, registry, health, task queues, result aggregation, review, model providers."""
