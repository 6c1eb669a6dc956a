//! The workload a model runs: phase, batch, sequence and context lengths, dtype, sparsity, recompute.
//! Given on the command line, in a small TOML file, or both (flags win).

use std::fmt;

use serde::Deserialize;

use super::{Model, ModelSpec};

/// What one run of the model does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Forward, backward and an Adam optimizer step over `batch x seq` tokens.
    Train,
    /// Forward over `batch x seq` prompt tokens, filling the KV cache; logits for the last token.
    Prefill,
    /// One new token per sequence against a KV cache of `context` tokens.
    Decode,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Train => "train",
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
        }
    }
    pub fn parse(s: &str) -> Option<Phase> {
        match s {
            "train" => Some(Phase::Train),
            "prefill" => Some(Phase::Prefill),
            "decode" => Some(Phase::Decode),
            _ => None,
        }
    }
}

/// Storage type of weights and activations. Training keeps fp32 Adam moments (and fp32 master
/// weights when the storage type is narrower), as mixed-precision training does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Fp32,
    Fp16,
    Bf16,
    Fp8,
}

impl DType {
    pub fn bytes(self) -> u64 {
        match self {
            DType::Fp32 => 4,
            DType::Fp16 | DType::Bf16 => 2,
            DType::Fp8 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::Fp32 => "fp32",
            DType::Fp16 => "fp16",
            DType::Bf16 => "bf16",
            DType::Fp8 => "fp8",
        }
    }
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "fp32" => Some(DType::Fp32),
            "fp16" => Some(DType::Fp16),
            "bf16" => Some(DType::Bf16),
            "fp8" => Some(DType::Fp8),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A resolved, validated workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub phase: Phase,
    /// Sequences per step.
    pub batch: u64,
    /// Tokens per sequence (training sequence or prompt length).
    pub seq: u64,
    /// Decode only: tokens already in the KV cache; the new token attends to `context + 1` positions.
    pub context: u64,
    pub dtype: DType,
    /// Fraction of weight values that are zero, in [0, 1); recorded on weight tensors.
    pub sparsity: f64,
    /// Training only: recompute each layer's forward during backward instead of keeping activations.
    pub recompute: bool,
}

impl Workload {
    /// Tokens processed by one step: `batch x seq`, or `batch` when decoding one token per sequence.
    pub fn tokens(&self) -> u64 {
        match self.phase {
            Phase::Decode => self.batch,
            _ => self.batch * self.seq,
        }
    }
}

/// Default batch when neither a flag nor a workload file gives one.
pub const DEFAULT_BATCH: u64 = 1;
/// Default sequence length, shortened to the model's position limit when that is smaller.
pub const DEFAULT_SEQ: u64 = 1024;
/// Default storage type: the wafer's native SIMD type (fp16 FMAC, SDK SIMD appendix).
pub const DEFAULT_DTYPE: DType = DType::Fp16;
/// Upper bound on batch, seq and context: far beyond any machine here, and it keeps every count in u64.
const MAX_WORKLOAD_DIM: u64 = 1 << 32;
/// Upper bound on the tokens of one step (and on cached tokens): keeps every shape product in u64.
const MAX_TOKENS: u64 = 1 << 40;

/// Workload settings as given: every field optional. Also the schema of `--workload FILE` (TOML).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadArgs {
    pub phase: Option<Phase>,
    pub batch: Option<u64>,
    pub seq: Option<u64>,
    pub context: Option<u64>,
    pub dtype: Option<DType>,
    pub sparsity: Option<f64>,
    pub recompute: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("{path}: cannot read the workload file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: bad workload file: {message}")]
    File { path: String, message: String },
    #[error("workload: `{key}` = {value}: expected {expected}")]
    Bad { key: &'static str, value: String, expected: String },
    #[error("workload: `{key}` = {value} exceeds `{model_key}` = {limit} of {path}{note}")]
    ExceedsModel {
        key: &'static str,
        value: u64,
        model_key: &'static str,
        limit: u64,
        path: String,
        note: &'static str,
    },
    #[error("workload: phase `{phase}` does not apply to {model}: {reason}")]
    Phase { phase: &'static str, model: String, reason: String },
    #[error("workload: `{key}` does not apply to the single-op workload {op}")]
    NotForOp { key: &'static str, op: String },
}

impl WorkloadArgs {
    /// Reads a TOML workload file.
    pub fn from_file(path: &str) -> Result<WorkloadArgs, WorkloadError> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| WorkloadError::File { path: path.into(), message: e.to_string() })
    }

    /// `self` with every field that `over` sets replaced (flags over file).
    pub fn overlay(self, over: &WorkloadArgs) -> WorkloadArgs {
        WorkloadArgs {
            phase: over.phase.or(self.phase),
            batch: over.batch.or(self.batch),
            seq: over.seq.or(self.seq),
            context: over.context.or(self.context),
            dtype: over.dtype.or(self.dtype),
            sparsity: over.sparsity.or(self.sparsity),
            recompute: over.recompute.or(self.recompute),
        }
    }

    /// Fills defaults and checks the workload against the model.
    pub fn resolve(&self, model: &Model) -> Result<Workload, WorkloadError> {
        let dtype = self.dtype.unwrap_or(DEFAULT_DTYPE);
        let sparsity = self.sparsity.unwrap_or(0.0);
        if !(0.0..1.0).contains(&sparsity) {
            return Err(WorkloadError::Bad {
                key: "sparsity",
                value: sparsity.to_string(),
                expected: "a fraction of zero weights in [0, 1)".into(),
            });
        }
        for (key, v) in [("batch", self.batch), ("seq", self.seq), ("context", self.context)] {
            match v {
                Some(0) => {
                    return Err(WorkloadError::Bad { key, value: "0".into(), expected: "a positive integer".into() })
                }
                Some(v) if v > MAX_WORKLOAD_DIM => {
                    return Err(WorkloadError::Bad {
                        key,
                        value: v.to_string(),
                        expected: format!("at most {MAX_WORKLOAD_DIM}"),
                    })
                }
                _ => {}
            }
        }
        match model {
            Model::Op(op) => {
                let given = [
                    ("batch", self.batch.is_some()),
                    ("seq", self.seq.is_some()),
                    ("context", self.context.is_some()),
                    ("recompute", self.recompute.is_some()),
                    ("phase", self.phase.is_some_and(|p| p != Phase::Prefill)),
                ];
                if let Some((key, _)) = given.iter().find(|(_, g)| *g) {
                    return Err(WorkloadError::NotForOp { key, op: op.to_string() });
                }
                Ok(Workload { phase: Phase::Prefill, batch: 1, seq: 1, context: 0, dtype, sparsity, recompute: false })
            }
            Model::Transformer(spec) => self.resolve_transformer(spec, dtype, sparsity),
        }
    }

    fn resolve_transformer(&self, spec: &ModelSpec, dtype: DType, sparsity: f64) -> Result<Workload, WorkloadError> {
        let phase = self.phase.unwrap_or(Phase::Train);
        if phase == Phase::Decode && spec.family.is_encoder() {
            return Err(WorkloadError::Phase {
                phase: phase.name(),
                model: spec.name.clone(),
                reason: "an encoder has no KV cache and generates no tokens; use prefill (a forward pass) or train"
                    .into(),
            });
        }
        let recompute = self.recompute.unwrap_or(false);
        if recompute && phase != Phase::Train {
            return Err(WorkloadError::Bad {
                key: "recompute",
                value: "true".into(),
                expected: "recompute only with phase train".into(),
            });
        }
        if self.context.is_some() && phase != Phase::Decode {
            return Err(WorkloadError::Bad {
                key: "context",
                value: self.context.unwrap_or(0).to_string(),
                expected: "a KV-cache length, which only phase decode takes".into(),
            });
        }
        let seq = self.seq.unwrap_or(DEFAULT_SEQ.min(spec.max_positions));
        let context = match phase {
            // The new token sits at position `context`, so context + 1 positions must exist.
            Phase::Decode => self.context.unwrap_or(seq.min(spec.max_positions - 1).max(1)),
            _ => 0,
        };
        let model_key = match spec.family {
            crate::model::Family::Gpt2 | crate::model::Family::GptJ => "n_positions",
            _ => "max_position_embeddings",
        };
        let (key, value, used, note) = match phase {
            Phase::Decode => ("context", context, context + 1, " (the new token needs one more position)"),
            _ => ("seq", seq, seq, ""),
        };
        if used > spec.max_positions {
            return Err(WorkloadError::ExceedsModel {
                key,
                value,
                note,
                model_key,
                limit: spec.max_positions,
                path: spec.source.clone(),
            });
        }
        let batch = self.batch.unwrap_or(DEFAULT_BATCH);
        let held = if phase == Phase::Decode { context + 1 } else { seq };
        if batch.saturating_mul(held) > MAX_TOKENS {
            return Err(WorkloadError::Bad {
                key: "batch",
                value: batch.to_string(),
                expected: format!("batch x {key} of at most {MAX_TOKENS} tokens"),
            });
        }
        Ok(Workload {
            phase,
            batch,
            seq: if phase == Phase::Decode { 1 } else { seq },
            context,
            dtype,
            sparsity,
            recompute,
        })
    }
}
