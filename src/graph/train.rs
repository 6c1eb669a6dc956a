//! Training: the backward pass derived from the forward ops (reverse-mode, op by op), optional
//! per-layer activation recompute, and one Adam step per weight.
//!
//! Gradients of a tensor used by several ops (the residual stream, tied embeddings) are summed by
//! explicit `add` ops, so every byte and FLOP of the step is an op in the graph.

use std::collections::BTreeMap;

use super::builder::Builder;
use super::ir::{Elem, Pass, Role, TensorId};
use super::ops::{OpKind, Rows};
use super::GraphError;
use crate::model::DType;

/// Appends the backward pass and the optimizer step. `losses` are the forward pass's loss tensors.
pub(crate) fn backward_and_adam(b: &mut Builder, losses: &[TensorId]) -> Result<(), GraphError> {
    let n_fwd = b.ops.len();
    // Which tensors depend on a weight (and so need a gradient).
    let mut requires = vec![false; b.tensors.len()];
    for (i, t) in b.tensors.iter().enumerate() {
        requires[i] = t.role == Role::Weight;
    }
    for op in &b.ops[..n_fwd] {
        if op.inputs.iter().any(|t| requires[t.idx()]) {
            for t in &op.outputs {
                requires[t.idx()] = true;
            }
        }
    }
    let mut producer = vec![None; b.tensors.len()];
    for (i, op) in b.ops.iter().enumerate() {
        for t in &op.outputs {
            producer[t.idx()] = Some(i);
        }
    }
    let recompute = b.workload.recompute;
    let mut ad = Ad { requires, grad: BTreeMap::new(), remap: BTreeMap::new(), producer, recompute, layer: None };
    b.pass = Pass::Backward;
    for i in (0..n_fwd).rev() {
        let op = b.ops[i].clone();
        if op.layer != ad.layer {
            // Entering another layer's backward: its recomputed values start afresh.
            ad.layer = op.layer;
            ad.remap.clear();
        }
        b.layer = op.layer;
        let is_loss = matches!(op.kind, OpKind::CrossEntropy { .. }) && losses.contains(&op.outputs[0]);
        let dys: Vec<Option<TensorId>> = op.outputs.iter().map(|t| ad.grad.get(t).copied()).collect();
        if !is_loss && dys.iter().all(Option::is_none) {
            continue;
        }
        ad.op_backward(b, &op.name, op.kind, &op.inputs, &op.outputs, &dys)?;
    }
    b.layer = None;
    b.pass = Pass::Optimizer;
    adam(b, &ad.grad)
}

struct Ad {
    requires: Vec<bool>,
    /// Accumulated gradient of each tensor so far.
    grad: BTreeMap<TensorId, TensorId>,
    /// Under recompute: forward tensors of the current layer -> their recomputed copies.
    remap: BTreeMap<TensorId, TensorId>,
    /// Forward op index producing each forward tensor.
    producer: Vec<Option<usize>>,
    recompute: bool,
    /// Layer whose backward is being built.
    layer: Option<u32>,
}

impl Ad {
    /// The version of a forward tensor that a backward op reads. Without recompute, the tensor itself.
    /// With recompute, a value computed inside the current layer is recomputed on first use (with
    /// whatever it depends on inside the layer); the layer's inputs are the kept checkpoints. Only
    /// what backward actually reads is recomputed.
    fn fwd(&mut self, b: &mut Builder, t: TensorId) -> Result<TensorId, GraphError> {
        if !self.recompute || self.layer.is_none() {
            return Ok(t);
        }
        if let Some(&r) = self.remap.get(&t) {
            return Ok(r);
        }
        let Some(p) = self.producer.get(t.idx()).copied().flatten() else {
            return Ok(t);
        };
        if b.ops[p].layer != self.layer {
            return Ok(t);
        }
        let op = b.ops[p].clone();
        let mut inputs = Vec::with_capacity(op.inputs.len());
        for &i in &op.inputs {
            inputs.push(self.fwd(b, i)?);
        }
        let saved = b.pass;
        b.pass = Pass::Recompute;
        let mut outputs = Vec::with_capacity(op.outputs.len());
        for &o in &op.outputs {
            let src = &b.tensors[o.idx()];
            let (name, shape, elem) = (format!("{}.rc", src.name), src.shape.clone(), src.elem);
            let fresh = b.tensor(name, shape, elem, Role::Activation)?;
            self.remap.insert(o, fresh);
            outputs.push(fresh);
        }
        b.op(format!("{}.rc", op.name), op.kind, inputs, outputs)?;
        b.pass = saved;
        Ok(self.remap[&t])
    }

    fn needs(&self, t: TensorId) -> bool {
        self.requires[t.idx()]
    }

    /// Adds `dx` to the gradient of `x`, with an `add` op when `x` already has one.
    fn accumulate(&mut self, b: &mut Builder, x: TensorId, dx: TensorId) -> Result<(), GraphError> {
        let weight = b.tensors[x.idx()].role == Role::Weight;
        if weight {
            let t = &mut b.tensors[dx.idx()];
            t.role = Role::WeightGrad;
            t.grad_of = Some(x);
        }
        let total = match self.grad.get(&x) {
            None => dx,
            Some(&prev) => {
                let shape = &b.tensors[x.idx()].shape;
                let rows = Rows { rows: shape[..shape.len() - 1].iter().product(), width: shape[shape.len() - 1] };
                let name = format!("{}.grad_sum{}", b.tensors[x.idx()].name, dx.0);
                let sum = b.apply(&name, OpKind::Add { rows, n: 2 }, vec![prev, dx])?;
                if weight {
                    let t = &mut b.tensors[sum.idx()];
                    t.role = Role::WeightGrad;
                    t.grad_of = Some(x);
                }
                sum
            }
        };
        self.grad.insert(x, total);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn op_backward(
        &mut self,
        b: &mut Builder,
        name: &str,
        kind: OpKind,
        ins: &[TensorId],
        outs: &[TensorId],
        dys: &[Option<TensorId>],
    ) -> Result<(), GraphError> {
        let missing = || GraphError::Internal(format!("backward of {name}: an output has no gradient"));
        let dy = dys.first().copied().flatten();
        match kind {
            OpKind::Embedding { rows, vocab, width } => {
                let dy = dy.ok_or_else(missing)?;
                if self.needs(ins[1]) {
                    let k = OpKind::EmbeddingGrad { rows, vocab, width };
                    let dt = b.apply(&format!("{name}.grad"), k, vec![ins[0], dy])?;
                    self.accumulate(b, ins[1], dt)?;
                }
            }
            OpKind::Linear(l) => {
                let dy = dy.ok_or_else(missing)?;
                if self.needs(ins[0]) {
                    let dx = b.apply(&format!("{name}.dgrad"), OpKind::LinearDgrad(l), vec![dy, ins[1]])?;
                    self.accumulate(b, ins[0], dx)?;
                }
                if self.needs(ins[1]) {
                    let x0 = self.fwd(b, ins[0])?;
                    let outs = b.apply_n(&format!("{name}.wgrad"), OpKind::LinearWgrad(l), vec![x0, dy])?;
                    for (w, g) in ins[1..].iter().zip(outs) {
                        self.accumulate(b, *w, g)?;
                    }
                }
            }
            OpKind::Split { rows, widths } => {
                let parts: Option<Vec<TensorId>> = dys.iter().copied().collect();
                let dx =
                    b.apply(&format!("{name}.grad"), OpKind::SplitGrad { rows, widths }, parts.ok_or_else(missing)?)?;
                self.accumulate(b, ins[0], dx)?;
            }
            OpKind::AttnScores(a) => {
                let ds = dy.ok_or_else(missing)?;
                let (q, k) = (self.fwd(b, ins[0])?, self.fwd(b, ins[1])?);
                let dq = b.apply(&format!("{name}.dq"), OpKind::AttnScoresGradQ(a), vec![ds, k])?;
                self.accumulate(b, ins[0], dq)?;
                let dk = b.apply(&format!("{name}.dk"), OpKind::AttnScoresGradK(a), vec![ds, q])?;
                self.accumulate(b, ins[1], dk)?;
            }
            OpKind::AttnSoftmax(a) => {
                let dp = dy.ok_or_else(missing)?;
                let p = self.fwd(b, outs[0])?;
                let ds = b.apply(&format!("{name}.grad"), OpKind::AttnSoftmaxGrad(a), vec![p, dp])?;
                self.accumulate(b, ins[0], ds)?;
            }
            OpKind::AttnContext(a) => {
                let dout = dy.ok_or_else(missing)?;
                let (p, v) = (self.fwd(b, ins[0])?, self.fwd(b, ins[1])?);
                let dp = b.apply(&format!("{name}.dp"), OpKind::AttnContextGradP(a), vec![dout, v])?;
                self.accumulate(b, ins[0], dp)?;
                let dv = b.apply(&format!("{name}.dv"), OpKind::AttnContextGradV(a), vec![p, dout])?;
                self.accumulate(b, ins[1], dv)?;
            }
            OpKind::Norm { kind: nk, rows } => {
                let dy = dy.ok_or_else(missing)?;
                let x0 = self.fwd(b, ins[0])?;
                let outs =
                    b.apply_n(&format!("{name}.grad"), OpKind::NormGrad { kind: nk, rows }, vec![x0, ins[1], dy])?;
                for (t, g) in ins.iter().zip(outs) {
                    self.accumulate(b, *t, g)?;
                }
            }
            OpKind::Gelu(r) => {
                let dy = dy.ok_or_else(missing)?;
                let x0 = self.fwd(b, ins[0])?;
                let dx = b.apply(&format!("{name}.grad"), OpKind::GeluGrad(r), vec![x0, dy])?;
                self.accumulate(b, ins[0], dx)?;
            }
            OpKind::Tanh(r) => {
                let dy = dy.ok_or_else(missing)?;
                let y = self.fwd(b, outs[0])?;
                let dx = b.apply(&format!("{name}.grad"), OpKind::TanhGrad(r), vec![y, dy])?;
                self.accumulate(b, ins[0], dx)?;
            }
            OpKind::SwiGlu(r) => {
                let dy = dy.ok_or_else(missing)?;
                let (gate, up) = (self.fwd(b, ins[0])?, self.fwd(b, ins[1])?);
                let outs = b.apply_n(&format!("{name}.grad"), OpKind::SwiGluGrad(r), vec![gate, up, dy])?;
                self.accumulate(b, ins[0], outs[0])?;
                self.accumulate(b, ins[1], outs[1])?;
            }
            OpKind::Add { .. } => {
                let dy = dy.ok_or_else(missing)?;
                for &t in ins {
                    if self.needs(t) {
                        self.accumulate(b, t, dy)?;
                    }
                }
            }
            OpKind::Rotary { rows, heads, head_dim, rot_dims } => {
                let dy = dy.ok_or_else(missing)?;
                let k = OpKind::RotaryGrad { rows, heads, head_dim, rot_dims };
                let dx = b.apply(&format!("{name}.grad"), k, vec![dy])?;
                self.accumulate(b, ins[0], dx)?;
            }
            OpKind::TokenSelect { batch, seq, width, pick } => {
                let dy = dy.ok_or_else(missing)?;
                let k = OpKind::TokenSelectGrad { batch, seq, width, pick };
                let dx = b.apply(&format!("{name}.grad"), k, vec![dy])?;
                self.accumulate(b, ins[0], dx)?;
            }
            OpKind::MoeTopK(r) => {
                let dp = dy.ok_or_else(missing)?;
                let p = self.fwd(b, outs[0])?;
                let dl = b.apply(&format!("{name}.grad"), OpKind::MoeTopKGrad(r), vec![p, dp])?;
                self.accumulate(b, ins[0], dl)?;
            }
            OpKind::MoeDispatch(r) => {
                // The routing probabilities only pick rows here; their gradient comes from the combine.
                let dxd = dy.ok_or_else(missing)?;
                let probs = self.fwd(b, ins[1])?;
                let dx = b.apply(&format!("{name}.grad"), OpKind::MoeDispatchGrad(r), vec![dxd, probs])?;
                self.accumulate(b, ins[0], dx)?;
            }
            OpKind::MoeCombine(r) => {
                let dy = dy.ok_or_else(missing)?;
                let (yd, probs) = (self.fwd(b, ins[0])?, self.fwd(b, ins[1])?);
                let outs = b.apply_n(&format!("{name}.grad"), OpKind::MoeCombineGrad(r), vec![dy, yd, probs])?;
                self.accumulate(b, ins[0], outs[0])?;
                self.accumulate(b, ins[1], outs[1])?;
            }
            OpKind::CrossEntropy { rows, classes } => {
                let k = OpKind::CrossEntropyGrad { rows, classes };
                let logits = self.fwd(b, ins[0])?;
                let dl = b.apply(&format!("{name}.grad"), k, vec![logits, ins[1]])?;
                self.accumulate(b, ins[0], dl)?;
            }
            other => {
                return Err(GraphError::Internal(format!("op {name}: no backward rule for {}", other.name())));
            }
        }
        Ok(())
    }
}

/// One Adam op per weight: reads the weight, its gradient and fp32 moments (and an fp32 master copy
/// when the weights are stored narrower than fp32); writes their next versions.
fn adam(b: &mut Builder, grad: &BTreeMap<TensorId, TensorId>) -> Result<(), GraphError> {
    let weights: Vec<TensorId> =
        (0..b.tensors.len() as u32).map(TensorId).filter(|t| b.tensors[t.idx()].role == Role::Weight).collect();
    let master = b.dtype() != DType::Fp32;
    for w in weights {
        let g = *grad
            .get(&w)
            .ok_or_else(|| GraphError::Internal(format!("weight {} received no gradient", b.tensors[w.idx()].name)))?;
        let (wname, shape) = (b.tensors[w.idx()].name.clone(), b.tensors[w.idx()].shape.clone());
        let params = b.tensors[w.idx()].elems();
        let mut state = Vec::new();
        let mut kinds = vec!["adam_m", "adam_v"];
        if master {
            kinds.push("master");
        }
        for k in &kinds {
            state.push(b.tensor(
                format!("{wname}.{k}"),
                shape.clone(),
                Elem::Float(DType::Fp32),
                Role::OptimizerState,
            )?);
        }
        let mut outs = Vec::new();
        let elem = b.elem();
        let next_w = b.tensor(format!("{wname}.next"), shape.clone(), elem, Role::Weight)?;
        b.tensors[next_w.idx()].updates = Some(w);
        outs.push(next_w);
        for (k, &s) in kinds.iter().zip(&state) {
            let t =
                b.tensor(format!("{wname}.{k}.next"), shape.clone(), Elem::Float(DType::Fp32), Role::OptimizerState)?;
            b.tensors[t.idx()].updates = Some(s);
            outs.push(t);
        }
        let mut ins = vec![w, g];
        ins.extend(state);
        b.op(format!("adam.{wname}"), OpKind::Adam { params, master }, ins, outs.clone())?;
        for t in outs {
            b.output(t);
        }
    }
    Ok(())
}
