"""Projections: runner, checkpoints, rebuild, lag; built-in read models (agent state, audit)."""

from newfuse.projections.agent_state import (
    LIFECYCLE,
    AgentState,
    AgentStateView,
    agent_state_projection,
)
from newfuse.projections.audit import AuditIndex, AuditRecord, SQLResult, audit_projection
from newfuse.projections.base import (
    ANY_TYPE,
    Batch,
    DeadLetter,
    OnPoison,
    Projection,
    ReadModel,
    RetryPolicy,
    RunnerStats,
)
from newfuse.projections.redis_model import RedisBatch, RedisReadModel
from newfuse.projections.runner import (
    ProjectionGroup,
    ProjectionRunner,
    RebuildProgress,
    RebuildResult,
    rebuild,
)
from newfuse.projections.sqlite_model import SQLiteBatch, SQLiteReadModel
from newfuse.projections.status import (
    ProjectionStatus,
    prepared_status,
    projection_status,
    projection_statuses,
)

__all__ = [
    "ANY_TYPE",
    "LIFECYCLE",
    "AgentState",
    "AgentStateView",
    "AuditIndex",
    "AuditRecord",
    "Batch",
    "DeadLetter",
    "OnPoison",
    "Projection",
    "ProjectionGroup",
    "ProjectionRunner",
    "ProjectionStatus",
    "ReadModel",
    "RebuildProgress",
    "RebuildResult",
    "RedisBatch",
    "RedisReadModel",
    "RetryPolicy",
    "RunnerStats",
    "SQLResult",
    "SQLiteBatch",
    "SQLiteReadModel",
    "agent_state_projection",
    "audit_projection",
    "prepared_status",
    "projection_status",
    "projection_statuses",
    "rebuild",
]
