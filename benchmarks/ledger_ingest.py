"""How fast the ledger stores usage events: the whole write path of `gateway serve`'s usage loop
(`insert_usage_events`: duplicate check, disjoint classes, pricing, commit-order numbers, rollups
of three widths, one transaction per batch), on SQLite and on PostgreSQL.

    python benchmarks/ledger_ingest.py            # 3 rounds of 200,000 events per case
    python benchmarks/ledger_ingest.py --quick    # 1 round of 20,000 events: a smoke test

Run it with the project's interpreter (`.venv/bin/python`) after `make build`; PostgreSQL cases
need the server binaries (`make services`) and are left out without them. Every case writes into
a fresh ledger where two models are priced: events of 50 tenants, 200 keys and 3 models (one
unpriced), a millisecond apart, in batches of 100, 1,000 and 4,096 (`control.usage_batch`'s
default). Event ids are UUIDv7, as the core makes them; events are made before the clock
starts. The tables give medians over rounds: events stored per second (wall clock), and CPU per
event: the writer's (this process, the gateway's usage loop in production), and for PostgreSQL the
server's backend beside it.

Beside them, the same events' rows made by SQLite itself in the same ledger (an `INSERT ...
SELECT` from a recursive CTE, one statement and one transaction per batch): what storing them
costs in SQLite's engine alone, the table, its indexes and the commit, without Python's driver
binding the values, the pricing, the duplicate check or the rollups. It is the floor any writer
through SQLite has at this schema; the gap to it is the writer's own. Results: a section of
`benchmarks/RESULTS.md` (`--quick` only prints it) and a raw report in `benchmarks/out/`.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from gateway.ledger.db import execute, open_ledger, query, transaction
from gateway.ledger.prices import set_price
from gateway.ledger.usage import UsageEvent, insert_usage_events
from gateway.quotas import Price
from harness import Settings, machine, publish, run_meta
from tests.support.services.postgres import PostgresServer

BEGIN = "<!-- ledger_ingest.py:begin -->"
END = "<!-- ledger_ingest.py:end -->"
BATCHES = (100, 1000, 4096)
TARGET = 150_000
ENGINE = "SQLite's engine alone (floor)"
TICKS = os.sysconf("SC_CLK_TCK")


class Rate(NamedTuple):
    """One case's figures: events per second, and CPU microseconds per event of the writer and
    of the database server's backend (0 for SQLite, which runs in the writer)."""

    per_s: float
    writer_us: float
    server_us: float


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process `pid` so far (`/proc/PID/stat`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def uuid7(ms: int) -> str:
    """A UUIDv7 as the core makes event ids: the millisecond first, so ids ascend with time."""
    value = (ms << 80) | (0x7 << 76) | (random.getrandbits(12) << 64) | (0b10 << 62)
    return str(uuid.UUID(int=value | random.getrandbits(62)))


def make_events(count: int, start_ms: int) -> list[UsageEvent]:
    """`count` events started a millisecond apart: a gateway serving 1,000 requests a second."""
    step = 1
    return [
        UsageEvent(
            event_id=uuid7(start_ms + i * step),
            request_id=f"req-{i}",
            tenant_id=f"ten_{i % 50:012d}",
            key_id=f"key_{i % 200:012d}",
            model=("model-a", "model-b", "model-unpriced")[i % 3],
            worker="http://127.0.0.1:8001",
            endpoint="chat.completions",
            stream=bool(i % 2),
            status="completed",
            http_status=200,
            prompt_tokens=100 + i % 900,
            cached_tokens=i % 64,
            completion_tokens=1 + i % 500,
            usage_source="worker",
            started_at_ms=start_ms + i * step,
            finished_at_ms=start_ms + i * step + 800,
        )
        for i in range(count)
    ]


def ingest(url: str, events: list[UsageEvent], batch: int) -> Rate:
    """The figures of storing `events` in batches of `batch` into a fresh ledger at `url`."""
    with open_ledger(url) as conn:
        backend = None if conn.dialect == "sqlite" else query(conn, "SELECT pg_backend_pid()")[0][0]
        for model in ("model-a", "model-b"):
            set_price(
                conn,
                model,
                Price(prompt_per_mtok=150_000, cached_per_mtok=75_000, completion_per_mtok=600_000),
                effective_at=0,
            )
        server_began = 0.0 if backend is None else process_cpu_s(backend)
        cpu_began, began = time.process_time(), time.perf_counter()
        for first in range(0, len(events), batch):
            insert_usage_events(conn, events[first : first + batch])
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
        server = 0.0 if backend is None else process_cpu_s(backend) - server_began
        count = len(events)
        return Rate(count / wall, cpu / count * 1e6, server / count * 1e6)


# The rows `make_events` makes, made by SQLite: event `i` of the batch starting at `?1` up to `?2`
# (inclusive), started at `?3` + i ms. The event id spells a UUIDv7 of that millisecond.
_ENGINE_ROWS = """
WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
INSERT INTO usage_events (event_id, request_id, tenant_id, key_id, model, worker, endpoint,
    stream, status, http_status, prompt_tokens, cached_tokens, completion_tokens, usage_source,
    started_at_ms, finished_at_ms, recorded_at_ms, seq, price_effective_at, cost_micros)
SELECT printf('%08x-%04x-7%03x-8%03x-%012x', (?3 + i) >> 16, (?3 + i) & 65535, i % 4096,
        i % 4093, i * 2654435761 % 281474976710656),
    'req-' || i, printf('ten_%012d', i % 50), printf('key_%012d', i % 200),
    CASE i % 3 WHEN 0 THEN 'model-a' WHEN 1 THEN 'model-b' ELSE 'model-unpriced' END,
    'http://127.0.0.1:8001', 'chat.completions', i % 2, 'completed', 200,
    100 + i % 900 - i % 64, i % 64, 1 + i % 500, 'worker', ?3 + i, ?3 + i + 800, ?3 + ?2, i + 1,
    CASE i % 3 WHEN 2 THEN NULL ELSE 0 END, CASE i % 3 WHEN 2 THEN NULL ELSE i % 1000 END
FROM n
"""


def engine_floor(path: Path, count: int, batch: int, start_ms: int) -> Rate:
    """The figures of SQLite making and storing `count` events' rows itself, in batches of
    `batch`, into a fresh ledger at `path`: the floor of any writer at this schema."""
    with open_ledger(f"sqlite:///{path}") as conn:
        cpu_began, began = time.process_time(), time.perf_counter()
        for first in range(0, count, batch):
            with transaction(conn):
                execute(conn, _ENGINE_ROWS, (first, min(first + batch, count) - 1, start_ms))
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
        stored = query(conn, "SELECT COUNT(*) FROM usage_events")[0][0]
    if stored != count:
        raise RuntimeError(f"the engine's case stored {stored} events of {count}")
    return Rate(count / wall, cpu / count * 1e6, 0.0)


def show(rate: Rate) -> str:
    server = f" + {rate.server_us:.1f} server" if rate.server_us else ""
    return f"{rate.per_s:,.0f} events/s, {rate.writer_us:.1f}{server} µs CPU per event"


def postgres_server(stack: ExitStack) -> PostgresServer | None:
    """The tests' PostgreSQL server (`tests.support.services`), or None without its binaries."""
    try:
        return stack.enter_context(PostgresServer())
    except Exception as exc:  # no server binaries: SQLite only
        print(f"PostgreSQL left out: {exc}", file=sys.stderr)
        return None


def section(rates: dict[str, dict[int, list[Rate]]], count: int, meta: dict[str, Any]) -> str:
    lines = [
        BEGIN,
        "## Ledger ingest: usage events stored per second",
        "",
        f"`{meta['command']}` — {meta['date']}, commit {meta['commit']}, "
        f"{meta['machine']['cpu']} ({meta['machine']['nproc']} cores), load "
        f"{meta['machine']['load']} at start. {count:,} events per case into a fresh ledger "
        f"(pricing, commit order and rollups included), medians of {meta['rounds']} rounds; "
        f"SQLite in WAL mode with `synchronous = FULL`, PostgreSQL on loopback.",
        "",
        "| backend | " + " | ".join(f"batch {b:,}" for b in BATCHES) + " |",
        "|---|" + "---:|" * len(BATCHES),
    ]
    for backend, by_batch in rates.items():
        cells = [f"{statistics.median(r.per_s for r in by_batch[b]):,.0f}/s" for b in BATCHES]
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "CPU per event (µs), the writer's, and for PostgreSQL + the server backend's:",
        "",
        "| backend | " + " | ".join(f"batch {b:,}" for b in BATCHES) + " |",
        "|---|" + "---:|" * len(BATCHES),
    ]
    for backend, by_batch in rates.items():
        cells = []
        for b in BATCHES:
            cell = f"{statistics.median(r.writer_us for r in by_batch[b]):.1f}"
            if backend == "PostgreSQL":
                cell += f" + {statistics.median(r.server_us for r in by_batch[b]):.1f}"
            cells.append(cell)
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Target: at least {TARGET:,} events/s on SQLite at batch 4,096. Raw report: "
        f"`benchmarks/out/{meta['raw']}`.",
        END,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 round of 20,000 events")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of a full run (default 3)")
    args = parser.parse_args(argv)
    rounds, count = (1, 20_000) if args.quick else (args.rounds, 200_000)
    command = shlex.join(["python", "benchmarks/ledger_ingest.py", *(argv or sys.argv[1:])])
    stamp = datetime.now(UTC)
    settings = Settings(
        rounds=rounds,
        duration_s=0.0,
        warmup_s=0.0,
        concurrency=0,
        rate=0.0,
        gateway_core=0,
        client_core=0,
        loadgen=Path(),
        quick=args.quick,
        no_nginx=True,
    )
    meta = run_meta("ledger-ingest", command, stamp, machine(), settings)
    events = make_events(count, int(stamp.timestamp() * 1000) - count)
    rates: dict[str, dict[int, list[Rate]]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="ledger-ingest-") as tmp:
        server = None if args.no_postgres else postgres_server(stack)
        for n in range(rounds):
            for batch in BATCHES:
                path = Path(tmp) / f"ledger-{n}-{batch}.db"
                rate = ingest(f"sqlite:///{path}", events, batch)
                rates.setdefault("SQLite", {}).setdefault(batch, []).append(rate)
                print(f"round {n + 1}: SQLite, batch {batch}: {show(rate)}", flush=True)
                path = Path(tmp) / f"engine-{n}-{batch}.db"
                rate = engine_floor(path, count, batch, events[0].started_at_ms)
                rates.setdefault(ENGINE, {}).setdefault(batch, []).append(rate)
                print(f"round {n + 1}: {ENGINE}, batch {batch}: {show(rate)}", flush=True)
                if server is not None:
                    with server.database() as url:
                        rate = ingest(url, events, batch)
                    rates.setdefault("PostgreSQL", {}).setdefault(batch, []).append(rate)
                    print(f"round {n + 1}: PostgreSQL, batch {batch}: {show(rate)}", flush=True)
    raw = {
        "events": count,
        "rates": {
            k: {b: [r._asdict() for r in v] for b, v in by.items()} for k, by in rates.items()
        },
    }
    publish(meta, raw, section(rates, count, meta), BEGIN, END, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
