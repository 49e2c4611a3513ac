//! The SQLite ledger's usage write path: `gateway.ledger.usage.insert_usage_events`' contract, which
//! the control plane runs through this for a SQLite ledger (via the extension) and through SQL on
//! PostgreSQL; its tests hold the two to the same results:
//!
//! - one write transaction (`BEGIN IMMEDIATE`) per batch; events already stored, or repeated in
//!   the batch, are stored once, and a repeat with another payload is a `Conflict` the caller
//!   logs (the first one stays);
//! - token classes disjoint (`prompt_tokens` less the cached ones, cached capped at the prompt);
//! - priced at the price version in effect at the event's start (`Price::cost`, the budgets'
//!   rounding, at most `MAX_COST`), unpriced (NULL) without one;
//! - `seq` numbers following the ledger's last, in the batch's order;
//! - the rollups of each width summed per batch and added in the same transaction.
//!
//! The control plane owns the schema (its migrations) and puts the file in WAL mode; this only
//! writes. It links the system's SQLite: in a process where Python's `sqlite3` opens the same file,
//! the two must run one library (the control plane checks it before opening a writer).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::Path;
use std::time::Duration;

pub use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, TransactionBehavior, params_from_iter};

use crate::thread_class;
use crate::usage::{Price, Usage};

/// The most a stored cost may be (`gateway.bounds.MAX_COUNT`): it fits a BIGINT and a JSON
/// number alike.
pub const MAX_COST: u64 = (1 << 53) - 1;
/// Ids per `IN (...)` list: under SQLite's smallest limit of bound parameters.
const CHUNK: usize = 500;
/// The rollups' widths, each dividing the next: minutes, hours, days.
const WIDTHS: [(&str, i64); 3] = [("1m", 60_000), ("1h", 3_600_000), ("1d", 86_400_000)];
/// Columns of `gateway.ledger.usage.UsageEvent`, as the ledger stores them: a stored event's
/// identity, what a repeat is compared by.
const EVENT_COLUMNS: usize = 16;
/// The columns an event is stored with: the event's, then its pricing.
const COLUMNS: [&str; 20] = [
    "event_id",
    "request_id",
    "tenant_id",
    "key_id",
    "model",
    "worker",
    "endpoint",
    "stream",
    "status",
    "http_status",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "usage_source",
    "started_at_ms",
    "finished_at_ms",
    "seq",
    "price_effective_at",
    "cost_micros",
    "recorded_at_ms",
];

/// One usage event as the control plane hands it over, token classes as the worker reported them
/// (cached tokens inside the prompt's); its strings borrowed from the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event<'a> {
    pub event_id: &'a str,
    pub request_id: &'a str,
    pub tenant_id: &'a str,
    pub key_id: &'a str,
    pub model: &'a str,
    pub worker: Option<&'a str>,
    pub endpoint: &'a str,
    pub stream: bool,
    pub status: &'a str,
    pub http_status: i64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub usage_source: &'a str,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
}

impl Event<'_> {
    /// The prompt tokens not served from cache, and the cached ones (capped at the prompt).
    fn disjoint(&self) -> (i64, i64) {
        let cached = self.cached_tokens.min(self.prompt_tokens);
        (
            bigint(self.prompt_tokens.saturating_sub(cached)),
            bigint(cached),
        )
    }

    /// The event's columns as the ledger stores them (`EVENT_COLUMNS`): what a stored event is
    /// compared with, and what a conflict shows.
    fn row(&self) -> Vec<Value> {
        let (prompt, cached) = self.disjoint();
        let text = |value: &str| Value::Text(value.to_owned());
        vec![
            text(self.event_id),
            text(self.request_id),
            text(self.tenant_id),
            text(self.key_id),
            text(self.model),
            self.worker.map_or(Value::Null, text),
            text(self.endpoint),
            Value::Integer(i64::from(self.stream)),
            text(self.status),
            Value::Integer(self.http_status),
            Value::Integer(prompt),
            Value::Integer(cached),
            Value::Integer(bigint(self.completion_tokens)),
            text(self.usage_source),
            Value::Integer(self.started_at_ms),
            Value::Integer(self.finished_at_ms),
        ]
    }

    /// Whether every count fits a BIGINT.
    fn fits(&self) -> bool {
        [
            self.prompt_tokens,
            self.cached_tokens,
            self.completion_tokens,
        ]
        .iter()
        .all(|&count| i64::try_from(count).is_ok())
    }
}

/// `value` as a BIGINT: `Event::fits` checked it before anything is stored.
fn bigint(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Why a batch was not stored: its transaction was rolled back, and none of it is stored.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// An event the schema cannot take (a count or a sum beyond a BIGINT, a negative price).
    #[error("{0}")]
    Invalid(String),
}

impl WriteError {
    /// Whether the batch broke a rule of the schema (a value it refuses, a uniqueness rule),
    /// rather than the database failing.
    pub fn is_integrity(&self) -> bool {
        match self {
            Self::Invalid(_) => true,
            Self::Sqlite(rusqlite::Error::SqliteFailure(failure, _)) => {
                failure.code == rusqlite::ErrorCode::ConstraintViolation
            }
            Self::Sqlite(_) => false,
        }
    }
}

/// An event whose id is already stored, or earlier in its batch, with another payload; each as
/// its stored columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub kept: Vec<Value>,
    pub new: Vec<Value>,
    /// Whether the kept one is stored (else it is earlier in the batch).
    pub stored: bool,
}

/// What a batch did: how many of its events were new, and its conflicts.
#[derive(Debug, Default)]
pub struct Written {
    pub inserted: usize,
    pub conflicts: Vec<Conflict>,
}

/// The price versions of a model: effective at, and the prices, by time.
type Versions = Vec<(i64, Price)>;
/// One rollup row's sums: requests, prompt, cached and completion tokens, cost, unpriced
/// requests, failed requests (status `failed` or `interrupted`).
type Sums = [i64; 7];
/// A rollup row's key: bucket start, tenant, key, model.
type Bucket<'a> = (i64, &'a str, &'a str, &'a str);

/// A connection that writes usage events into a migrated SQLite ledger.
#[derive(Debug)]
pub struct UsageWriter {
    conn: Connection,
}

impl UsageWriter {
    /// Opens the ledger at `path`; a write waits up to `busy_timeout` for the write lock.
    pub fn open(path: &Path, busy_timeout: Duration) -> Result<Self, WriteError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(busy_timeout)?;
        // As every connection of the ledger's: each committed batch survives a power cut.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Ok(Self { conn })
    }

    pub fn close(self) -> Result<(), WriteError> {
        self.conn.close().map_err(|(_, error)| error.into())
    }

    /// Stores `events` in one transaction, recorded at `recorded_at_ms`; see the module's
    /// contract.
    pub fn write(
        &mut self,
        events: &[Event<'_>],
        recorded_at_ms: i64,
    ) -> Result<Written, WriteError> {
        if let Some(at) = events.iter().position(|event| !event.fits()) {
            return Err(WriteError::Invalid(format!(
                "usage event {at} of the batch has a token count beyond a BIGINT"
            )));
        }
        let mut written = Written::default();
        // The batch's first event of each id, in the batch's order.
        let mut first: HashMap<&str, usize> = HashMap::with_capacity(events.len());
        let mut batch: Vec<&Event<'_>> = Vec::with_capacity(events.len());
        for event in events {
            match first.entry(event.event_id) {
                Entry::Vacant(vacant) => {
                    vacant.insert(batch.len());
                    batch.push(event);
                }
                Entry::Occupied(occupied) => {
                    let (kept, new) = (batch[*occupied.get()].row(), event.row());
                    if kept != new {
                        written.conflicts.push(Conflict {
                            kept,
                            new,
                            stored: false,
                        });
                    }
                }
            }
        }
        if batch.is_empty() {
            return Ok(written);
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        written.inserted = insert(&tx, &batch, recorded_at_ms, &mut written.conflicts)?;
        tx.commit()?;
        Ok(written)
    }
}

/// The stored columns of the event `event_id`, which the ledger holds.
fn stored(conn: &Connection, event_id: &str) -> Result<Vec<Value>, WriteError> {
    let sql = format!(
        "SELECT {} FROM usage_events WHERE event_id = ?",
        COLUMNS[..EVENT_COLUMNS].join(", ")
    );
    let mut select = conn.prepare_cached(&sql)?;
    let kept = select.query_row([event_id], |row| {
        (0..EVENT_COLUMNS)
            .map(|i| row.get::<_, Value>(i))
            .collect::<rusqlite::Result<Vec<_>>>()
    })?;
    Ok(kept)
}

/// Prices, numbers and inserts those of `events` the ledger does not hold, and adds them to the
/// rollups; returns how many it inserted. An event the ledger holds with another payload is a
/// conflict. The ledger's unique index on `event_id` finds those it holds: an insert it refuses
/// changes nothing, and only then is the stored event read.
/// A batch is milliseconds of CPU, which the gateway's request threads may be waiting for: it
/// offers them the core as it goes (`thread_class::offer_core`).
fn insert(
    conn: &Connection,
    events: &[&Event<'_>],
    recorded_at_ms: i64,
    conflicts: &mut Vec<Conflict>,
) -> Result<usize, WriteError> {
    let last: Option<i64> =
        conn.query_row("SELECT MAX(seq) FROM usage_events", [], |row| row.get(0))?;
    let mut seq = last.unwrap_or(0);
    let mut inserted = 0_usize;
    let prices = price_book(conn, events)?;
    let mut minutes: HashMap<Bucket<'_>, Sums> = HashMap::new();
    let sql = format!(
        "INSERT INTO usage_events ({}) VALUES ({}) ON CONFLICT (event_id) DO NOTHING",
        COLUMNS.join(", "),
        vec!["?"; COLUMNS.len()].join(", ")
    );
    let mut statement = conn.prepare_cached(&sql)?;
    for (index, event) in events.iter().enumerate() {
        thread_class::offer_core(index);
        let next = seq
            .checked_add(1)
            .ok_or_else(|| WriteError::Invalid("the ledger's seq is at its largest".into()))?;
        let (prompt, cached) = event.disjoint();
        let version = prices.get(event.model).and_then(|versions| {
            let after = versions.partition_point(|(at, _)| *at <= event.started_at_ms);
            after.checked_sub(1).map(|at| versions[at])
        });
        let priced = version.map(|(effective_at, price)| {
            let usage = Usage {
                prompt_tokens: event.prompt_tokens,
                completion_tokens: event.completion_tokens,
                cached_tokens: event.cached_tokens,
            };
            (effective_at, bigint(price.cost(&usage).min(MAX_COST)))
        });
        let changed = statement.execute(rusqlite::params![
            event.event_id,
            event.request_id,
            event.tenant_id,
            event.key_id,
            event.model,
            event.worker,
            event.endpoint,
            event.stream,
            event.status,
            event.http_status,
            prompt,
            cached,
            bigint(event.completion_tokens),
            event.usage_source,
            event.started_at_ms,
            event.finished_at_ms,
            next,
            priced.map(|(effective_at, _)| effective_at),
            priced.map(|(_, cost)| cost),
            recorded_at_ms,
        ])?;
        if changed == 0 {
            let (kept, new) = (stored(conn, event.event_id)?, event.row());
            if kept != new {
                conflicts.push(Conflict {
                    kept,
                    new,
                    stored: true,
                });
            }
            continue;
        }
        seq = next;
        inserted = inserted.saturating_add(1);
        let minute = bucket_start(event.started_at_ms, WIDTHS[0].1);
        let sums = [
            1,
            prompt,
            cached,
            bigint(event.completion_tokens),
            priced.map_or(0, |(_, cost)| cost),
            i64::from(priced.is_none()),
            i64::from(matches!(event.status, "failed" | "interrupted")),
        ];
        let bucket = (minute, event.tenant_id, event.key_id, event.model);
        add(minutes.entry(bucket).or_insert([0; 7]), &sums)?;
    }
    add_to_rollups(conn, minutes)?;
    Ok(inserted)
}

/// The start of the bucket of `width` ms holding `at` (UTC-aligned: a multiple of `width`).
fn bucket_start(at: i64, width: i64) -> i64 {
    at.saturating_sub(at.rem_euclid(width))
}

/// Adds `more` to `sums`; an error where a sum would pass `i64::MAX`, which a BIGINT holds.
fn add(sums: &mut Sums, more: &Sums) -> Result<(), WriteError> {
    for (sum, more) in sums.iter_mut().zip(more) {
        *sum = sum
            .checked_add(*more)
            .ok_or_else(|| WriteError::Invalid("a rollup sum beyond a BIGINT".into()))?;
    }
    Ok(())
}

/// The price versions of the models of `events`, by model.
fn price_book(
    conn: &Connection,
    events: &[&Event<'_>],
) -> Result<HashMap<String, Versions>, WriteError> {
    let mut models: Vec<&str> = events.iter().map(|e| e.model).collect();
    models.sort_unstable();
    models.dedup();
    let mut book: HashMap<String, Versions> = HashMap::new();
    for chunk in models.chunks(CHUNK) {
        let sql = format!(
            "SELECT model, effective_at, prompt_per_mtok, cached_per_mtok, completion_per_mtok \
             FROM prices WHERE model IN ({}) ORDER BY model, effective_at",
            vec!["?"; chunk.len()].join(", ")
        );
        let mut select = conn.prepare_cached(&sql)?;
        let mut rows = select.query(params_from_iter(chunk))?;
        while let Some(row) = rows.next()? {
            let price = |i: usize| -> Result<u64, WriteError> {
                u64::try_from(row.get::<_, i64>(i)?)
                    .map_err(|_| WriteError::Invalid("a negative price".into()))
            };
            let version = (
                row.get::<_, i64>(1)?,
                Price {
                    prompt: price(2)?,
                    cached: price(3)?,
                    completion: price(4)?,
                },
            );
            book.entry(row.get(0)?).or_default().push(version);
        }
    }
    Ok(book)
}

/// Adds the batch's sums per minute bucket, and per hour and day summed from them, to the
/// rollups: one upsert per rollup row.
fn add_to_rollups(conn: &Connection, minutes: HashMap<Bucket<'_>, Sums>) -> Result<(), WriteError> {
    let mut upsert = conn.prepare_cached(
        "INSERT INTO usage_rollups (bucket_width, bucket_start, tenant_id, key_id, model, \
         requests, prompt_tokens, cached_tokens, completion_tokens, cost_micros, \
         unpriced_requests, failed_requests) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (bucket_width, bucket_start, tenant_id, key_id, model) DO UPDATE SET \
         requests = usage_rollups.requests + excluded.requests, \
         prompt_tokens = usage_rollups.prompt_tokens + excluded.prompt_tokens, \
         cached_tokens = usage_rollups.cached_tokens + excluded.cached_tokens, \
         completion_tokens = usage_rollups.completion_tokens + excluded.completion_tokens, \
         cost_micros = usage_rollups.cost_micros + excluded.cost_micros, \
         unpriced_requests = usage_rollups.unpriced_requests + excluded.unpriced_requests, \
         failed_requests = usage_rollups.failed_requests + excluded.failed_requests",
    )?;
    let mut level = minutes;
    for (index, (width, _)) in WIDTHS.iter().enumerate() {
        let mut coarser: HashMap<Bucket<'_>, Sums> = HashMap::new();
        for ((start, tenant, key, model), sums) in level {
            upsert.execute(rusqlite::params![
                width, start, tenant, key, model, sums[0], sums[1], sums[2], sums[3], sums[4],
                sums[5], sums[6],
            ])?;
            if let Some((_, next)) = WIDTHS.get(index + 1) {
                let bucket = (bucket_start(start, *next), tenant, key, model);
                add(coarser.entry(bucket).or_insert([0; 7]), &sums)?;
            }
        }
        level = coarser;
    }
    Ok(())
}
