//! The crate's top-level error: one variant per stage, each knowing whose fault it is.

use crate::compile::CompileError;
use crate::functional::FunctionalError;
use crate::gpu::GpuError;
use crate::graph::GraphError;
use crate::hw::HwError;
use crate::model::{ModelError, WorkloadError};
use crate::trace::TraceError;

/// Exit code for bad input (a config, a flag, a file the user gave).
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit code for an internal error (a bug).
pub const EXIT_INTERNAL: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Hw(#[from] HwError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Functional(#[from] FunctionalError),
    /// Writing an output file the user named failed.
    #[error("{path}: cannot write: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// 2 for the user's input, 1 for a bug.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Model(_) | Error::Workload(_) | Error::Hw(_) | Error::Write { .. } => EXIT_BAD_INPUT,
            Error::Graph(g) if g.is_user_error() => EXIT_BAD_INPUT,
            Error::Graph(_) => EXIT_INTERNAL,
            Error::Gpu(g) if g.is_user_error() => EXIT_BAD_INPUT,
            Error::Gpu(_) => EXIT_INTERNAL,
            Error::Compile(c) if c.is_user_error() => EXIT_BAD_INPUT,
            Error::Compile(_) => EXIT_INTERNAL,
            // A deadlock is a result about the input: this model, workload and machine cannot progress
            // (reported with what each blocked PE waits for). An invalid program or a broken invariant
            // is a bug.
            Error::Engine(crate::engine::EngineError::Deadlock(_)) => EXIT_BAD_INPUT,
            // Too large a run for this host: the user's request, not a bug.
            Error::Engine(crate::engine::EngineError::Memory(_)) => EXIT_BAD_INPUT,
            Error::Engine(_) => EXIT_INTERNAL,
            Error::Trace(t) if t.is_user_error() => EXIT_BAD_INPUT,
            Error::Trace(_) => EXIT_INTERNAL,
            Error::Functional(f) if f.is_user_error() => EXIT_BAD_INPUT,
            Error::Functional(_) => EXIT_INTERNAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{DeadlockReport, EngineError};

    #[test]
    fn a_deadlock_exits_2_and_a_broken_invariant_1() {
        let deadlock =
            Error::Engine(EngineError::Deadlock(DeadlockReport { cycle: 7, blocked_agents: 2, blocked: vec![] }));
        assert_eq!(deadlock.exit_code(), EXIT_BAD_INPUT);
        assert_eq!(Error::Engine(EngineError::Invariant("flops".into())).exit_code(), EXIT_INTERNAL);
    }
}
