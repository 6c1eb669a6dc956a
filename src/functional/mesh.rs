//! Functional runs of a compiled mesh program: what the wafer starts from (the weights, pre-placed
//! operands, caches and host inputs of the reference run's feeds) and what it ends with (the tensors
//! its readout PEs hold), checked against the reference.
//!
//! The values themselves are computed by the engine (`engine::values`), task by task, from the data
//! side table the compiler wrote (`mesh::data`); this module only prepares the start and reads the end.
//! It never evaluates an op of the graph: the reference is read for the feeds and for the comparison.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{max_rel_error, Act, FunctionalError, Numerics, Value, Values};
use crate::engine::values::{self, Frag, Setup, Storage};
use crate::graph::{Graph, TensorId};
use crate::mesh::{Coord, MeshProgram};
use crate::model::DType;

/// One result of a functional run, beside the reference's value of the same tensor.
#[derive(Clone, Debug)]
pub struct MeshOutput {
    pub name: String,
    pub tensor: TensorId,
    pub shape: Vec<u64>,
    pub values: Vec<f32>,
    /// Max |mesh - reference| over the elements, relative to the largest reference magnitude (for a
    /// gradient or an Adam output, over the elements not in `held`).
    pub max_rel_error: f64,
    /// A gradient or an Adam output: its elements whose reference gradient is below 100 x Adam's
    /// epsilon that differ from the reference, held to an absolute bound instead of the relative one
    /// (see `adam_error`); an element off by more counts in `max_rel_error`.
    pub held: usize,
}

/// The error of a result of an Adam op (its gradient input, w', m', v' or the master copy; None for
/// any other tensor) and how many of its elements were held to an absolute bound instead of the
/// relative one.
///
/// At step 1 Adam moves each weight by `lr * g / (|g| + eps)` (the bias corrections cancel), a value in
/// (-lr, lr) that depends on the gradient's size only where |g| is within a few orders of `eps`. A
/// gradient that cancels to nearly nothing (a key bias's is zero in exact arithmetic: the rows of dS
/// sum to zero) is rounding noise, whose last bits differ between any two orders of summation in fp32,
/// and they decide where in that interval the weight lands. So where the reference gradient is below
/// `floor` = 100 x Adam's epsilon, an element is held to what that noise can move: the gradient within
/// `floor`, m' within `(1 - beta1) floor`, v' within `(1 - beta2) floor^2`, w' within `2 lr`; an element
/// off by more counts in the relative error (a wrong gradient is never hidden: it is far above the
/// floor). Elsewhere the error is relative to the tensor's largest reference magnitude.
pub fn adam_error(graph: &Graph, t: TensorId, values: &[f32], reference: &Values<f32>) -> Option<(f64, usize)> {
    let a = super::AdamConfig::default();
    let floor = 100.0 * a.eps;
    let (op, bound) = graph.op_ids().map(|i| graph.op(i)).find_map(|op| {
        if !matches!(op.kind, crate::graph::OpKind::Adam { .. }) {
            return None;
        }
        if op.inputs.get(1) == Some(&t) {
            return Some((op, floor));
        }
        let i = op.outputs.iter().position(|&o| o == t)?;
        let bound = match i {
            1 => (1.0 - a.beta1) * floor,
            2 => (1.0 - a.beta2) * floor * floor,
            _ => 2.0 * a.lr,
        };
        Some((op, bound))
    })?;
    let (r, grad) = (reference.f(t), reference.f(op.inputs[1]));
    if r.len() != values.len() || grad.len() != values.len() {
        return None;
    }
    let scale = r.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)).max(f64::MIN_POSITIVE);
    let (mut worst, mut held) = (0f64, 0usize);
    for ((&m, &x), &g) in values.iter().zip(r).zip(grad) {
        let d = (m as f64 - x as f64).abs();
        if !d.is_finite() {
            return Some((f64::INFINITY, held));
        }
        if (g.abs() as f64) < floor && d <= bound {
            // (Counted where the two differ at all: a zero gradient moves neither.)
            held += (d > 0.0) as usize;
        } else {
            worst = worst.max(d / scale);
        }
    }
    Some((worst, held))
}

/// The start of a functional run of `program`: fails (the user's request, exit 2) naming what the
/// program does that functional mode does not support yet.
pub fn setup(
    program: &MeshProgram,
    graph: &Graph,
    numerics: &Numerics,
    reference: &Values<f32>,
) -> Result<Setup, FunctionalError> {
    setup_with(program, graph, numerics, reference, false)
}

/// The start of a partial functional run (a development aid: `outputs_partial` reads its end): the
/// regions functional mode refuses run without values, and so does everything downstream of them;
/// the results computed in full are checked as in a whole run.
pub fn setup_partial(
    program: &MeshProgram,
    graph: &Graph,
    numerics: &Numerics,
    reference: &Values<f32>,
) -> Result<Setup, FunctionalError> {
    setup_with(program, graph, numerics, reference, true)
}

fn setup_with(
    program: &MeshProgram,
    graph: &Graph,
    numerics: &Numerics,
    reference: &Values<f32>,
    partial: bool,
) -> Result<Setup, FunctionalError> {
    let Some(data) = program.data.as_ref() else {
        return Err(FunctionalError::Unsupported("this program has no data side table (a synthetic program)".into()));
    };
    if let (false, Some(why)) = (partial, data.refusal()) {
        return Err(FunctionalError::Unsupported(why));
    }
    if data.readouts.is_empty() {
        return Err(FunctionalError::Unsupported("the program leaves no result a functional run can read".into()));
    }
    let storage = match graph.workload.dtype {
        DType::Fp32 => Storage::Fp32,
        DType::Fp16 => Storage::Fp16,
        DType::Bf16 => Storage::Bf16,
        DType::Fp8 => return Err(FunctionalError::Unsupported("fp8 storage (use --dtype fp32, fp16 or bf16)".into())),
    };
    let producers = graph.producers();
    let tensors: BTreeMap<u32, Arc<[f32]>> = (0..graph.tensors.len())
        .filter(|&i| producers[i].is_none())
        .map(|i| {
            let v: Arc<[f32]> = match &reference.values[i] {
                Value::F(v) => Arc::from(v.as_slice()),
                // Token ids, positions: exact as floats below 2^24.
                Value::I(ids) => ids.iter().map(|&x| x as f32).collect(),
            };
            (i as u32, v)
        })
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let ints =
        (0..graph.tensors.len()).filter(|&i| matches!(reference.values[i], Value::I(_))).map(|i| i as u32).collect();
    let mut inv_freq = BTreeMap::new();
    for o in graph.op_ids() {
        if let crate::graph::OpKind::Rotary { rot_dims, .. } = graph.op(o).kind {
            inv_freq.entry(rot_dims).or_insert_with(|| numerics.inv_freq(rot_dims));
        }
    }
    let numerics = values::Numerics {
        norm_eps: numerics.norm_eps,
        rotary_interleaved: numerics.rotary_style == super::RotaryStyle::Interleaved,
        gelu_tanh: numerics.act == Act::GeluTanh,
        sliding_window: numerics.sliding_window,
    };
    // The reference's optimizer: one step of torch.optim.Adam's defaults (`AdamConfig::default`), the
    // step `wafer run --functional` and `wafer reference` evaluate.
    let a = super::AdamConfig::default();
    let adam = (a.lr, a.beta1, a.beta2, a.eps, a.step);
    Ok(Setup { data: Arc::clone(data), tensors, storage, ints, numerics, inv_freq, adam, partial })
}

/// Assembles the program's results from what its readout PEs hold, checks that every value is there
/// exactly once with every term of its sum, and compares each with the reference.
pub fn outputs(
    program: &MeshProgram,
    graph: &Graph,
    results: &[(Option<Coord>, Frag)],
    reference: &Values<f32>,
) -> Result<Vec<MeshOutput>, FunctionalError> {
    outputs_with(program, graph, results, reference, false).map(|(o, _)| o)
}

/// The end of a partial run (`setup_partial`): the results computed in full, checked as `outputs`
/// checks them, and the names of the readouts no PE holds any value of (downstream of a refused
/// region). A result held in part is still an error.
pub fn outputs_partial(
    program: &MeshProgram,
    graph: &Graph,
    results: &[(Option<Coord>, Frag)],
    reference: &Values<f32>,
) -> Result<(Vec<MeshOutput>, Vec<String>), FunctionalError> {
    outputs_with(program, graph, results, reference, true)
}

fn outputs_with(
    program: &MeshProgram,
    graph: &Graph,
    results: &[(Option<Coord>, Frag)],
    reference: &Values<f32>,
    partial: bool,
) -> Result<(Vec<MeshOutput>, Vec<String>), FunctionalError> {
    let Some(data) = program.data.as_ref() else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for r in &data.readouts {
        let (rows, cols) = (r.rows as usize, r.cols as usize);
        let mut values = vec![0f32; rows * cols];
        let mut seen = vec![false; rows * cols];
        let here = |c: &Option<Coord>| match (r.rect, c) {
            (Some(rect), Some(c)) => rect.contains(*c),
            (None, None) => true,
            _ => false,
        };
        for (at, f) in results.iter().filter(|(c, f)| here(c) && f.tensor == r.tensor) {
            let who = at.map_or("a port".to_string(), |c| format!("PE ({},{})", c.x, c.y));
            if f.cover != r.cover {
                return Err(FunctionalError::Mesh(format!(
                    "`{}`: {who} holds columns {}..{} summed over {} of {} terms (a missing reduction)",
                    r.name, f.c0, f.c1, f.cover, r.cover
                )));
            }
            let w = (f.c1 - f.c0) as usize;
            for (i, v) in f.vals.iter().enumerate() {
                let (row, col) = (f.r0 as usize + i / w.max(1), f.c0 as usize + i % w.max(1));
                let idx = row * cols + col;
                if row >= rows || col >= cols || f.view_cols as usize != cols || seen[idx] {
                    return Err(FunctionalError::Mesh(format!(
                        "`{}`: {who} holds element ({row}, {col}) outside the result or held twice",
                        r.name
                    )));
                }
                seen[idx] = true;
                values[idx] = *v;
            }
        }
        if partial && !seen.iter().any(|&s| s) {
            missing.push(r.name.clone());
            continue;
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(FunctionalError::Mesh(format!(
                "`{}`: element ({}, {}) is on no readout PE after the run",
                r.name,
                i / cols.max(1),
                i % cols.max(1)
            )));
        }
        let t = TensorId(r.tensor);
        let (max_rel_error, held) =
            adam_error(graph, t, &values, reference).unwrap_or_else(|| (max_rel_error(&values, reference.f(t)), 0));
        out.push(MeshOutput {
            name: r.name.clone(),
            tensor: t,
            shape: graph.tensor(t).shape.clone(),
            values,
            max_rel_error,
            held,
        });
    }
    if partial {
        out.extend(tapped(graph, results, reference, &out));
    }
    Ok((out, missing))
}

/// A partial run's intermediate tensors: those the output gateways passed on in full (`values::TAP`),
/// beside the reference, besides the readouts already in `have`.
fn tapped(
    graph: &Graph,
    results: &[(Option<Coord>, Frag)],
    reference: &Values<f32>,
    have: &[MeshOutput],
) -> Vec<MeshOutput> {
    let mut by: BTreeMap<u32, Vec<&Frag>> = BTreeMap::new();
    for (_, f) in results.iter().filter(|(c, _)| *c == Some(values::TAP)) {
        by.entry(f.tensor).or_default().push(f);
    }
    let mut out = Vec::new();
    for (t, frags) in by {
        let Some(tt) = graph.tensors.get(t as usize) else { continue };
        if have.iter().any(|o| o.tensor.0 == t) || !matches!(reference.values[t as usize], Value::F(_)) {
            continue;
        }
        let cols = frags[0].view_cols.max(1) as usize;
        let n = tt.elems() as usize;
        let mut values = vec![0f32; n];
        let mut seen = vec![false; n];
        for f in frags.iter().filter(|f| f.view_cols as usize == cols) {
            let w = (f.c1 - f.c0).max(1) as usize;
            for (i, v) in f.vals.iter().enumerate() {
                let idx = (f.r0 as usize + i / w) * cols + f.c0 as usize + i % w;
                if idx < n {
                    seen[idx] = true;
                    values[idx] = *v;
                }
            }
        }
        if seen.iter().all(|&s| s) {
            let tensor = TensorId(t);
            let max_rel_error = max_rel_error(&values, reference.f(tensor));
            let shape = tt.shape.clone();
            out.push(MeshOutput { name: tt.name.clone(), tensor, shape, values, max_rel_error, held: 0 });
        }
    }
    out
}
