"""Projections: runner, checkpoints, rebuild, lag; built-in read models (agent state, audit)."""
