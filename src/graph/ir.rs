//! The dataflow IR: tensors in a side table, ops as petgraph nodes, edges labelled by the tensor
//! that flows from producer to consumer.

use std::fmt;

use petgraph::graph::{DiGraph, NodeIndex};

use super::ops::OpKind;
use crate::model::{DType, Workload};

/// Index of a tensor in [`Graph::tensors`]; printed as `t12`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TensorId(pub u32);

/// Index of an op node in [`Graph::ops`]; printed as `op7`. Ops are numbered in a topological order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub u32);

impl TensorId {
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}

impl OpId {
    pub fn idx(self) -> usize {
        self.0 as usize
    }
    pub fn node(self) -> NodeIndex {
        NodeIndex::new(self.idx())
    }
}

impl fmt::Display for TensorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op{}", self.0)
    }
}

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    /// Floating-point data in a workload dtype.
    Float(DType),
    /// Token ids, positions and labels.
    I32,
}

impl Elem {
    pub fn bytes(self) -> u64 {
        match self {
            Elem::Float(d) => d.bytes(),
            Elem::I32 => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Elem::Float(d) => d.name(),
            Elem::I32 => "i32",
        }
    }
}

/// What a tensor is for; the summary sums bytes by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Token ids, positions, labels: fed from outside, never differentiated.
    Input,
    Weight,
    Activation,
    /// Gradient of an activation (backward pass).
    ActivationGrad,
    /// Gradient of a weight.
    WeightGrad,
    /// Adam moments and fp32 master weights.
    OptimizerState,
    KvCache,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Input => "input",
            Role::Weight => "weight",
            Role::Activation => "act",
            Role::ActivationGrad => "act-grad",
            Role::WeightGrad => "w-grad",
            Role::OptimizerState => "opt-state",
            Role::KvCache => "kv-cache",
        }
    }

    /// Roles whose first version comes from outside the graph (no producer op).
    pub fn is_source(self) -> bool {
        matches!(self, Role::Input | Role::Weight | Role::OptimizerState | Role::KvCache)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// For weights, the tensor's name in the family's Hugging Face checkpoint (`h.0.attn.c_attn.weight`).
    pub name: String,
    pub shape: Vec<u64>,
    pub elem: Elem,
    pub role: Role,
    /// Fraction of zero values (weights only; 0 elsewhere).
    pub sparsity: f64,
    /// Product of `shape` times the element size; checked against overflow at creation.
    pub bytes: u64,
    /// For a weight gradient: the weight it belongs to.
    pub grad_of: Option<TensorId>,
    /// For an in-place update (Adam's new weight and moments, the appended KV cache): the tensor this
    /// is the next version of. Updated versions share storage and are not counted again in byte sums.
    pub updates: Option<TensorId>,
}

impl Tensor {
    pub fn elems(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Which pass an op belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pass {
    Forward,
    /// A forward op re-run during backward (activation recompute).
    Recompute,
    Backward,
    Optimizer,
}

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::Recompute => "rc",
            Pass::Backward => "bwd",
            Pass::Optimizer => "opt",
        }
    }
}

/// FLOPs and bytes of one op.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// All floating-point operations (multiply and add count as two).
    pub flops: u64,
    /// The part of `flops` that is matrix multiplication (2 x batch x M x N x K).
    pub matmul_flops: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    /// Readable, unique name (`l3.attn.qkv`, `l3.attn.qkv.dgrad`, `adam.h.3.attn.c_attn.weight`).
    pub name: String,
    pub kind: OpKind,
    pub pass: Pass,
    /// The transformer layer the op belongs to, if any.
    pub layer: Option<u32>,
    pub inputs: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
    pub cost: Cost,
}

/// A dataflow graph of one step of a workload. Immutable once built.
#[derive(Clone, Debug)]
pub struct Graph {
    /// Model name as given (`gpt2-small`, `gemm:64x64x64`).
    pub model: String,
    pub workload: Workload,
    pub tensors: Vec<Tensor>,
    /// Op nodes; an edge `a -> b` carries a tensor that `a` produces and `b` consumes.
    pub ops: DiGraph<Op, TensorId>,
    /// Tensors that leave the step: logits, loss, hidden states, updated weights and caches.
    pub outputs: Vec<TensorId>,
}

impl Graph {
    pub fn tensor(&self, t: TensorId) -> &Tensor {
        &self.tensors[t.idx()]
    }

    pub fn op(&self, o: OpId) -> &Op {
        &self.ops[o.node()]
    }

    pub fn op_ids(&self) -> impl Iterator<Item = OpId> + '_ {
        (0..self.ops.node_count() as u32).map(OpId)
    }

    pub fn n_ops(&self) -> usize {
        self.ops.node_count()
    }

    /// The op that produces each tensor (None for sources), indexed by tensor.
    pub fn producers(&self) -> Vec<Option<OpId>> {
        let mut p = vec![None; self.tensors.len()];
        for o in self.op_ids() {
            for &t in &self.op(o).outputs {
                p[t.idx()] = Some(o);
            }
        }
        p
    }

    /// Length, in ops, of the longest dependency chain.
    pub fn longest_path_ops(&self) -> u64 {
        // Ops are numbered in topological order (the verifier checks it), so one forward sweep suffices.
        let mut depth = vec![0u64; self.n_ops()];
        for o in self.op_ids() {
            let d = self
                .ops
                .neighbors_directed(o.node(), petgraph::Direction::Incoming)
                .map(|p| depth[p.index()])
                .max()
                .unwrap_or(0);
            depth[o.idx()] = d + 1;
        }
        depth.into_iter().max().unwrap_or(0)
    }
}
