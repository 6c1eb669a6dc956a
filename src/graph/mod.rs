//! The dataflow graph: ops and tensors of one step of a workload, with shapes, FLOPs and bytes.
//!
//! Architecture invariant: the graph knows nothing of meshes, machines or time. It is built once,
//! verified, and then only read. Ops are numbered in a topological order.

mod builder;
mod forward;
mod ir;
mod names;
pub mod ops;
mod print;
mod train;
mod verify;

pub use ir::{Cost, Elem, Graph, Op, OpId, Pass, Role, Tensor, TensorId};
pub use names::{hf_name, Param, Part};
pub use ops::{Attn, Dispatch, Linear, OpKind, Pick, Route, Rows, WeightLayout};
pub use print::{print_dot, print_graph};
pub use verify::{verify, VerifyError};

use crate::model::{Model, Phase, Workload};

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// A size or count overflows u64: the user's model or workload is absurd.
    #[error("the {what} overflows a 64-bit count; reduce the model or workload sizes")]
    Overflow { what: String },
    /// The workload does not fit the model (user input).
    #[error("{0}")]
    Workload(String),
    /// A builder broke an invariant: always a bug.
    #[error("internal error while building the graph: {0}")]
    Internal(String),
    /// The verifier found broken invariants: always a bug.
    #[error("internal error: the graph verifier failed ({} problems):\n  {}", .0.len(), .0.iter().take(20).map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    Verify(Vec<VerifyError>),
}

impl GraphError {
    /// True when the error is the user's input rather than a bug.
    pub fn is_user_error(&self) -> bool {
        matches!(self, GraphError::Overflow { .. } | GraphError::Workload(_))
    }
}

/// Builds and verifies the dataflow graph of one step of `workload` on `model`.
pub fn build(model: &Model, workload: &Workload) -> Result<Graph, GraphError> {
    let mut b = builder::Builder::new(model.name(), workload.clone());
    match model {
        Model::Transformer(spec) => {
            let losses = forward::transformer(&mut b, spec)?;
            if workload.phase == Phase::Train {
                train::backward_and_adam(&mut b, &losses)?;
                for l in losses {
                    b.output(l);
                }
            }
        }
        Model::Op(op) => forward::single(&mut b, *op)?,
    }
    let g = b.finish();
    verify(&g).map_err(GraphError::Verify)?;
    // Reports sum FLOPs and bytes over the whole step in u64; make sure those sums fit.
    let mut total = [0u64; 3];
    for o in g.op_ids() {
        let c = g.op(o).cost;
        for (acc, v) in total.iter_mut().zip([c.flops, c.bytes_read, c.bytes_written]) {
            *acc = acc
                .checked_add(v)
                .ok_or_else(|| GraphError::Overflow { what: "total FLOPs or bytes of the step".into() })?;
        }
    }
    g.tensors
        .iter()
        .try_fold(0u64, |acc, t| acc.checked_add(t.bytes))
        .ok_or_else(|| GraphError::Overflow { what: "total bytes of the step's tensors".into() })?;
    Ok(g)
}
