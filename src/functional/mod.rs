//! Functional execution: real values through the dataflow graph.
//!
//! This module owns the *reference*: a plain, obviously correct evaluator of every op of a
//! [`crate::graph::Graph`] (forward, backward, Adam), with the numerics of each family's Hugging Face
//! implementation (norm epsilons, GELU variant, rotary layout and base, GQA head mapping, MoE top-k
//! routing), the weights it runs on (a safetensors checkpoint or seeded random values) and the inputs
//! it is fed (token ids, positions, labels, KV caches). It is the yardstick that functional runs of
//! the mesh program are checked against.
//!
//! Architecture invariant: the reference knows nothing of meshes, plans, machines or time; it reads
//! only the graph (and the model's config for numerics the graph does not carry). It evaluates ops in
//! their id order (a topological order), one value per graph tensor, and every loop runs in a fixed
//! index order, so a result is a pure function of graph, numerics, weights and inputs.

pub mod decode;
mod inputs;
pub mod mesh;
mod numerics;
mod real;
pub mod reference;
mod rng;
pub mod run;
mod summary;
pub mod weights;

use std::path::PathBuf;

pub use inputs::{Feeds, Tokens};
pub use numerics::{Act, Numerics, RotaryStyle};
pub use real::Real;
pub use reference::{evaluate, AdamConfig, Options, Precision, Value, Values};
pub use rng::SplitMix64;
pub use run::{caches_from, numerics_of, run, Run, WeightSource};
pub use summary::{checksum, OutputSummary, ReferenceSummary};
pub use weights::Weights;

/// Errors of functional execution. All but `Internal` are the user's input (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum FunctionalError {
    #[error("{path}: cannot read the weights file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file (truncated or corrupt?): {reason}")]
    Corrupt { path: String, reason: String },
    #[error("{path}: tensor `{name}` is missing (the {model} graph needs it){hint}")]
    MissingTensor { path: String, name: String, model: String, hint: String },
    #[error("{path}: tensor `{name}` has shape {found:?}; the graph expects {expected:?}")]
    Shape { path: String, name: String, expected: Vec<u64>, found: Vec<u64> },
    #[error("{path}: tensor `{name}` has dtype {dtype}; expected a floating-point tensor (F32, F16, BF16 or F64)")]
    DType { path: String, name: String, dtype: String },
    #[error("{path}: key `{key}` = {value}: {reason}")]
    Config { path: String, key: String, value: String, reason: String },
    #[error("{0}")]
    Input(String),
    #[error("{path}: cannot write: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("functional mode does not support this yet: {0}")]
    Unsupported(String),
    /// The mesh program's values do not add up (a bug in the compiled program).
    #[error("functional run of the mesh program: {0}")]
    Mesh(String),
    #[error("internal error in the reference: {0}")]
    Internal(String),
}

impl FunctionalError {
    /// True when the error is the user's input rather than a bug.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, FunctionalError::Internal(_) | FunctionalError::Mesh(_))
    }
}

/// The error measure functional checks use: max |a - b| over the elements, relative to the largest
/// magnitude of the reference `b` (so tiny elements do not dominate). 0 for two empty tensors;
/// infinite when the lengths differ or a value is not finite.
pub fn max_rel_error<T: Real>(a: &[T], b: &[T]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.to_f64().abs()));
    let diff = a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x.to_f64() - y.to_f64()).abs()));
    if diff == 0.0 {
        0.0
    } else {
        diff / scale.max(f64::MIN_POSITIVE)
    }
}

/// The default directory where `tools/fetch-minilm.sh` puts all-MiniLM-L6-v2:
/// `$WAFERSCALE_CACHE/minilm`, else `$HOME/.cache/waferscale/minilm`.
pub fn minilm_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("WAFERSCALE_CACHE") {
        return Some(PathBuf::from(dir).join("minilm"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/waferscale/minilm"))
}
