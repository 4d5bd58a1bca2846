//! `dispatch._dispatcher`: the native half of Dispatch's tool-dispatch
//! scheduler. Private; Python code imports it through `dispatch.dispatcher`.
//!
//! The logic is plain Rust that `cargo test` runs without an interpreter:
//! [`scheduler`] (the state machine of one step's tool calls) and
//! [`canonical`] (canonical JSON for dedup keys), with [`error`] their one
//! error type, and `canonical_fast` the allocation-light path of canonical.
//! `python` is the thin PyO3 layer over them.

pub mod canonical;
mod canonical_fast;
pub mod error;
mod python;
pub mod scheduler;

use pyo3::prelude::*;

/// The crate version, so the facade can refuse a stale build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[pymodule]
fn _dispatcher(m: &Bound<'_, PyModule>) -> PyResult<()> {
    python::init(m)
}
