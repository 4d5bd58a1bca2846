//! `dispatch._dispatcher`: the native half of Dispatch's tool-dispatch
//! scheduler. Private; Python code imports it through `dispatch.dispatcher`.
//!
//! This first cut carries only the build and import path (version and ABI
//! check); the scheduler state machine lands on top of it.

use pyo3::prelude::*;

/// The crate version, so the facade can refuse a stale build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[pymodule]
fn _dispatcher(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", VERSION)?;
    Ok(())
}
