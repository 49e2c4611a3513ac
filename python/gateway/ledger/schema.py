"""The ledger's schema: its migrations, in SQL that SQLite and PostgreSQL both accept, save the
statements one dialect alone runs (`OnlyOn`).

`db.migrate` applies them; this module only lists them.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "OnlyOn", "Statement", "usage_events_table"]


class OnlyOn(NamedTuple):
    """A migration's statement that one dialect runs and the other skips: a change of storage
    the other dialect does not need, where the schema both read stays the same."""

    dialect: Literal["sqlite", "postgresql"]
    sql: str


Statement = str | OnlyOn

# `usage_events`' columns since migration 3, in their order, and their types; the key columns'
# types are each table version's own (`usage_events_table`). Migration 9 is made from them, so
# they are as frozen as it is: a later change of the table is a migration of its own.
_EVENT_COLUMN_TYPES: tuple[tuple[str, str], ...] = (
    ("event_id", ""),
    ("request_id", "TEXT NOT NULL"),
    ("tenant_id", "TEXT NOT NULL"),
    ("key_id", "TEXT NOT NULL"),
    ("model", "TEXT NOT NULL"),
    ("worker", "TEXT"),
    ("endpoint", "TEXT NOT NULL"),
    ("stream", "BOOLEAN NOT NULL"),
    ("status", "TEXT NOT NULL"),
    ("http_status", "INTEGER NOT NULL"),
    ("prompt_tokens", "BIGINT NOT NULL"),
    ("cached_tokens", "BIGINT NOT NULL"),
    ("completion_tokens", "BIGINT NOT NULL"),
    ("usage_source", "TEXT NOT NULL"),
    ("started_at_ms", "BIGINT NOT NULL"),
    ("finished_at_ms", "BIGINT NOT NULL"),
    ("recorded_at_ms", "BIGINT NOT NULL"),
    ("seq", ""),
    ("price_effective_at", "BIGINT"),
    ("cost_micros", "BIGINT"),
)
_EVENT_COLUMNS = ", ".join(name for name, _ in _EVENT_COLUMN_TYPES)


def usage_events_table(table: str, *, event_id: str, seq: str) -> str:
    """`CREATE TABLE` of `table` with `usage_events`' columns since migration 3, `event_id` and
    `seq` of the types given."""
    keys = {"event_id": event_id, "seq": seq}
    columns = ",\n    ".join(f"{name} {keys.get(name, kind)}" for name, kind in _EVENT_COLUMN_TYPES)
    return f"CREATE TABLE {table} (\n    {columns}\n)"


# Each migration is applied once, in order, in one transaction, and never edited once released.
# Times are integer unix milliseconds; booleans are BOOLEAN written from Python bools. Only types
# and syntax both dialects take: TEXT, BOOLEAN, INTEGER, BIGINT; no AUTOINCREMENT or SERIAL.
MIGRATIONS: tuple[tuple[Statement, ...], ...] = (
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
    (
        # Token classes stop overlapping: `prompt_tokens` becomes the prompt tokens not served
        # from the prefix cache, so each class is billed at its own price.
        """UPDATE usage_events SET
            cached_tokens = CASE WHEN cached_tokens < prompt_tokens
                THEN cached_tokens ELSE prompt_tokens END,
            prompt_tokens = CASE WHEN cached_tokens < prompt_tokens
                THEN prompt_tokens - cached_tokens ELSE 0 END""",
        # `seq`: the commit order, which billing consumers page by. `price_effective_at` names
        # the price version an event was priced at and `cost_micros` is its cost; both are NULL
        # for an event of a model without a price at its start (unpriced, never billed at zero).
        "ALTER TABLE usage_events ADD COLUMN seq BIGINT",
        "ALTER TABLE usage_events ADD COLUMN price_effective_at BIGINT",
        "ALTER TABLE usage_events ADD COLUMN cost_micros BIGINT",
        """UPDATE usage_events SET seq = (SELECT COUNT(*) FROM usage_events e
            WHERE e.recorded_at_ms < usage_events.recorded_at_ms
                OR (e.recorded_at_ms = usage_events.recorded_at_ms
                    AND e.event_id <= usage_events.event_id))""",
        """UPDATE usage_events SET price_effective_at = (SELECT MAX(p.effective_at) FROM prices p
            WHERE p.model = usage_events.model AND p.effective_at <= usage_events.started_at_ms)""",
        """UPDATE usage_events SET cost_micros = (SELECT
            (usage_events.prompt_tokens * p.prompt_per_mtok
                + usage_events.cached_tokens * p.cached_per_mtok
                + usage_events.completion_tokens * p.completion_per_mtok + 999999) / 1000000
            FROM prices p WHERE p.model = usage_events.model
                AND p.effective_at = usage_events.price_effective_at)""",
        "CREATE UNIQUE INDEX usage_events_seq ON usage_events (seq)",
        "CREATE INDEX usage_events_tenant_seq ON usage_events (tenant_id, seq)",
        # Per bucket of each width ('1m', '1h', '1d', UTC-aligned by `started_at_ms`), tenant,
        # key and model: sums of the events stored, added in the transaction that stores them.
        # Derived data: `rollups.rebuild_rollups` recomputes it from the events.
        """CREATE TABLE usage_rollups (
            bucket_width TEXT NOT NULL,
            bucket_start BIGINT NOT NULL,
            tenant_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            model TEXT NOT NULL,
            requests BIGINT NOT NULL,
            prompt_tokens BIGINT NOT NULL,
            cached_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            cost_micros BIGINT NOT NULL,
            unpriced_requests BIGINT NOT NULL,
            PRIMARY KEY (bucket_width, bucket_start, tenant_id, key_id, model)
        )""",
        *(
            f"""INSERT INTO usage_rollups SELECT '{width}',
                started_at_ms - started_at_ms % {ms}, tenant_id, key_id, model, COUNT(*),
                SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens),
                COALESCE(SUM(cost_micros), 0),
                SUM(CASE WHEN cost_micros IS NULL THEN 1 ELSE 0 END)
            FROM usage_events
            GROUP BY started_at_ms - started_at_ms % {ms}, tenant_id, key_id, model"""  # noqa: S608
            for width, ms in (("1m", 60_000), ("1h", 3_600_000), ("1d", 86_400_000))
        ),
    ),
    (
        # The most sequences (`n` x prompts) one request may generate; NULL: no limit.
        "ALTER TABLE quota_policies ADD COLUMN max_sequences BIGINT",
    ),
    (
        # A tenant's share of a busy model's queue, and the most urgent priority class its (or a
        # key's) requests may take.
        "ALTER TABLE quota_policies ADD COLUMN weight BIGINT NOT NULL DEFAULT 1",
        "ALTER TABLE quota_policies ADD COLUMN priority TEXT NOT NULL DEFAULT 'interactive'",
    ),
    (
        # Every read that filters events by tenant takes `usage_events_tenant_seq` as well, and
        # this index cost each insert more than the rest of its indexes together (its entries go
        # in the middle of the tree, one place per tenant and model).
        "DROP INDEX usage_events_tenant_model",
    ),
    (
        # Budgets are seeded from the rollups' days (`usage.spent_in_current_periods`), the one
        # read this index served; it cost each insert a tree of its own.
        "DROP INDEX usage_events_started",
    ),
    (
        # Requests the core refused to a known key (429s over quota included), per bucket of
        # each width, tenant, key and reason (the error's code): the counts the core keeps
        # between drains, added up (`refusals`). Not billing data: counts a process had not yet
        # handed over are lost with it.
        """CREATE TABLE refusal_rollups (
            bucket_width TEXT NOT NULL,
            bucket_start BIGINT NOT NULL,
            tenant_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            reason TEXT NOT NULL,
            requests BIGINT NOT NULL,
            PRIMARY KEY (bucket_width, bucket_start, tenant_id, key_id, reason)
        )""",
        # What operators changed in tenants, keys, quota policies and prices (`changes`),
        # written in the transaction of the change; `detail` is a JSON object.
        # `seq` orders them: each is the last one's plus one, taken under the write lock.
        """CREATE TABLE changes (
            seq BIGINT PRIMARY KEY,
            at_ms BIGINT NOT NULL,
            action TEXT NOT NULL,
            tenant_id TEXT,
            subject_id TEXT NOT NULL,
            detail TEXT NOT NULL
        )""",
        "CREATE INDEX changes_tenant ON changes (tenant_id, seq)",
        # Requests that ended in an error (the worker's, or a stream cut short), per rollup row:
        # the rollups are recomputed from the events with it.
        "ALTER TABLE usage_rollups ADD COLUMN failed_requests BIGINT NOT NULL DEFAULT 0",
        "DELETE FROM usage_rollups",
        *(
            f"""INSERT INTO usage_rollups SELECT '{width}',
                started_at_ms - started_at_ms % {ms}, tenant_id, key_id, model, COUNT(*),
                SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens),
                COALESCE(SUM(cost_micros), 0),
                SUM(CASE WHEN cost_micros IS NULL THEN 1 ELSE 0 END),
                SUM(CASE WHEN status IN ('failed', 'interrupted') THEN 1 ELSE 0 END)
            FROM usage_events
            GROUP BY started_at_ms - started_at_ms % {ms}, tenant_id, key_id, model"""  # noqa: S608
            for width, ms in (("1m", 60_000), ("1h", 3_600_000), ("1d", 86_400_000))
        ),
    ),
    (
        # On SQLite, `seq` becomes the table's rowid (`INTEGER PRIMARY KEY`, SQLite's 64-bit key):
        # events are stored in commit order, each appended to the table's tree, and the unique
        # index `usage_events_seq`, a fourth tree every insert paid for, is gone. `event_id`
        # keeps a unique index of its own. The table is rebuilt, the way SQLite changes a key.
        # PostgreSQL keeps its table: its `INTEGER` is 32-bit, and a heap has no rowid to spare.
        OnlyOn(
            "sqlite",
            usage_events_table(
                "usage_events_by_seq", event_id="TEXT NOT NULL UNIQUE", seq="INTEGER PRIMARY KEY"
            ),
        ),
        OnlyOn(
            "sqlite",
            f"INSERT INTO usage_events_by_seq ({_EVENT_COLUMNS}) "  # noqa: S608
            f"SELECT {_EVENT_COLUMNS} FROM usage_events ORDER BY seq",
        ),
        OnlyOn("sqlite", "DROP TABLE usage_events"),
        OnlyOn("sqlite", "ALTER TABLE usage_events_by_seq RENAME TO usage_events"),
        OnlyOn("sqlite", "CREATE INDEX usage_events_tenant_seq ON usage_events (tenant_id, seq)"),
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
