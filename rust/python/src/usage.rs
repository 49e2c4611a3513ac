//! Usage events cross into Python as `gateway.ledger.usage.UsageEvent`, the control plane's
//! typed view of the core's `UsageEvent`: built field by field by name, so the two schemas are
//! one. The first drain checks that the Python class has exactly the core's fields (the names
//! its serialised form, the journal's, uses) and raises otherwise.

use std::collections::HashMap;

use gateway_core::journal::Ended;
use gateway_core::request::Endpoint;
use gateway_core::thread_class;
use gateway_core::usage::{Status, UsageEvent, UsageSource};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyList, PyString, PyTuple, PyType};

/// The Python class events are handed over as.
const MODULE: &str = "gateway.ledger.usage";
const CLASS: &str = "UsageEvent";

#[derive(Debug, Clone, Copy)]
pub enum Field {
    EventId,
    RequestId,
    TenantId,
    KeyId,
    Model,
    Worker,
    Endpoint,
    Stream,
    Status,
    HttpStatus,
    PromptTokens,
    CachedTokens,
    CompletionTokens,
    UsageSource,
    StartedAtMs,
    FinishedAtMs,
}

impl Field {
    fn named(name: &str) -> Option<Self> {
        Some(match name {
            "event_id" => Self::EventId,
            "request_id" => Self::RequestId,
            "tenant_id" => Self::TenantId,
            "key_id" => Self::KeyId,
            "model" => Self::Model,
            "worker" => Self::Worker,
            "endpoint" => Self::Endpoint,
            "stream" => Self::Stream,
            "status" => Self::Status,
            "http_status" => Self::HttpStatus,
            "prompt_tokens" => Self::PromptTokens,
            "cached_tokens" => Self::CachedTokens,
            "completion_tokens" => Self::CompletionTokens,
            "usage_source" => Self::UsageSource,
            "started_at_ms" => Self::StartedAtMs,
            "finished_at_ms" => Self::FinishedAtMs,
            _ => return None,
        })
    }

    fn value<'a, 'py>(
        self,
        strings: &mut Strings<'a, 'py>,
        e: &'a UsageEvent,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = strings.py;
        Ok(match self {
            Self::EventId => PyString::new(py, &e.event_id).into_any(),
            Self::RequestId => PyString::new(py, &e.request_id).into_any(),
            Self::TenantId => strings.of(&e.tenant_id),
            Self::KeyId => strings.of(&e.key_id),
            Self::Model => strings.of(&e.model),
            Self::Worker => match &e.worker {
                Some(worker) => strings.of(worker),
                None => py.None().into_bound(py),
            },
            Self::Endpoint => strings.of(e.endpoint.as_str()),
            Self::Stream => e.stream.into_pyobject(py)?.to_owned().into_any(),
            Self::Status => strings.of(e.status.as_str()),
            Self::HttpStatus => e.http_status.into_pyobject(py)?.into_any(),
            Self::PromptTokens => e.prompt_tokens.into_pyobject(py)?.into_any(),
            Self::CachedTokens => e.cached_tokens.into_pyobject(py)?.into_any(),
            Self::CompletionTokens => e.completion_tokens.into_pyobject(py)?.into_any(),
            Self::UsageSource => strings.of(e.usage_source.as_str()),
            Self::StartedAtMs => e.started_at_ms.into_pyobject(py)?.into_any(),
            Self::FinishedAtMs => e.finished_at_ms.into_pyobject(py)?.into_any(),
        })
    }
}

/// The Python strings of one drain's values that events repeat (tenant, key, model, worker, the
/// names of statuses and endpoints), each made once and shared by every event that has it.
struct Strings<'a, 'py> {
    py: Python<'py>,
    made: HashMap<&'a str, Bound<'py, PyString>>,
}

impl<'a, 'py> Strings<'a, 'py> {
    fn of(&mut self, value: &'a str) -> Bound<'py, PyAny> {
        let py = self.py;
        self.made
            .entry(value)
            .or_insert_with(|| PyString::new(py, value))
            .clone()
            .into_any()
    }
}

/// The core's field names, from the event's serialised form (the journal's), sorted.
pub fn field_names() -> Vec<String> {
    let sample = UsageEvent {
        event_id: "".into(),
        request_id: "".into(),
        tenant_id: "".into(),
        key_id: "".into(),
        model: "".into(),
        worker: None,
        endpoint: Endpoint::Completions,
        stream: false,
        status: Status::Completed,
        http_status: 0,
        prompt_tokens: 0,
        cached_tokens: 0,
        completion_tokens: 0,
        usage_source: UsageSource::None,
        started_at_ms: 0,
        finished_at_ms: 0,
    };
    match serde_json::to_value(sample) {
        Ok(serde_json::Value::Object(members)) => members.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("USAGE_FIELDS", PyTuple::new(m.py(), field_names())?)
}

/// The Python class; for each of its fields in order, the core's field; and `tuple.__new__`,
/// which makes an instance of the (tuple) class without running Python code.
type Class = (Py<PyType>, Vec<Field>, Py<PyAny>);

fn class(py: Python<'_>) -> PyResult<&Class> {
    static CLASS_FIELDS: PyOnceLock<Class> = PyOnceLock::new();
    CLASS_FIELDS.get_or_try_init(py, || {
        let class = py.import(MODULE)?.getattr(CLASS)?.cast_into::<PyType>()?;
        let names: Vec<String> = class.getattr("_fields")?.extract()?;
        let mut sorted = names.clone();
        sorted.sort();
        if sorted != field_names() {
            return Err(PyTypeError::new_err(format!(
                "{MODULE}.{CLASS} has the fields {names:?}; the core's usage event has {:?}",
                field_names()
            )));
        }
        let fields = names
            .iter()
            .filter_map(|name| Field::named(name))
            .collect::<Vec<_>>();
        if fields.len() != names.len() {
            return Err(PyTypeError::new_err(format!(
                "the core cannot hand over every field of {names:?}"
            )));
        }
        if !class.is_subclass_of::<PyTuple>()? {
            return Err(PyTypeError::new_err(format!(
                "{MODULE}.{CLASS} is not a tuple"
            )));
        }
        let new = py.get_type::<PyTuple>().getattr("__new__")?.unbind();
        Ok((class.unbind(), fields, new))
    })
}

/// The core's field of each field of the Python class, in the class's order.
pub fn fields(py: Python<'_>) -> PyResult<&[Field]> {
    Ok(&class(py)?.1)
}

/// One event as an instance of `class`: `tuple.__new__(class, values)`, which runs no Python code.
fn event<'a, 'py>(
    strings: &mut Strings<'a, 'py>,
    (class, new): (&Bound<'py, PyType>, &Bound<'py, PyAny>),
    fields: &[Field],
    event: &'a UsageEvent,
) -> PyResult<Bound<'py, PyAny>> {
    let values = fields
        .iter()
        .map(|field| field.value(strings, event))
        .collect::<PyResult<Vec<_>>>()?;
    new.call1((class, PyTuple::new(strings.py, values)?))
}

/// Drained events as `([UsageEvent], seq of the last one)`, the seq None when none was drained.
pub fn to_python<'py>(py: Python<'py>, drained: &[Ended]) -> PyResult<Bound<'py, PyTuple>> {
    let (class, fields, new) = class(py)?;
    let class = (class.bind(py), new.bind(py));
    let mut strings = Strings {
        py,
        made: HashMap::new(),
    };
    // Thousands of events at saturation: the request threads are offered the core as it goes.
    let events = drained
        .iter()
        .enumerate()
        .map(|(index, ended)| {
            thread_class::offer_core(index);
            event(&mut strings, class, fields, &ended.event)
        })
        .collect::<PyResult<Vec<_>>>()?;
    let last = drained.last().map(|ended| ended.seq);
    (PyList::new(py, events)?, last).into_pyobject(py)
}
