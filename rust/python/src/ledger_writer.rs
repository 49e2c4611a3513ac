//! The SQLite ledger's usage write path, in native code: `gateway.ledger.usage`'s
//! `insert_usage_events` runs it for a SQLite ledger when the process has one SQLite library (see
//! `gateway.ledger.db`). Its contract is that function's, which PostgreSQL's write path keeps
//! running in Python, and the tests hold the two to the same results:
//!
//! - one write transaction (`BEGIN IMMEDIATE`) per batch; events already stored, or repeated in
//!   the batch, are stored once, and a repeat with another payload is a conflict the caller logs
//!   (the first one stays);
//! - token classes disjoint (`prompt_tokens` less the cached ones, cached capped at the prompt);
//! - priced at the price version in effect at the event's start (`Price::cost`, the budgets'
//!   rounding, at most `MAX_COUNT`), unpriced (NULL) without one;
//! - `seq` numbers following the ledger's last, in the batch's order;
//! - the rollups of each width summed per batch and added in the same transaction.
//!
//! The caller has migrated the ledger and put it in WAL mode; the writer only writes.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use gateway_core::quota::Price;
use gateway_core::usage::Usage;
use pyo3::Borrowed;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, TransactionBehavior, params_from_iter};

use crate::errors::{LedgerIntegrityError, LedgerWriteError};
use crate::usage::{self, Field};

/// `gateway.bounds.MAX_COUNT`: the most a count or an amount may be, so that it fits a BIGINT
/// and a JSON number alike.
const MAX_COUNT: u64 = (1 << 53) - 1;
/// Ids per `IN (...)` list: under SQLite's smallest limit of bound parameters.
const CHUNK: usize = 500;
/// The rollups' widths, each dividing the next: minutes, hours, days.
const WIDTHS: [(&str, i64); 3] = [("1m", 60_000), ("1h", 3_600_000), ("1d", 86_400_000)];

/// One event as the caller's `UsageEvent` holds it, token classes as the worker reported them;
/// its strings borrowed from the Python objects, which the caller keeps alive (and Python never
/// changes a `str`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event<'a> {
    event_id: &'a str,
    request_id: &'a str,
    tenant_id: &'a str,
    key_id: &'a str,
    model: &'a str,
    worker: Option<&'a str>,
    endpoint: &'a str,
    stream: bool,
    status: &'a str,
    http_status: i64,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
    usage_source: &'a str,
    started_at_ms: i64,
    finished_at_ms: i64,
}

impl<'a> Event<'a> {
    fn from_python(fields: &[Field], tuple: &'a Bound<'_, PyTuple>) -> PyResult<Self> {
        if tuple.len() != fields.len() {
            return Err(PyValueError::new_err(format!(
                "a usage event has {} fields, not {}",
                fields.len(),
                tuple.len()
            )));
        }
        let mut event = Self {
            event_id: "",
            request_id: "",
            tenant_id: "",
            key_id: "",
            model: "",
            worker: None,
            endpoint: "",
            stream: false,
            status: "",
            http_status: 0,
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            usage_source: "",
            started_at_ms: 0,
            finished_at_ms: 0,
        };
        for (index, field) in fields.iter().enumerate() {
            let value = tuple.get_borrowed_item(index)?;
            match field {
                Field::EventId => event.event_id = value.extract()?,
                Field::RequestId => event.request_id = value.extract()?,
                Field::TenantId => event.tenant_id = value.extract()?,
                Field::KeyId => event.key_id = value.extract()?,
                Field::Model => event.model = value.extract()?,
                Field::Worker => event.worker = value.extract()?,
                Field::Endpoint => event.endpoint = value.extract()?,
                Field::Stream => event.stream = value.extract()?,
                Field::Status => event.status = value.extract()?,
                Field::HttpStatus => event.http_status = value.extract()?,
                Field::PromptTokens => event.prompt_tokens = count(value)?,
                Field::CachedTokens => event.cached_tokens = count(value)?,
                Field::CompletionTokens => event.completion_tokens = count(value)?,
                Field::UsageSource => event.usage_source = value.extract()?,
                Field::StartedAtMs => event.started_at_ms = value.extract()?,
                Field::FinishedAtMs => event.finished_at_ms = value.extract()?,
            }
        }
        Ok(event)
    }

    /// Cached tokens (capped at the prompt), and the prompt tokens not served from cache.
    fn disjoint(&self) -> (u64, u64) {
        let cached = self.cached_tokens.min(self.prompt_tokens);
        (self.prompt_tokens - cached, cached)
    }

    /// The event's columns as the ledger stores them, in `gateway.ledger.usage._FIELDS`' order:
    /// what a stored event is compared with.
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
            Value::Integer(as_bigint(prompt)),
            Value::Integer(as_bigint(cached)),
            Value::Integer(as_bigint(self.completion_tokens)),
            text(self.usage_source),
            Value::Integer(self.started_at_ms),
            Value::Integer(self.finished_at_ms),
        ]
    }
}

/// A token count: an integer from 0 to `i64::MAX`, what a BIGINT holds.
fn count(value: Borrowed<'_, '_, PyAny>) -> PyResult<u64> {
    let count: u64 = value.extract()?;
    if i64::try_from(count).is_err() {
        return Err(PyValueError::new_err(format!(
            "a token count of {count} does not fit the ledger"
        )));
    }
    Ok(count)
}

/// `value` (at most `i64::MAX`: `count` checked it, and disjoint classes are no larger) as a
/// BIGINT.
fn as_bigint(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Why a batch was not stored: the transaction was rolled back, and nothing of it is stored.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Invalid(String),
}

/// An event whose id is already stored, or earlier in its batch, with another payload.
struct Conflict {
    kept: Vec<Value>,
    new: Vec<Value>,
    /// Whether the kept one is stored (else it is earlier in the batch).
    stored: bool,
}

/// The price versions of a model: effective at, and the prices, by time.
type Versions = Vec<(i64, Price)>;

/// One rollup row's sums: requests, prompt, cached and completion tokens, cost, unpriced
/// requests.
type Sums = [i64; 6];
/// A rollup row's key: bucket start, tenant, key, model.
type Bucket<'a> = (i64, &'a str, &'a str, &'a str);

#[pyclass(module = "gateway._core", frozen)]
pub struct SqliteUsageWriter {
    conn: Mutex<Option<Connection>>,
    fields: Vec<Field>,
}

#[pymethods]
impl SqliteUsageWriter {
    /// Opens the migrated ledger at `path`; a write waits up to `busy_timeout_ms` for the lock.
    #[new]
    fn new(py: Python<'_>, path: PathBuf, busy_timeout_ms: u64) -> PyResult<Self> {
        let fields = usage::fields(py)?.to_vec();
        let conn = open(&path, busy_timeout_ms)
            .map_err(|error| LedgerWriteError::new_err(error.to_string()))?;
        Ok(Self {
            conn: Mutex::new(Some(conn)),
            fields,
        })
    }

    /// Stores `events` (`gateway.ledger.usage.UsageEvent`s) in one transaction, recorded at
    /// `recorded_at_ms`; returns how many were new, and the conflicts as
    /// `(kept, new, kept_is_stored)`, each event as its stored columns.
    fn insert<'py>(
        &self,
        py: Python<'py>,
        events: &Bound<'py, PyList>,
        recorded_at_ms: i64,
    ) -> PyResult<(usize, Bound<'py, PyList>)> {
        // An event the schema cannot take fails the batch before it starts, as the database
        // would have failed it.
        let refused = |index: usize, error: PyErr| {
            LedgerIntegrityError::new_err(format!("usage event {index} of the batch: {error}"))
        };
        let tuples = events
            .iter()
            .enumerate()
            .map(|(index, event)| {
                event
                    .cast_into::<PyTuple>()
                    .map_err(|error| refused(index, error.into()))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let events = tuples
            .iter()
            .enumerate()
            .map(|(index, tuple)| {
                Event::from_python(&self.fields, tuple).map_err(|error| refused(index, error))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let written = py.detach(|| {
            let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
            let conn = conn
                .as_mut()
                .ok_or_else(|| WriteError::Invalid("the usage writer is closed".into()))?;
            write(conn, &events, recorded_at_ms)
        });
        let (inserted, conflicts) = written.map_err(|error| match error {
            WriteError::Sqlite(rusqlite::Error::SqliteFailure(failure, _))
                if failure.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                LedgerIntegrityError::new_err(error.to_string())
            }
            _ => LedgerWriteError::new_err(error.to_string()),
        })?;
        let conflicts = conflicts
            .into_iter()
            .map(|conflict| {
                (
                    row(py, conflict.kept)?,
                    row(py, conflict.new)?,
                    conflict.stored,
                )
                    .into_pyobject(py)
            })
            .collect::<PyResult<Vec<_>>>()?;
        Ok((inserted, PyList::new(py, conflicts)?))
    }

    /// Closes the connection; later writes fail.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let conn = py.detach(|| {
            self.conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
        });
        if let Some(conn) = conn {
            conn.close()
                .map_err(|(_, error)| LedgerWriteError::new_err(error.to_string()))?;
        }
        Ok(())
    }
}

/// A stored column's value as Python's `sqlite3` gives it.
fn python(py: Python<'_>, value: Value) -> PyResult<Bound<'_, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Integer(n) => n.into_pyobject(py)?.into_any(),
        Value::Real(x) => x.into_pyobject(py)?.into_any(),
        Value::Text(s) => s.into_pyobject(py)?.into_any(),
        Value::Blob(b) => b.into_pyobject(py)?.into_any(),
    })
}

/// An event's stored columns as a tuple.
fn row<'py>(py: Python<'py>, values: Vec<Value>) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(
        py,
        values
            .into_iter()
            .map(|value| python(py, value))
            .collect::<PyResult<Vec<_>>>()?,
    )
}

fn open(path: &PathBuf, busy_timeout_ms: u64) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_millis(busy_timeout_ms))?;
    // As every connection of the ledger's: each committed batch survives a power cut.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// Stores `events` in one transaction; see the module's contract.
fn write(
    conn: &mut Connection,
    events: &[Event<'_>],
    recorded_at_ms: i64,
) -> Result<(usize, Vec<Conflict>), WriteError> {
    let mut conflicts = Vec::new();
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
                    conflicts.push(Conflict {
                        kept,
                        new,
                        stored: false,
                    });
                }
            }
        }
    }
    if batch.is_empty() {
        return Ok((0, conflicts));
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut stored = vec![false; batch.len()];
    for chunk in batch.chunks(CHUNK) {
        let sql = format!(
            "SELECT {} FROM usage_events WHERE event_id IN ({})",
            COLUMNS[..16].join(", "),
            vec!["?"; chunk.len()].join(", ")
        );
        let mut select = tx.prepare_cached(&sql)?;
        let mut rows = select.query(params_from_iter(chunk.iter().map(|e| &e.event_id)))?;
        while let Some(row) = rows.next()? {
            let kept = (0..16)
                .map(|i| row.get::<_, Value>(i))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let Value::Text(id) = &kept[0] else {
                return Err(WriteError::Invalid("a stored event without an id".into()));
            };
            let Some(&at) = first.get(id.as_str()) else {
                continue;
            };
            stored[at] = true;
            let new = batch[at].row();
            if kept != new {
                conflicts.push(Conflict {
                    kept,
                    new,
                    stored: true,
                });
            }
        }
    }
    let new: Vec<&Event<'_>> = batch
        .iter()
        .zip(&stored)
        .filter_map(|(event, stored)| (!stored).then_some(*event))
        .collect();
    if new.is_empty() {
        tx.commit()?;
        return Ok((0, conflicts));
    }
    let last: Option<i64> =
        tx.query_row("SELECT MAX(seq) FROM usage_events", [], |row| row.get(0))?;
    let prices = price_book(&tx, &new)?;
    let mut seq = last.unwrap_or(0);
    let mut minutes: HashMap<Bucket, Sums> = HashMap::new();
    {
        let sql = format!(
            "INSERT INTO usage_events ({}) VALUES ({})",
            COLUMNS.join(", "),
            vec!["?"; COLUMNS.len()].join(", ")
        );
        let mut insert = tx.prepare_cached(&sql)?;
        for event in &new {
            seq += 1;
            let (prompt, cached) = event.disjoint();
            let version = prices.get(event.model).and_then(|versions| {
                let at = versions
                    .partition_point(|(effective_at, _)| *effective_at <= event.started_at_ms);
                at.checked_sub(1).map(|at| versions[at])
            });
            let priced = version.map(|(effective_at, price)| {
                let usage = Usage {
                    prompt_tokens: event.prompt_tokens,
                    completion_tokens: event.completion_tokens,
                    cached_tokens: event.cached_tokens,
                };
                (effective_at, as_bigint(price.cost(&usage).min(MAX_COUNT)))
            });
            insert.execute(rusqlite::params![
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
                as_bigint(prompt),
                as_bigint(cached),
                as_bigint(event.completion_tokens),
                event.usage_source,
                event.started_at_ms,
                event.finished_at_ms,
                seq,
                priced.map(|(effective_at, _)| effective_at),
                priced.map(|(_, cost)| cost),
                recorded_at_ms,
            ])?;
            let bucket = (
                event.started_at_ms - event.started_at_ms.rem_euclid(WIDTHS[0].1),
                event.tenant_id,
                event.key_id,
                event.model,
            );
            let sums = [
                1,
                as_bigint(prompt),
                as_bigint(cached),
                as_bigint(event.completion_tokens),
                priced.map_or(0, |(_, cost)| cost),
                i64::from(priced.is_none()),
            ];
            add(minutes.entry(bucket).or_insert([0; 6]), &sums)?;
        }
    }
    add_to_rollups(&tx, minutes)?;
    tx.commit()?;
    Ok((new.len(), conflicts))
}

/// The columns an event is stored with: `gateway.ledger.usage._FIELDS`, then its pricing.
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

/// Adds `more` to `sums`; an error where a sum would pass `i64::MAX`, which a BIGINT holds.
fn add(sums: &mut Sums, more: &Sums) -> Result<(), WriteError> {
    for (sum, more) in sums.iter_mut().zip(more) {
        *sum = sum
            .checked_add(*more)
            .ok_or_else(|| WriteError::Invalid("a rollup sum does not fit a BIGINT".into()))?;
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
         unpriced_requests) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (bucket_width, bucket_start, tenant_id, key_id, model) DO UPDATE SET \
         requests = usage_rollups.requests + excluded.requests, \
         prompt_tokens = usage_rollups.prompt_tokens + excluded.prompt_tokens, \
         cached_tokens = usage_rollups.cached_tokens + excluded.cached_tokens, \
         completion_tokens = usage_rollups.completion_tokens + excluded.completion_tokens, \
         cost_micros = usage_rollups.cost_micros + excluded.cost_micros, \
         unpriced_requests = usage_rollups.unpriced_requests + excluded.unpriced_requests",
    )?;
    let mut level = minutes;
    for (index, (width, _)) in WIDTHS.iter().enumerate() {
        let mut coarser: HashMap<Bucket, Sums> = HashMap::new();
        for ((start, tenant, key, model), sums) in level {
            upsert.execute(rusqlite::params![
                width, start, tenant, key, model, sums[0], sums[1], sums[2], sums[3], sums[4],
                sums[5],
            ])?;
            if let Some((_, next)) = WIDTHS.get(index + 1) {
                let bucket = (start - start.rem_euclid(*next), tenant, key, model);
                add(coarser.entry(bucket).or_insert([0; 6]), &sums)?;
            }
        }
        level = coarser;
    }
    Ok(())
}
