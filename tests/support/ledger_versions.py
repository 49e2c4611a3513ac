"""Takes a migrated ledger back to an earlier schema version, to test later migrations on it."""

from __future__ import annotations

from gateway.ledger.db import Connection, apply_statement, execute, transaction
from gateway.ledger.schema import OnlyOn, Statement, usage_events_table

# What undoes each migration, by the version it made.
_UNDO: dict[int, tuple[Statement, ...]] = {
    2: (
        "DROP TABLE quota_policies",
        "DROP TABLE prices",
        "DROP INDEX usage_events_started",
    ),
    3: (
        "DROP TABLE usage_rollups",
        "DROP INDEX usage_events_seq",
        "DROP INDEX usage_events_tenant_seq",
        "ALTER TABLE usage_events DROP COLUMN seq",
        "ALTER TABLE usage_events DROP COLUMN price_effective_at",
        "ALTER TABLE usage_events DROP COLUMN cost_micros",
    ),
    4: ("ALTER TABLE quota_policies DROP COLUMN max_sequences",),
    5: (
        "ALTER TABLE quota_policies DROP COLUMN weight",
        "ALTER TABLE quota_policies DROP COLUMN priority",
    ),
    6: ("CREATE INDEX usage_events_tenant_model ON usage_events (tenant_id, model)",),
    7: ("CREATE INDEX usage_events_started ON usage_events (started_at_ms)",),
    8: (
        "DROP TABLE refusal_rollups",
        "DROP INDEX changes_tenant",
        "DROP TABLE changes",
        "ALTER TABLE usage_rollups DROP COLUMN failed_requests",
    ),
    9: tuple(
        OnlyOn("sqlite", sql)
        for sql in (
            "ALTER TABLE usage_events RENAME TO usage_events_by_seq",
            "DROP INDEX usage_events_tenant_seq",
            usage_events_table("usage_events", event_id="TEXT PRIMARY KEY", seq="BIGINT"),
            "INSERT INTO usage_events SELECT * FROM usage_events_by_seq",
            "DROP TABLE usage_events_by_seq",
            "CREATE UNIQUE INDEX usage_events_seq ON usage_events (seq)",
            "CREATE INDEX usage_events_tenant_seq ON usage_events (tenant_id, seq)",
        )
    ),
}


def downgrade(conn: Connection, version: int) -> None:
    """Undoes, newest first, every migration after `version`, in one transaction."""
    with transaction(conn):
        for undone in sorted(_UNDO, reverse=True):
            if undone > version:
                for statement in _UNDO[undone]:
                    apply_statement(conn, statement)
        execute(conn, "DELETE FROM schema_version WHERE version > ?", (version,))
