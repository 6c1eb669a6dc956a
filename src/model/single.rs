//! Single-op workloads (`gemm:MxNxK`, `gemv:KxN`, `allreduce:BYTES`, `elementwise:N`): models of one
//! operation, for calibration against published per-op figures and for users' own microbenchmarks.

use std::fmt;

use super::ModelError;

/// One operation, sized by the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SingleOp {
    /// C[M x N] = A[M x K] · B[K x N]; A is the activation, B the (resident or streamed) weight.
    Gemm { m: u64, n: u64, k: u64 },
    /// y[1 x N] = x[1 x K] · W[K x N].
    Gemv { k: u64, n: u64 },
    /// A sum all-reduce of a buffer of `bytes` bytes over the participants of the machine that runs it.
    AllReduce { bytes: u64 },
    /// c = a + b over `n` elements.
    Elementwise { n: u64 },
}

/// Largest size accepted for any one dimension: 2^40 elements is already far beyond any machine
/// modelled here, and bounding dimensions keeps every derived count inside u64.
const MAX_DIM: u64 = 1 << 40;

impl SingleOp {
    /// Parses `kind:dims`; returns `Ok(None)` when `arg` is not a single-op spec at all.
    pub fn parse(arg: &str) -> Result<Option<SingleOp>, ModelError> {
        let Some((kind, dims)) = arg.split_once(':') else {
            return Ok(None);
        };
        let bad = |reason: String| ModelError::BadOp { spec: arg.to_string(), reason };
        let nums = |expect: usize, form: &str| -> Result<Vec<u64>, ModelError> {
            let parts: Vec<&str> = dims.split(['x', 'X']).collect();
            if parts.len() != expect {
                return Err(bad(format!("expected the form {kind}:{form}")));
            }
            parts
                .iter()
                .zip(form.split('x'))
                .map(|(p, name)| match p.trim().replace('_', "").parse::<u64>() {
                    Ok(0) => Err(bad(format!("{name} must be positive"))),
                    Ok(v) if v > MAX_DIM => Err(bad(format!("{name} = {v} exceeds the limit of {MAX_DIM}"))),
                    Ok(v) => Ok(v),
                    Err(_) => Err(bad(format!("{name} = `{p}` is not a positive integer"))),
                })
                .collect()
        };
        let op = match kind {
            "gemm" => {
                let v = nums(3, "MxNxK")?;
                SingleOp::Gemm { m: v[0], n: v[1], k: v[2] }
            }
            "gemv" => {
                let v = nums(2, "KxN")?;
                SingleOp::Gemv { k: v[0], n: v[1] }
            }
            "allreduce" => SingleOp::AllReduce { bytes: nums(1, "BYTES")?[0] },
            "elementwise" => SingleOp::Elementwise { n: nums(1, "N")?[0] },
            // A Windows drive letter or URL-like path is not a single op.
            _ if kind.len() <= 1 || dims.starts_with('/') || dims.starts_with('\\') => return Ok(None),
            _ => return Err(bad("unknown kind; expected gemm, gemv, allreduce or elementwise".into())),
        };
        Ok(Some(op))
    }
}

impl fmt::Display for SingleOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SingleOp::Gemm { m, n, k } => write!(f, "gemm:{m}x{n}x{k}"),
            SingleOp::Gemv { k, n } => write!(f, "gemv:{k}x{n}"),
            SingleOp::AllReduce { bytes } => write!(f, "allreduce:{bytes}"),
            SingleOp::Elementwise { n } => write!(f, "elementwise:{n}"),
        }
    }
}
