//! The model frontend: Hugging Face `config.json` files and single-op workloads in, [`Model`] out,
//! plus the [`Workload`] (phase, batch, sequence, dtype, ...) a model runs.
//!
//! Architecture invariant: this module knows nothing of graphs, hardware, meshes or time.
//! Every error names the file (or the command-line flag) and the key that is wrong.

mod config;
mod registry;
mod single;
mod spec;
mod workload;

pub use config::parse_config;
pub use registry::{embedded_hardware, embedded_models, EmbeddedFile};
pub use single::SingleOp;
pub(crate) use spec::{prod, sum};
pub use spec::{Biases, Family, FfnKind, ModelSpec, Moe, NormKind, Positions, Residual};
pub use workload::{DType, Phase, Workload, WorkloadArgs, WorkloadError};

use std::path::Path;

/// What the user asked to run: a transformer from a config, or one operation for calibration.
#[derive(Clone, Debug, PartialEq)]
pub enum Model {
    Transformer(ModelSpec),
    Op(SingleOp),
}

impl Model {
    /// The name printed in summaries (`gpt2-small`, `gemm:8192x8192x8192`).
    pub fn name(&self) -> String {
        match self {
            Model::Transformer(s) => s.name.clone(),
            Model::Op(op) => op.to_string(),
        }
    }
}

/// Errors of the model frontend. All of them are the user's input (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: cannot read the file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: not valid JSON: {message}")]
    Json { path: String, line: usize, column: usize, message: String },
    #[error(
        "{path}: key `{key}` = \"{value}\" is not a supported model family \
         (supported model_type values: gpt2, gptj, gpt_neox, llama, mistral, mixtral, bert)"
    )]
    UnknownFamily { path: String, key: String, value: String },
    #[error("{path}: missing key `{key}`")]
    MissingKey { path: String, key: String },
    #[error("{path}: key `{key}` = {value}: expected {expected}")]
    BadValue { path: String, key: String, value: String, expected: String },
    #[error("{path}: key `{key}` = {value} is not divisible by `{by_key}` = {by}")]
    NotDivisible { path: String, key: String, value: u64, by_key: String, by: u64 },
    #[error("{path}: the {what} overflows a 64-bit count; the sizes in this config are absurd")]
    Overflow { path: String, what: String },
    #[error("unknown model `{name}`: not a file, and not one of the shipped models ({known})")]
    UnknownModel { name: String, known: String },
    #[error("single-op workload `{spec}`: {reason}")]
    BadOp { spec: String, reason: String },
}

/// Resolves a model argument: a single-op spec (`gemm:MxNxK`), a path to a config file,
/// or the name of a shipped model (`gpt2-small`, `gpt-tiny`, `tiny/gpt-tiny`).
pub fn load(arg: &str) -> Result<Model, ModelError> {
    if let Some(op) = SingleOp::parse(arg)? {
        return Ok(Model::Op(op));
    }
    let path = Path::new(arg);
    let looks_like_path = arg.ends_with(".json") || arg.contains('/') || arg.contains('\\');
    if path.is_file() || (looks_like_path && registry::find_model(arg).is_none()) {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Read { path: arg.to_string(), source })?;
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or(arg);
        return parse_config(name, arg, &text).map(Model::Transformer);
    }
    match registry::find_model(arg) {
        Some(file) => {
            let name = file.name.rsplit('/').next().unwrap_or(file.name);
            parse_config(name, file.path, file.text).map(Model::Transformer)
        }
        None => Err(ModelError::UnknownModel {
            name: arg.to_string(),
            known: embedded_models().iter().map(|f| f.name).collect::<Vec<_>>().join(", "),
        }),
    }
}
