//! Hardware descriptions: wafers (WSE-2/3) and wafer systems (CS-2/3 with IO, MemoryX, SwarmX),
//! GPUs, and clusters of either, read from `models/hardware/*.toml` or a user's file.
//!
//! Architecture invariant: a description is validated once, here, and every later stage trusts it:
//! values are positive and consistent, and every error names the file and the dotted key.
//! Every value in a shipped file carries its source in a comment.

mod cluster;
mod gpu;
mod load;
mod wafer;

pub use cluster::ClusterHw;
pub use gpu::{
    GpuArch, GpuHw, GpuSystem, HbmSpec, L2Spec, LaunchSpec, NcclSpec, NetworkSpec, NicSpec, NodeSpec, NvlinkSpec,
    PerDtype, PowerSpec, SmSpec, TensorSpec,
};
pub use load::{apply_override, decode, kind, load_doc, load_with_overrides, HwDoc};
pub use wafer::{Fabric, IoPlacement, IoSpec, MemoryX, MeshDims, PeSpec, SimdOp, SimdTable, SwarmX, WaferHw};

/// Errors in hardware descriptions and overrides: always the user's input (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum HwError {
    #[error("{path}: cannot read the hardware file: {message}")]
    Read { path: String, message: String },
    #[error("unknown hardware `{name}`: not a file, and not one of the shipped descriptions ({known})")]
    Unknown { name: String, known: String },
    #[error("{path}: bad hardware description: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: key `{key}`: {message}")]
    Key { path: String, key: String, message: String },
    #[error("--set {setting}: {message}")]
    Set { setting: String, message: String },
    #[error("{path}: `{name}` is a {found} description; this command needs a {wanted}")]
    WrongKind { path: String, name: String, found: String, wanted: String },
}

/// Validation helper: collects the first violated rule as an error naming the key.
pub(crate) struct Check<'a> {
    pub path: &'a str,
}

impl Check<'_> {
    pub fn err(&self, key: &str, message: String) -> HwError {
        HwError::Key { path: self.path.to_string(), key: key.to_string(), message }
    }

    /// `value` must lie in `[min, max]`.
    pub fn range_u64(&self, key: &str, value: u64, min: u64, max: u64) -> Result<(), HwError> {
        if value < min || value > max {
            return Err(self.err(key, format!("{value} is outside the sane range [{min}, {max}]")));
        }
        Ok(())
    }

    pub fn range_f64(&self, key: &str, value: f64, min: f64, max: f64) -> Result<(), HwError> {
        if !value.is_finite() || value < min || value > max {
            return Err(self.err(key, format!("{value} is outside the sane range [{min:e}, {max:e}]")));
        }
        Ok(())
    }
}
