//! The graph verifier: shapes agree on every edge, every value has one producer (sources none),
//! ops are numbered topologically (so the graph is acyclic), nothing computed is dropped, and in
//! training every weight receives a gradient and an update.
//!
//! A failure here is always a bug in a builder, never the user's input.

use std::fmt;

use super::ir::{Graph, OpId, Pass, Role, TensorId};
use super::ops::OpKind;

/// One broken invariant, naming the op or tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyError {
    pub entity: String,
    pub message: String,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.entity, self.message)
    }
}

/// Checks every invariant and returns all violations (not just the first).
pub fn verify(g: &Graph) -> Result<(), Vec<VerifyError>> {
    let mut errs = Vec::new();
    let mut report = |entity: String, message: String| errs.push(VerifyError { entity, message });
    let op_entity = |o: OpId| format!("{o} ({})", g.op(o).name);
    let t_entity = |t: TensorId| format!("{t} ({})", g.tensor(t).name);

    let mut producers: Vec<Vec<OpId>> = vec![Vec::new(); g.tensors.len()];
    let mut consumed = vec![false; g.tensors.len()];
    for o in g.op_ids() {
        let op = g.op(o);
        for &t in &op.outputs {
            producers[t.idx()].push(o);
        }
        for &t in &op.inputs {
            consumed[t.idx()] = true;
        }
        check_signature(g, o, &mut report);
    }
    for &t in &g.outputs {
        consumed[t.idx()] = true;
    }
    for (i, ps) in producers.iter().enumerate() {
        let t = TensorId(i as u32);
        let tensor = g.tensor(t);
        // A KV cache is either fed in (decode) or filled by the step (prefill); other roles are fixed.
        let source =
            tensor.role.is_source() && tensor.updates.is_none() && (tensor.role != Role::KvCache || ps.is_empty());
        match (source, ps.len()) {
            (true, 0) | (false, 1) => {}
            (true, n) => report(t_entity(t), format!("a source ({}) has {n} producers", tensor.role.name())),
            (false, n) => report(t_entity(t), format!("has {n} producers; a computed value needs exactly one")),
        }
        if !consumed[i] && !source {
            report(t_entity(t), "is computed but neither consumed nor an output".into());
        }
        if !consumed[i] && source && tensor.role == Role::Weight {
            report(t_entity(t), "a weight that no op reads".into());
        }
    }
    // Topological numbering: every edge goes from a lower to a higher op id.
    for e in g.ops.edge_indices() {
        if let Some((a, b)) = g.ops.edge_endpoints(e) {
            if a.index() >= b.index() {
                report(op_entity(OpId(b.index() as u32)), format!("reads from op{} which is not earlier", a.index()));
            }
        }
    }
    if petgraph::algo::toposort(&g.ops, None).is_err() {
        report("graph".into(), "has a cycle".into());
    }
    if g.op_ids().any(|o| g.op(o).pass == Pass::Optimizer) {
        check_training(g, &mut report);
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

fn check_signature(g: &Graph, o: OpId, report: &mut impl FnMut(String, String)) {
    let op = g.op(o);
    let entity = format!("{o} ({})", op.name);
    if let OpKind::Adam { params, master } = op.kind {
        let n = if master { 5 } else { 4 };
        if op.inputs.len() != n || op.outputs.len() != n - 1 {
            report(entity.clone(), format!("adam takes {n} inputs and gives {}", n - 1));
        }
        for &t in op.inputs.iter().chain(&op.outputs) {
            if g.tensor(t).elems() != params {
                report(entity.clone(), format!("{t} has {} elements, expected {params}", g.tensor(t).elems()));
            }
        }
        return;
    }
    let sig = op.kind.signature();
    for (what, ids, shapes) in [("input", &op.inputs, &sig.inputs), ("output", &op.outputs, &sig.outputs)] {
        if ids.len() != shapes.len() {
            report(entity.clone(), format!("has {} {what}s, its kind takes {}", ids.len(), shapes.len()));
            continue;
        }
        for (i, (t, shape)) in ids.iter().zip(shapes).enumerate() {
            let actual = &g.tensor(*t).shape;
            if actual != shape {
                report(entity.clone(), format!("{what} {i} ({t}) has shape {actual:?}, expected {shape:?}"));
            }
        }
    }
}

fn check_training(g: &Graph, report: &mut impl FnMut(String, String)) {
    // weight -> (has an Adam op reading it, that op also reads a gradient of it)
    let mut updated = vec![false; g.tensors.len()];
    for o in g.op_ids() {
        let op = g.op(o);
        if let OpKind::Adam { .. } = op.kind {
            let (w, grad) = (op.inputs[0], op.inputs.get(1).copied());
            let grad_ok = grad.is_some_and(|gr| g.tensor(gr).grad_of == Some(w));
            let next_ok = op.outputs.first().is_some_and(|n| g.tensor(*n).updates == Some(w));
            if grad_ok && next_ok {
                updated[w.idx()] = true;
            } else {
                report(
                    format!("{o} ({})", op.name),
                    "does not read the weight's gradient and write its next version".into(),
                );
            }
        }
    }
    for (i, t) in g.tensors.iter().enumerate() {
        if t.role == Role::Weight && t.updates.is_none() && !updated[i] {
            report(format!("t{i} ({})", t.name), "a weight that receives no gradient and update".into());
        }
    }
}
