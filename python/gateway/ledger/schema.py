"""The ledger's schema: its migrations, in SQL that SQLite and PostgreSQL both accept.

`db.migrate` applies them; this module only lists them.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

# Each migration is applied once, in order, in one transaction, and never edited once released.
# Times are integer unix milliseconds; booleans are BOOLEAN written from Python bools. Only types
# and syntax both dialects take: TEXT, BOOLEAN, INTEGER, BIGINT; no AUTOINCREMENT or SERIAL.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tenants (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at BIGINT NOT NULL,
            disabled BOOLEAN NOT NULL
        )""",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL REFERENCES tenants (id),
            hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            name TEXT,
            created_at BIGINT NOT NULL,
            revoked_at BIGINT
        )""",
        "CREATE INDEX api_keys_tenant ON api_keys (tenant_id)",
        """CREATE TABLE usage_events (
            event_id TEXT PRIMARY KEY,
            request_id TEXT NOT NULL,
            tenant_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            model TEXT NOT NULL,
            worker TEXT,
            endpoint TEXT NOT NULL,
            stream BOOLEAN NOT NULL,
            status TEXT NOT NULL,
            http_status INTEGER NOT NULL,
            prompt_tokens BIGINT NOT NULL,
            cached_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            usage_source TEXT NOT NULL,
            started_at_ms BIGINT NOT NULL,
            finished_at_ms BIGINT NOT NULL,
            recorded_at_ms BIGINT NOT NULL
        )""",
        "CREATE INDEX usage_events_tenant_model ON usage_events (tenant_id, model)",
    ),
    (
        # One policy per tenant or key (`subject_id` is a tenant id or a key id, `scope` says
        # which); limits are NULL when unlimited; `models` is a JSON array, NULL for every model.
        """CREATE TABLE quota_policies (
            subject_id TEXT PRIMARY KEY,
            scope TEXT NOT NULL,
            requests_per_minute BIGINT,
            tokens_per_minute BIGINT,
            max_concurrent BIGINT,
            token_budget BIGINT,
            money_budget_micros BIGINT,
            budget_period TEXT NOT NULL,
            models TEXT,
            updated_at BIGINT NOT NULL
        )""",
        # The price book: every version of a model's prices, in effect from `effective_at` until
        # the next version's; micro-units of currency per million tokens.
        """CREATE TABLE prices (
            model TEXT NOT NULL,
            effective_at BIGINT NOT NULL,
            prompt_per_mtok BIGINT NOT NULL,
            cached_per_mtok BIGINT NOT NULL,
            completion_per_mtok BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (model, effective_at)
        )""",
        # Budgets are seeded from the current day's and month's events at start-up.
        "CREATE INDEX usage_events_started ON usage_events (started_at_ms)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
