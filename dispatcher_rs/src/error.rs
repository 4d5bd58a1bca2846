//! The one error type of the scheduler. Plain Rust: the Python layer maps it
//! onto `SchedulerError` and its subclasses in one `From` impl.
//!
//! The messages are part of the contract: the Python reference scheduler
//! produces the same text for every variant except the JSON parser's own
//! wording inside [`Error::InvalidJson`].

use std::fmt;

use crate::canonical::CanonicalError;

/// Why a constructor call or an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// `complete()` of an id this scheduler never accepted.
    UnknownCall { id: String },
    /// `submit()` of an id already accepted in this step.
    AlreadySubmitted { id: String },
    /// `complete()` of a call that is not running.
    NotRunning { id: String, state: NotRunningState },
    /// `submit()` after `abort()`.
    Closed { id: String },
    /// The input is not a JSON document (or not UTF-8).
    InvalidJson {
        id: String,
        tool_name: String,
        reason: String,
    },
    /// A bad constructor argument.
    InvalidArgument { message: String },
}

/// What a call that cannot be completed is doing instead of running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRunningState {
    Queued,
    Completed,
    DuplicateOf(String),
    Aborted,
}

/// Which Python exception class an [`Error`] becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    UnknownCall,
    InvalidState,
    InvalidInput,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::UnknownCall { .. } => ErrorKind::UnknownCall,
            Self::AlreadySubmitted { .. } | Self::NotRunning { .. } | Self::Closed { .. } => {
                ErrorKind::InvalidState
            }
            Self::InvalidJson { .. } | Self::InvalidArgument { .. } => ErrorKind::InvalidInput,
        }
    }

    pub(crate) fn invalid_json(id: &str, tool_name: &str, err: &CanonicalError) -> Self {
        Self::InvalidJson {
            id: id.to_owned(),
            tool_name: tool_name.to_owned(),
            reason: err.to_string(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownCall { id } => write!(f, "unknown call id '{id}'"),
            Self::AlreadySubmitted { id } => {
                write!(f, "call id '{id}' was already submitted in this step")
            }
            Self::NotRunning { id, state } => match state {
                NotRunningState::Queued => write!(
                    f,
                    "call '{id}' is queued, not running: only a started call can complete"
                ),
                NotRunningState::Completed => write!(f, "call '{id}' already completed"),
                NotRunningState::DuplicateOf(original) => write!(
                    f,
                    "call '{id}' is a duplicate of '{original}' and never runs: complete '{original}'"
                ),
                NotRunningState::Aborted => {
                    write!(f, "call '{id}' never started: the scheduler was aborted")
                }
            },
            Self::Closed { id } => {
                write!(f, "cannot submit call '{id}': the scheduler was aborted")
            }
            Self::InvalidJson { id, tool_name, reason } => write!(
                f,
                "input of call '{id}' (tool '{tool_name}') is not valid JSON: {reason}"
            ),
            Self::InvalidArgument { message } => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}
