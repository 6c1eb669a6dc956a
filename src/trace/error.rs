//! What can go wrong with a trace: reading or writing its file, a file that is not a trace, a truncated
//! or corrupt one (with the byte offset and what was expected there), a budget too small for the mesh,
//! and questions about a trace that it cannot answer (a PE outside the mesh, an unknown region).

/// Errors of `trace`. Every variant but `NoRecording` is the user's input (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The first bytes are not the trace magic.
    #[error("{path}: not a waferscale trace: expected the magic bytes {expected:?} at offset 0, found {found:?}")]
    NotATrace { path: String, expected: String, found: String },
    #[error("{path}: trace format version {found} at offset 8 is not supported: this build reads version {supported}")]
    Version { path: String, found: u16, supported: u16 },
    /// The file ends before something it must contain.
    #[error("{path}: truncated: the file ends at offset {offset}, expected {expected}")]
    Truncated { path: String, offset: u64, expected: String },
    /// A value that cannot be what the format says is there.
    #[error("{path}: corrupt at offset {offset}: expected {expected}, found {found}")]
    Corrupt { path: String, offset: u64, expected: String, found: String },
    /// Even one window over the whole run does not fit.
    #[error(
        "a trace budget of {budget_bytes} bytes is too small for this run: one window over the whole run needs \
         {needed_bytes} bytes (raise --trace-budget)"
    )]
    Budget { budget_bytes: u64, needed_bytes: u64 },
    /// The engine ran without recording (a caller's bug: it must pass `trace::spec_for` to the engine).
    #[error("the engine run has no recording: run it with `EngineOptions::trace = Some(trace::spec_for(..))`")]
    NoRecording,
    /// The recording does not belong to the program (a caller's bug).
    #[error("the recording does not match the mesh program: {0}")]
    Mismatch(String),
    /// Encoding a picture failed (a bug).
    #[error("cannot encode {0}")]
    Encode(String),
    /// A question the trace cannot answer: a PE outside the mesh, an unknown region, a window past the end.
    #[error("{0}")]
    Query(String),
}

impl TraceError {
    /// Whether the user's input is at fault (exit 2) rather than the program (exit 1).
    pub fn is_user_error(&self) -> bool {
        !matches!(self, TraceError::NoRecording | TraceError::Mismatch(_) | TraceError::Encode(_))
    }
}
