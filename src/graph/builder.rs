//! The low-level graph builder: creates tensors and ops with checked sizes and costs.
//! The model builders (`forward.rs`) and the training pass (`train.rs`) are written against it.

use petgraph::graph::{DiGraph, NodeIndex};

use super::ir::{Cost, Elem, Graph, Op, OpId, Pass, Role, Tensor, TensorId};
use super::ops::OpKind;
use super::GraphError;
use crate::model::{prod, DType, Workload};

pub(crate) struct Builder {
    pub model: String,
    pub workload: Workload,
    pub tensors: Vec<Tensor>,
    pub ops: Vec<Op>,
    pub outputs: Vec<TensorId>,
    /// Layer and pass given to ops created from now on.
    pub layer: Option<u32>,
    pub pass: Pass,
}

impl Builder {
    pub fn new(model: String, workload: Workload) -> Builder {
        Builder {
            model,
            workload,
            tensors: Vec::new(),
            ops: Vec::new(),
            outputs: Vec::new(),
            layer: None,
            pass: Pass::Forward,
        }
    }

    pub fn dtype(&self) -> DType {
        self.workload.dtype
    }

    /// Element type of data tensors: the workload dtype.
    pub fn elem(&self) -> Elem {
        Elem::Float(self.dtype())
    }

    pub fn tensor(&mut self, name: String, shape: Vec<u64>, elem: Elem, role: Role) -> Result<TensorId, GraphError> {
        let bytes = prod(&shape).and_then(|e| e.checked_mul(elem.bytes()));
        let Some(bytes) = bytes else {
            return Err(GraphError::Overflow { what: format!("size of tensor {name} {shape:?}") });
        };
        let sparsity = if role == Role::Weight { self.workload.sparsity } else { 0.0 };
        let id = TensorId(self.tensors.len() as u32);
        self.tensors.push(Tensor { name, shape, elem, role, sparsity, bytes, grad_of: None, updates: None });
        Ok(id)
    }

    /// A weight in the workload's dtype.
    pub fn weight(&mut self, name: String, shape: Vec<u64>) -> Result<TensorId, GraphError> {
        let elem = Elem::Float(self.dtype());
        self.tensor(name, shape, elem, Role::Weight)
    }

    /// An input fed from outside: token ids, positions, labels (i32).
    pub fn ids(&mut self, name: &str, n: u64) -> Result<TensorId, GraphError> {
        self.tensor(name.to_string(), vec![n], Elem::I32, Role::Input)
    }

    /// Adds an op whose outputs already exist.
    pub fn op(
        &mut self,
        name: String,
        kind: OpKind,
        inputs: Vec<TensorId>,
        outputs: Vec<TensorId>,
    ) -> Result<OpId, GraphError> {
        let overflow = || GraphError::Overflow { what: format!("cost of op {name}") };
        let (flops, matmul_flops) = kind.flops().ok_or_else(overflow)?;
        let in_bytes: Vec<u64> = inputs.iter().map(|t| self.tensors[t.idx()].bytes).collect();
        let out_bytes: Vec<u64> = outputs.iter().map(|t| self.tensors[t.idx()].bytes).collect();
        let row_bytes = |t: Option<&TensorId>| {
            t.map(|t| &self.tensors[t.idx()])
                .map(|t| t.shape.last().copied().unwrap_or(1) * t.elem.bytes())
                .unwrap_or(0)
        };
        // The row size of the data an op reads/writes: the table row for lookups, the cache row for appends.
        let (read_row, write_row) = match kind {
            OpKind::Embedding { .. } => (row_bytes(inputs.get(1)), 0),
            OpKind::EmbeddingGrad { .. } | OpKind::KvCacheAppend { .. } => (0, row_bytes(outputs.first())),
            _ => (0, 0),
        };
        let total = |v: &[u64]| v.iter().try_fold(0u64, |a, &b| a.checked_add(b));
        let bytes_read = match kind.bytes_read_override(&in_bytes, read_row) {
            Some(b) => b,
            None => total(&in_bytes).ok_or_else(overflow)?,
        };
        let bytes_written = match kind.bytes_written_override(&out_bytes, write_row) {
            Some(b) => b,
            None => total(&out_bytes).ok_or_else(overflow)?,
        };
        let id = OpId(self.ops.len() as u32);
        self.ops.push(Op {
            name,
            kind,
            pass: self.pass,
            layer: self.layer,
            inputs,
            outputs,
            cost: Cost { flops, matmul_flops, bytes_read, bytes_written },
        });
        Ok(id)
    }

    /// The role of an op's fresh outputs in the current pass.
    fn out_role(&self) -> Role {
        match self.pass {
            Pass::Backward => Role::ActivationGrad,
            _ => Role::Activation,
        }
    }

    /// Adds an op and creates its outputs from the kind's signature (all in the workload dtype);
    /// output `i` is named `name` (one output) or `name.i`.
    pub fn apply_n(&mut self, name: &str, kind: OpKind, inputs: Vec<TensorId>) -> Result<Vec<TensorId>, GraphError> {
        let shapes = kind.signature().outputs;
        let role = self.out_role();
        let elem = Elem::Float(self.dtype());
        let n = shapes.len();
        let mut outs = Vec::with_capacity(n);
        for (i, shape) in shapes.into_iter().enumerate() {
            let tname = if n == 1 { name.to_string() } else { format!("{name}.{i}") };
            outs.push(self.tensor(tname, shape, elem, role)?);
        }
        self.op(name.to_string(), kind, inputs, outs.clone())?;
        Ok(outs)
    }

    /// [`Builder::apply_n`] for the common one-output case.
    pub fn apply(&mut self, name: &str, kind: OpKind, inputs: Vec<TensorId>) -> Result<TensorId, GraphError> {
        Ok(self.apply_n(name, kind, inputs)?[0])
    }

    pub fn output(&mut self, t: TensorId) {
        self.outputs.push(t);
    }

    pub fn finish(self) -> Graph {
        let mut producer = vec![None; self.tensors.len()];
        for (i, op) in self.ops.iter().enumerate() {
            for &t in &op.outputs {
                producer[t.idx()] = Some(i);
            }
        }
        let mut edges = Vec::new();
        for (i, op) in self.ops.iter().enumerate() {
            for &t in &op.inputs {
                if let Some(p) = producer[t.idx()] {
                    edges.push((NodeIndex::new(p), NodeIndex::new(i), t));
                }
            }
        }
        let mut g = DiGraph::with_capacity(self.ops.len(), edges.len());
        for op in self.ops {
            g.add_node(op);
        }
        for (a, b, t) in edges {
            g.add_edge(a, b, t);
        }
        Graph { model: self.model, workload: self.workload, tensors: self.tensors, ops: g, outputs: self.outputs }
    }
}
