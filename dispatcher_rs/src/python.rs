//! The PyO3 layer: argument conversion, the exception classes, and nothing
//! else. The rules live in `scheduler` and `canonical`, which `cargo test`
//! exercises without an interpreter.
//!
//! Across the boundary go `str`/`bytes` in and small lists of `str` out; the
//! scheduler keeps only Rust data (ids are copied into one arena per step).

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::pybacked::{PyBackedBytes, PyBackedStr};
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple, PyType};

use crate::canonical;
use crate::error::{Error, ErrorKind};
use crate::scheduler::{CallIndex, CallSpec, Scheduler, Submitted};

const MODULE: &str = "dispatch._dispatcher";

/// The exception classes, created once per process when the module loads.
struct Exceptions {
    base: Py<PyType>,
    unknown_call: Py<PyType>,
    invalid_state: Py<PyType>,
    invalid_input: Py<PyType>,
}

static EXCEPTIONS: PyOnceLock<Exceptions> = PyOnceLock::new();

fn new_exception<'py>(
    py: Python<'py>,
    name: &str,
    doc: &str,
    bases: Bound<'py, PyTuple>,
) -> PyResult<Py<PyType>> {
    let namespace = PyDict::new(py);
    namespace.set_item("__module__", MODULE)?;
    namespace.set_item("__doc__", doc)?;
    // `type(name, bases, namespace)`: PyErr::new_type takes a single base, and
    // InvalidInput / UnknownCall also derive from ValueError / LookupError.
    let class = py
        .get_type::<PyType>()
        .call1((name, bases, namespace))?
        .cast_into::<PyType>()?;
    Ok(class.unbind())
}

fn exceptions(py: Python<'_>) -> PyResult<&'static Exceptions> {
    EXCEPTIONS.get_or_try_init(py, || {
        let exception = py.get_type::<pyo3::exceptions::PyException>();
        let base = new_exception(
            py,
            "SchedulerError",
            "Base class of the scheduler's errors.",
            PyTuple::new(py, [exception])?,
        )?;
        let derived = |name: &str, doc: &str, extra: Option<Bound<'_, PyType>>| {
            let mut bases = vec![base.bind(py).clone()];
            bases.extend(extra);
            new_exception(py, name, doc, PyTuple::new(py, bases)?)
        };
        Ok(Exceptions {
            unknown_call: derived(
                "UnknownCall",
                "complete() of an id the scheduler never accepted.",
                Some(py.get_type::<pyo3::exceptions::PyLookupError>()),
            )?,
            invalid_state: derived(
                "InvalidState",
                "An operation the call's or the scheduler's state does not allow: a reused \
                 id, completing a call that is not running, submitting after abort().",
                None,
            )?,
            invalid_input: derived(
                "InvalidInput",
                "Input that is not a JSON document, or a bad constructor argument.",
                Some(py.get_type::<pyo3::exceptions::PyValueError>()),
            )?,
            base,
        })
    })
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        Python::attach(|py| match exceptions(py) {
            Ok(classes) => {
                let class = match err.kind() {
                    ErrorKind::UnknownCall => &classes.unknown_call,
                    ErrorKind::InvalidState => &classes.invalid_state,
                    ErrorKind::InvalidInput => &classes.invalid_input,
                };
                PyErr::from_type(class.bind(py).clone(), err.to_string())
            }
            Err(creating) => creating,
        })
    }
}

/// A tool input as the caller passed it: `str` (its UTF-8 form) or `bytes`.
enum JsonInput {
    Str(PyBackedStr),
    Bytes(PyBackedBytes),
}

impl JsonInput {
    fn extract(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(text) = obj.cast::<PyString>() {
            return match PyBackedStr::try_from(text.clone()) {
                Ok(text) => Ok(Self::Str(text)),
                // Lone surrogates: pass them on as the (invalid) UTF-8 bytes
                // they encode to, so the JSON parser refuses them in order.
                Err(_) => {
                    let encoded = obj.call_method1("encode", ("utf-8", "surrogatepass"))?;
                    Ok(Self::Bytes(encoded.extract()?))
                }
            };
        }
        if let Ok(bytes) = obj.cast::<PyBytes>() {
            return Ok(Self::Bytes(PyBackedBytes::from(bytes.clone())));
        }
        Err(PyTypeError::new_err(format!(
            "input_json must be str or bytes, not {}",
            obj.get_type().name()?
        )))
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Str(text) => text.as_bytes(),
            Self::Bytes(bytes) => bytes,
        }
    }
}

/// The scheduling state machine of one step's tool calls.
#[pyclass(module = "dispatch._dispatcher", name = "Scheduler")]
pub struct PyScheduler {
    core: Scheduler,
    /// Reused output buffer for the calls a single operation starts.
    started: Vec<CallIndex>,
}

impl PyScheduler {
    fn id_list<'py>(&self, py: Python<'py>, calls: &[CallIndex]) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, calls.iter().map(|&c| self.core.id(c)))
    }

    fn take_started<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = self.id_list(py, &self.started);
        self.started.clear();
        list
    }
}

#[pymethods]
impl PyScheduler {
    #[new]
    #[pyo3(
        signature = (max_concurrent = 0, tool_limits = None, dedup_exempt = None),
        text_signature = "(max_concurrent=0, tool_limits=None, dedup_exempt=())"
    )]
    fn new(
        max_concurrent: i64,
        tool_limits: Option<&Bound<'_, PyAny>>,
        dedup_exempt: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let mut limits: Vec<(PyBackedStr, i64)> = Vec::new();
        if let Some(mapping) = tool_limits {
            for item in mapping.call_method0("items")?.try_iter()? {
                limits.push(item?.extract()?);
            }
        }
        let mut exempt: Vec<PyBackedStr> = Vec::new();
        if let Some(names) = dedup_exempt {
            if names.is_instance_of::<PyString>() {
                return Err(PyTypeError::new_err(
                    "dedup_exempt must be an iterable of tool names, not a str",
                ));
            }
            for name in names.try_iter()? {
                exempt.push(name?.extract()?);
            }
        }
        let core = Scheduler::new(
            max_concurrent,
            limits.iter().map(|(name, limit)| (&**name, *limit)),
            exempt.iter().map(|name| &**name),
        )?;
        Ok(Self {
            core,
            started: Vec::new(),
        })
    }

    /// Register a call: (ids that may start now, id of the call this one duplicates).
    fn submit<'py>(
        &mut self,
        py: Python<'py>,
        id: &str,
        tool_name: &str,
        input_json: &Bound<'py, PyAny>,
        concurrency_safe: bool,
    ) -> PyResult<(Bound<'py, PyList>, Option<Bound<'py, PyString>>)> {
        let input = JsonInput::extract(input_json)?;
        self.started.clear();
        let duplicate_of = self.core.submit(
            id,
            tool_name,
            input.as_bytes(),
            concurrency_safe,
            &mut self.started,
        )?;
        let started = self.take_started(py)?;
        let duplicate_of = duplicate_of.map(|c| PyString::new(py, self.core.id(c)));
        Ok((started, duplicate_of))
    }

    /// submit() for each call, in one crossing; all or nothing.
    fn submit_many<'py>(
        &mut self,
        py: Python<'py>,
        calls: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let mut owned = Vec::new();
        for item in calls.try_iter()? {
            let (id, tool_name, input, safe): (PyBackedStr, PyBackedStr, Bound<'py, PyAny>, bool) =
                item?.extract()?;
            owned.push((id, tool_name, JsonInput::extract(&input)?, safe));
        }
        let specs: Vec<CallSpec<'_>> = owned
            .iter()
            .map(|(id, tool_name, input, safe)| CallSpec {
                id,
                tool_name,
                input_json: input.as_bytes(),
                concurrency_safe: *safe,
            })
            .collect();
        let mut results: Vec<Submitted> = Vec::with_capacity(specs.len());
        self.started.clear();
        self.core
            .submit_many(&specs, &mut self.started, &mut results)?;
        let mut begin = 0;
        let tuples = results.iter().map(|result| {
            let started = self.id_list(py, &self.started[begin..result.started_end])?;
            begin = result.started_end;
            let duplicate_of = result
                .duplicate_of
                .map(|c| PyString::new(py, self.core.id(c)));
            (started, duplicate_of).into_pyobject(py)
        });
        let tuples = tuples.collect::<PyResult<Vec<_>>>()?;
        self.started.clear();
        PyList::new(py, tuples)
    }

    /// A running call finished: the ids that may start next.
    fn complete<'py>(&mut self, py: Python<'py>, id: &str) -> PyResult<Bound<'py, PyList>> {
        self.started.clear();
        self.core.complete(id, &mut self.started)?;
        self.take_started(py)
    }

    /// Close the scheduler: the queued ids that never started, in queue order.
    fn abort<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let aborted = self.core.abort();
        self.id_list(py, &aborted)
    }

    /// The queued ids, in queue order.
    #[getter]
    fn queued<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.id_list(py, &self.core.queued())
    }

    /// The running ids, in start order.
    #[getter]
    fn running<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.id_list(py, &self.core.running())
    }

    /// Whether abort() was called.
    #[getter]
    fn closed(&self) -> bool {
        self.core.is_closed()
    }
}

/// The canonical form of a JSON document, as compact JSON bytes (the dedup key).
#[pyfunction]
fn canonical_key<'py>(
    py: Python<'py>,
    input_json: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let input = JsonInput::extract(input_json)?;
    let key = canonical::canonical_key(input.as_bytes()).map_err(|err| Error::InvalidArgument {
        message: format!("input is not valid JSON: {err}"),
    })?;
    Ok(PyBytes::new(py, &key))
}

pub fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", crate::VERSION)?;
    m.add_class::<PyScheduler>()?;
    m.add_function(wrap_pyfunction!(canonical_key, m)?)?;
    let classes = exceptions(py)?;
    m.add("SchedulerError", classes.base.clone_ref(py))?;
    m.add("UnknownCall", classes.unknown_call.clone_ref(py))?;
    m.add("InvalidState", classes.invalid_state.clone_ref(py))?;
    m.add("InvalidInput", classes.invalid_input.clone_ref(py))?;
    Ok(())
}
