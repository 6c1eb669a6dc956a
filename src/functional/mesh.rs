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
    /// A gradient or an Adam output: its elements whose reference gradient is below the noise floor
    /// that differ from the reference, held to an absolute bound instead of the relative one (see
    /// `adam_error`); an element off by more counts in `max_rel_error`.
    pub held: usize,
    /// A result of a training step (the loss, a gradient, w', m', v', the master copy): the largest
    /// `max_rel_error` the rounding model allows it (`training_bound`); None for inference results,
    /// which their own tests bound.
    pub bound: Option<f64>,
}

impl MeshOutput {
    /// True when the result is within the bound the rounding model states for it (or has none).
    pub fn within_bound(&self) -> bool {
        self.bound.is_none_or(|b| self.max_rel_error <= b)
    }
}

/// A training step's results in fp32 are held to 1e-4 relative to the tensor's largest reference
/// magnitude: fp32 rounding, summed in other orders on the mesh than in the reference, is far below it
/// (3e-6 measured on the tiny models).
pub const FP32_BOUND: f64 = 1e-4;

/// How many storage roundings (`unit_roundoff`) of a tensor's largest value a training step's value
/// may differ by between the mesh and the reference with fp16/bf16 storage (see `training_bound`).
pub const STORAGE_ROUNDINGS: f64 = 8.0;

/// The unit roundoff of a storage dtype: the largest relative error of rounding to nearest, half the
/// spacing of its numbers at 1 (fp16: 11 significant bits, 2^-11; bf16: 8, 2^-8); 0 for fp32, whose
/// rounding `FP32_BOUND` covers.
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::Fp16 => (-11f64).exp2(),
        DType::Bf16 => (-8f64).exp2(),
        DType::Fp32 | DType::Fp8 => 0.0,
    }
}

/// Which result of a training step a tensor is, for its bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainResult {
    /// The loss, a gradient, or m' (the gradient scaled by 1 - beta1).
    Linear,
    /// v' (the gradient squared, scaled by 1 - beta2).
    Square,
    /// The weight w' as stored in the step's dtype.
    Weight,
    /// The fp32 master copy of w' (fp16/bf16 training), or w' itself in fp32.
    Master,
}

/// The bound the rounding model states for a training step's result with `dtype` storage, relative to
/// the tensor's largest reference magnitude (elements below the noise floor aside: `adam_error`).
///
/// The rounding model (`engine::values`, `functional::reference`): fp32 arithmetic everywhere, values
/// rounded to the storage dtype where they are stored or sent (the mesh: when a PE loads its tiles and
/// in every wavelet; the reference: every stored tensor), each rounding off by at most `u` (the unit
/// roundoff) of the value rounded. The mesh and the reference round at different points of the same
/// computation, so a value differs between them by the roundings one makes and the other does not,
/// carried to it through the step. With the forward pass, the loss and the backward pass of the tiny
/// models, we hold every linear result (the loss, each gradient, m' = (1 - beta1) g) to `k` =
/// `STORAGE_ROUNDINGS` = 8 such roundings of the tensor's largest value: `k u`, 3.9e-3 in fp16 and
/// 3.1e-2 in bf16 (measured: at most 3.2 u in fp16 and 4.3 u in bf16, gpt/llama/neox/gptj-tiny on
/// 32x32 and 64x64 and bert-tiny on 64x64, 16 tokens). Where a gradient's terms cancel (a bias's, an
/// embedding's, the attention's score path from the softmax gradient on) the roundings are of its
/// terms, and the `k u` is of their size instead (`gradient_terms`). Then:
/// - v' = (1 - beta2) g^2: |g'^2 - g^2| <= |g' - g| (2|g| + |g' - g|), so `2 k u + (k u)^2` of
///   (1 - beta2) g^2; where the terms T are larger than g, of (1 - beta2) T (max|g| + k u T), which
///   bounds (1 - beta2) e (2|g| + e) for e <= k u T.
/// - The master copy of w': at step 1 Adam moves each weight by `lr g / (|g| + eps)`, sign(g) lr to
///   within eps/|g|, whatever |g| is; so where the gradient's error cannot flip its sign (|g| above the
///   noise floor `k u max|g|`) the master copy differs only by fp32 rounding: `FP32_BOUND`.
/// - w' as stored: the master copy rounded to the dtype, by the mesh and the reference each (or kept
///   unrounded by one of them): within one storage ulp, `2 u`, of the master copy's bound.
///
/// Where the gradient is below the noise floor its sign is noise, and `adam_error` holds those elements
/// to what noise can move (w' by up to 2 lr) instead.
pub fn training_bound(dtype: DType, what: TrainResult) -> f64 {
    let ku = STORAGE_ROUNDINGS * unit_roundoff(dtype);
    FP32_BOUND
        + match what {
            TrainResult::Linear => ku,
            TrainResult::Square => 2.0 * ku + ku * ku,
            TrainResult::Weight => 2.0 * unit_roundoff(dtype),
            TrainResult::Master => 0.0,
        }
}

/// The error of a result of an Adam op (its gradient input, w', m', v' or the master copy; None for
/// any other tensor), how many of its elements were held to an absolute bound instead of the relative
/// one, and the relative bound the rounding model states for it (`training_bound`).
///
/// At step 1 Adam moves each weight by `lr * g / (|g| + eps)` (the bias corrections cancel), a value in
/// (-lr, lr) that depends on the gradient's size only where |g| is within a few orders of `eps`, and on
/// its sign everywhere. A gradient element that is no larger than the noise the mesh and the reference
/// differ by has a sign that is noise: a gradient that cancels to nearly nothing (a key bias's is zero
/// in exact arithmetic: the rows of dS sum to zero) is fp32 rounding noise, whose last bits differ
/// between any two orders of summation; with fp16/bf16 storage the noise is the gradient's bound, `k u`
/// of the tensor's largest |g| (`training_bound`). So where the reference gradient is below the floor
/// `N` = max(100 x Adam's epsilon, k u max|g|), an element is held to what that noise can move: the
/// gradient within `N`, m' within `(1 - beta1) N`, v' within `(1 - beta2) 3 N^2` (|g'^2 - g^2| with
/// |g|, |g' - g| <= N), the master copy within `2 lr` (and fp32's bound: a flipped step moves it by
/// 2 lr exactly, give or take its rounding) and w' as stored one storage ulp more; an element off by more counts in the relative error (a wrong gradient is never
/// hidden: it is far above the floor). Elsewhere the error is relative to the tensor's largest
/// reference magnitude.
pub fn adam_error(graph: &Graph, t: TensorId, values: &[f32], reference: &Values<f32>) -> Option<(f64, usize, f64)> {
    let a = super::AdamConfig::default();
    let dtype = graph.workload.dtype;
    let u = unit_roundoff(dtype);
    let (op, what) = graph.op_ids().map(|i| graph.op(i)).find_map(|op| {
        if !matches!(op.kind, crate::graph::OpKind::Adam { .. }) {
            return None;
        }
        if op.inputs.get(1) == Some(&t) {
            return Some((op, TrainResult::Linear));
        }
        let i = op.outputs.iter().position(|&o| o == t)?;
        let what = match i {
            1 => TrainResult::Linear,
            2 => TrainResult::Square,
            // w' is the master copy itself where there is none (fp32).
            0 if op.outputs.len() > 3 => TrainResult::Weight,
            _ => TrainResult::Master,
        };
        Some((op, what))
    })?;
    let (r, grad) = (reference.f(t), reference.f(op.inputs[1]));
    if r.len() != values.len() || grad.len() != values.len() {
        return None;
    }
    let max_of = |xs: &[f32]| xs.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)).max(f64::MIN_POSITIVE);
    let terms = gradient_terms(graph, reference, op.inputs[1]);
    let scale = max_of(r).max(match (what, op.outputs.iter().position(|&o| o == t)) {
        (TrainResult::Linear, None) => terms,
        (TrainResult::Linear, Some(_)) => (1.0 - a.beta1) * terms,
        (TrainResult::Square, _) => (1.0 - a.beta2) * terms * (max_of(grad) + STORAGE_ROUNDINGS * u * terms),
        _ => 0.0,
    });
    let floor = (100.0 * a.eps).max(STORAGE_ROUNDINGS * u * terms);
    let held_bound = match what {
        TrainResult::Linear if op.inputs.get(1) == Some(&t) => floor,
        TrainResult::Linear => (1.0 - a.beta1) * floor,
        TrainResult::Square => (1.0 - a.beta2) * 3.0 * floor * floor,
        // (A flipped step moves w by 2 lr exactly, give or take the rounding of w itself.)
        TrainResult::Master => 2.0 * a.lr + FP32_BOUND * scale,
        TrainResult::Weight => 2.0 * a.lr + (FP32_BOUND + 2.0 * u) * scale,
    };
    let (mut worst, mut held) = (0f64, 0usize);
    for ((&m, &x), &g) in values.iter().zip(r).zip(grad) {
        let d = (m as f64 - x as f64).abs();
        if !d.is_finite() {
            return Some((f64::INFINITY, held, training_bound(dtype, what)));
        }
        if (g.abs() as f64) < floor && d <= held_bound {
            // (Counted where the two differ at all: a zero gradient moves neither.)
            held += (d > 0.0) as usize;
        } else {
            worst = worst.max(d / scale);
        }
    }
    Some((worst, held, training_bound(dtype, what)))
}

/// Max |mesh - reference| of a result that is no input or output of an Adam op, relative to the size
/// of its terms: on the attention's score path (`score_terms`) the largest of its terms, elsewhere its
/// own largest reference magnitude (`max_rel_error`).
fn terms_rel_error(graph: &Graph, t: TensorId, values: &[f32], reference: &Values<f32>) -> f64 {
    let r = reference.f(t);
    let e = max_rel_error(values, r);
    match score_terms(graph, reference, t) {
        Some(terms) if e.is_finite() && e > 0.0 => {
            let diff = values.iter().zip(r).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
            diff / max_abs(&terms).max(max_abs(r)).max(f64::MIN_POSITIVE)
        }
        _ => e,
    }
}

/// The size of a gradient's terms in the reference, which its roundings are of however much the terms
/// cancel: a bias gradient is the column sum of dy, of the size of |dy|'s column sums (a key bias's
/// gradient is zero in exact arithmetic: what is left of it is noise of that size; `bias_terms`); a
/// gradient on the attention's score path, that of the softmax gradient's terms carried to it
/// (`score_terms`); any other gradient, its own largest value.
pub fn gradient_terms(graph: &Graph, reference: &Values<f32>, g: TensorId) -> f64 {
    bias_terms(graph, reference, g)
        .unwrap_or(0.0)
        .max(score_terms(graph, reference, g).map_or(0.0, |t| max_abs(&t)))
        .max(max_abs(reference.f(g)))
        .max(f64::MIN_POSITIVE)
}

/// A gradient that sums rows of dy: the largest sum of |dy| over the rows one element sums, in the
/// reference, the size of the terms however much they cancel. A bias gradient (the second output of a
/// linear's weight gradient) sums each column over every row; an embedding gradient each column over
/// the rows whose id is the table row; a sum of gradients (tied weights) the terms of its parts. None
/// for any other tensor.
fn bias_terms(graph: &Graph, reference: &Values<f32>, g: TensorId) -> Option<f64> {
    let op = graph.op(graph.producers()[g.0 as usize]?);
    let n = graph.tensor(g).elems() as usize;
    let sums = |dy: &[f32], width: usize, row_of: &dyn Fn(usize) -> Option<usize>| -> Option<f64> {
        let mut sums = vec![0f64; n];
        if width == 0 || !dy.len().is_multiple_of(width) {
            return None;
        }
        for (r, row) in dy.chunks_exact(width).enumerate() {
            let at = row_of(r)? * width;
            for (s, &x) in sums.get_mut(at..at + width)?.iter_mut().zip(row) {
                *s += x.abs() as f64;
            }
        }
        Some(sums.into_iter().fold(0.0, f64::max))
    };
    match op.kind {
        crate::graph::OpKind::LinearWgrad(_) if op.outputs.get(1) == Some(&g) => {
            sums(reference.f(*op.inputs.get(1)?), n, &|_| Some(0))
        }
        crate::graph::OpKind::EmbeddingGrad { width, .. } => {
            let Value::I(ids) = &reference.values[op.inputs.first()?.idx()] else { return None };
            let width = width as usize;
            sums(reference.f(*op.inputs.get(1)?), width, &|r| ids.get(r).and_then(|&i| usize::try_from(i).ok()))
        }
        crate::graph::OpKind::Add { .. } => Some(
            op.inputs
                .iter()
                .map(|&t| {
                    let score = score_terms(graph, reference, t).map_or(0.0, |t| max_abs(&t));
                    bias_terms(graph, reference, t).unwrap_or(0.0).max(score).max(max_abs(reference.f(t)))
                })
                .sum(),
        ),
        _ => None,
    }
}

/// The terms of a gradient on the attention's score path, element by element, in the reference: what
/// its roundings are of, however much the terms cancel. None for a tensor off that path, whose terms
/// are its own values.
///
/// The softmax gradient dS = s P (dP - rowsum(P dP)) (s = 1/sqrt(head_dim)) sums to zero over each row:
/// its elements are differences of terms of the size of s P |dP| and s P |rowsum|, and the roundings the
/// mesh and the reference make differently are of the terms (`k u` of them, as for any linear result),
/// not of the difference. So dS's terms are T = s P (|dP| + |rowsum(P dP)|), and each product after it
/// carries its error through the same sums: dQ = dS K has terms T |K|, dK = dS^T Q has T^T |Q|, the
/// rotary gradient mixes each element with its pair by cos and sin (at most the sum of the two pairs'
/// terms; the pair is the element half a rotation away or its neighbour, by the model's style, and we
/// take the larger of both), the fused q/k/v gradient (`SplitGrad`) places them, a weight gradient
/// X^T dY has |X|^T T and its bias the column sums of T, the data gradient dY W^T has T |W|^T, and a
/// sum of gradients (the residual's) the sums of its parts' terms (or |values| where a part has none).
/// Dense linears only (a grouped one's rows are routed). The terms stop at a norm's gradient, whose
/// result is measured against its own size.
fn score_terms(graph: &Graph, reference: &Values<f32>, t: TensorId) -> Option<Vec<f32>> {
    use crate::graph::OpKind;
    let op = graph.op(graph.producers()[t.0 as usize]?);
    let abs = |t: TensorId| reference.f(t).iter().map(|x| x.abs()).collect::<Vec<f32>>();
    let terms_or_abs = |t: TensorId| score_terms(graph, reference, t).unwrap_or_else(|| abs(t));
    let out = op.outputs.iter().position(|&o| o == t)?;
    let terms = match op.kind {
        OpKind::AttnSoftmaxGrad(a) => {
            let (p, dp) = (reference.f(op.inputs[0]), reference.f(op.inputs[1]));
            let (kv, s) = (a.kv_len as usize, 1.0 / (a.head_dim as f32).sqrt());
            if kv == 0 || p.len() != dp.len() || !p.len().is_multiple_of(kv) {
                return None;
            }
            let mut t = vec![0f32; p.len()];
            for ((t, p), dp) in t.chunks_exact_mut(kv).zip(p.chunks_exact(kv)).zip(dp.chunks_exact(kv)) {
                let dot: f32 = p.iter().zip(dp).map(|(p, dp)| p * dp).sum::<f32>().abs();
                for ((t, p), dp) in t.iter_mut().zip(p).zip(dp) {
                    *t = s * p.abs() * (dp.abs() + dot);
                }
            }
            t
        }
        OpKind::AttnScoresGradQ(a) => {
            super::reference::attn_context(&a, &score_terms(graph, reference, op.inputs[0])?, &abs(op.inputs[1]))
        }
        OpKind::AttnScoresGradK(a) => {
            super::reference::attn_kv_grad(&a, &score_terms(graph, reference, op.inputs[0])?, &abs(op.inputs[1]))
        }
        OpKind::RotaryGrad { heads, head_dim, rot_dims, .. } => {
            let x = score_terms(graph, reference, op.inputs[0])?;
            let (d, rot) = (head_dim as usize, rot_dims as usize);
            let width = heads as usize * d;
            if d == 0 || rot > d || width == 0 || !x.len().is_multiple_of(width) {
                return None;
            }
            let mut y = x.clone();
            for (e, y) in y.iter_mut().enumerate() {
                let (base, i) = (e - e % d, e % d);
                if i < rot {
                    let half = if i < rot / 2 { i + rot / 2 } else { i - rot / 2 };
                    *y += x[base + half].max(x[base + (i ^ 1)]);
                }
            }
            y
        }
        OpKind::SplitGrad { rows, widths } => {
            let parts: Vec<Option<Vec<f32>>> = op.inputs.iter().map(|&p| score_terms(graph, reference, p)).collect();
            if parts.iter().all(Option::is_none) {
                return None;
            }
            let parts: Vec<Vec<f32>> =
                parts.into_iter().zip(&op.inputs).map(|(t, &p)| t.unwrap_or_else(|| abs(p))).collect();
            let mut y = Vec::new();
            for r in 0..rows as usize {
                for (p, &w) in parts.iter().zip(&widths) {
                    y.extend_from_slice(p.get(r * w as usize..(r + 1) * w as usize)?);
                }
            }
            y
        }
        OpKind::LinearWgrad(l) if l.groups == 1 && l.weight_groups == 1 => {
            let dy = score_terms(graph, reference, op.inputs[1])?;
            let x = abs(op.inputs[0]);
            if l.k == 0 || !x.len().is_multiple_of(l.k as usize) {
                return None;
            }
            let (dw, db) = super::reference::linear_wgrad(&l, &[(0, 0, x.len() / l.k as usize)], &x, &dy);
            if out == 0 {
                dw
            } else {
                db
            }
        }
        OpKind::LinearDgrad(l) if l.groups == 1 && l.weight_groups == 1 => {
            let dy = score_terms(graph, reference, op.inputs[0])?;
            super::reference::linear_dgrad(&l, &[(0, 0, l.m as usize)], &dy, &abs(op.inputs[1]))
        }
        OpKind::Add { .. } => {
            if op.inputs.iter().all(|&p| score_terms(graph, reference, p).is_none()) {
                return None;
            }
            let mut y = vec![0f32; reference.f(t).len()];
            for &p in &op.inputs {
                for (y, x) in y.iter_mut().zip(terms_or_abs(p)) {
                    *y += x;
                }
            }
            y
        }
        _ => return None,
    };
    (terms.len() == reference.f(t).len()).then_some(terms)
}

fn max_abs(xs: &[f32]) -> f64 {
    xs.iter().fold(0f64, |m, &x| m.max(x.abs() as f64))
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
    // The wafer's routing: every MoE top-k's probabilities, read back from its output gateway.
    let taps = graph
        .op_ids()
        .map(|o| graph.op(o))
        .filter(|op| matches!(op.kind, crate::graph::OpKind::MoeTopK(_)))
        .map(|op| op.outputs[0].0)
        .collect();
    Ok(Setup { data: Arc::clone(data), tensors, storage, ints, numerics, inv_freq, adam, partial, taps })
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
            // A fragment may view the result in rows of another length: a grouped (expert) linear's
            // `[capacity, slots * n]` is the dispatched `[slots * capacity, n]`, the same row-major values.
            let (w, vc) = ((f.c1 - f.c0) as usize, f.view_cols as usize);
            let reshaped = vc != cols && vc > 0 && (rows * cols).is_multiple_of(vc);
            for (i, v) in f.vals.iter().enumerate() {
                let (fr, fc) = (f.r0 as usize + i / w.max(1), f.c0 as usize + i % w.max(1));
                let flat = fr * vc + fc;
                let (row, col) = if reshaped { (flat / cols.max(1), flat % cols.max(1)) } else { (fr, fc) };
                let idx = row * cols + col;
                // A port may be sent one value twice (a tensor saved to MemoryX for two consumers):
                // the same bits again are the same value.
                let again =
                    at.is_none() && row < rows && col < cols && seen[idx] && values[idx].to_bits() == v.to_bits();
                if row >= rows || col >= cols || fc >= vc || (vc != cols && !reshaped) || (seen[idx] && !again) {
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
        let (max_rel_error, held, bound) = judge(graph, t, &values, reference);
        out.push(MeshOutput {
            name: r.name.clone(),
            tensor: t,
            shape: graph.tensor(t).shape.clone(),
            values,
            max_rel_error,
            held,
            bound,
        });
    }
    // A partial run's intermediate tensors; in any run, the MoE top-k's probabilities (`Setup::taps`).
    out.extend(tapped(graph, results, reference, &out));
    Ok((out, missing))
}

/// A result's error against the reference, the elements held to the noise floor, and its bound (see
/// `MeshOutput`).
fn judge(graph: &Graph, t: TensorId, values: &[f32], reference: &Values<f32>) -> (f64, usize, Option<f64>) {
    // A training step's other results (the loss) are linear in the values the step stores.
    let training = graph.op_ids().any(|o| matches!(graph.op(o).kind, crate::graph::OpKind::Adam { .. }));
    match adam_error(graph, t, values, reference) {
        Some((e, held, bound)) => (e, held, Some(bound)),
        None => (
            terms_rel_error(graph, t, values, reference),
            0,
            training.then(|| training_bound(graph.workload.dtype, TrainResult::Linear)),
        ),
    }
}

/// Judges every result again against another reference run (one that follows the wafer's routing).
pub fn rejudge(graph: &Graph, outputs: &mut [MeshOutput], reference: &Values<f32>) {
    for o in outputs {
        (o.max_rel_error, o.held, o.bound) = judge(graph, o.tensor, &o.values, reference);
    }
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
            out.push(MeshOutput { name: tt.name.clone(), tensor, shape, values, max_rel_error, held: 0, bound: None });
        }
    }
    out
}

/// Where the wafer's MoE routing differs from the reference's, the first such token (None: it does not,
/// or no top-k is among the results, as in a pipelined step): a top-k's probabilities read back (the
/// weight-streaming forward phase saves them), compared by the experts each token chose, in choice order.
/// In fp16/bf16 a near-tie of two router logits can round otherwise on the wafer than in the reference
/// (sums in another order); what is downstream of it then differs by more than any rounding bound.
pub fn routing_divergence(graph: &Graph, outputs: &[MeshOutput], reference: &Values<f32>) -> Option<String> {
    routed_otherwise(graph, outputs, reference).into_iter().next().map(|d| d.describe())
}

/// A token a top-k routed otherwise on the wafer than in the reference.
struct Divergence<'a> {
    topk: &'a str,
    /// The router logits the top-k ranks.
    logits: TensorId,
    experts: usize,
    token: usize,
    wafer: &'a [f32],
    reference: &'a [f32],
}

impl Divergence<'_> {
    fn describe(&self) -> String {
        let (m, x) = (self.wafer, self.reference);
        format!(
            "`{}` routes token {} to experts {:?} (probabilities {m:?}) on the wafer and {:?} ({x:?}) in the reference",
            self.topk,
            self.token,
            chosen(m),
            chosen(x)
        )
    }
}

/// The chosen experts of one token's stored probabilities, highest first (ties to the lower expert, as
/// the top-k's).
fn chosen(row: &[f32]) -> Vec<usize> {
    let mut c: Vec<usize> = (0..row.len()).filter(|&i| row[i] != 0.0).collect();
    c.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    c
}

/// Every token a read-back top-k routed otherwise than the reference, in result and token order.
fn routed_otherwise<'a>(
    graph: &'a Graph,
    outputs: &'a [MeshOutput],
    reference: &'a Values<f32>,
) -> Vec<Divergence<'a>> {
    let producers = graph.producers();
    let mut out = Vec::new();
    for o in outputs {
        let Some(p) = producers.get(o.tensor.idx()).copied().flatten() else { continue };
        let op = graph.op(p);
        let (crate::graph::OpKind::MoeTopK(_), Some(&e)) = (&op.kind, o.shape.last()) else { continue };
        let e = e as usize;
        let r = reference.f(o.tensor);
        if e == 0 || r.len() != o.values.len() {
            continue;
        }
        for (t, (m, x)) in o.values.chunks_exact(e).zip(r.chunks_exact(e)).enumerate() {
            if chosen(m) != chosen(x) {
                out.push(Divergence {
                    topk: &op.name,
                    logits: op.inputs[0],
                    experts: e,
                    token: t,
                    wafer: m,
                    reference: x,
                });
            }
        }
    }
    out
}

/// The routing a reference run must follow to compare with the wafer's results (`Options::forced_routing`:
/// by top-k op and token, the wafer's experts in rank order), where the wafer's read-back top-k chose
/// otherwise: accepted only where the wafer's choice is a near-tie, a ranking the reference's router
/// logits give once each moves by at most the rounding bound of a result (`STORAGE_ROUNDINGS` storage
/// roundings of the row's largest logit): every expert the wafer ranks before another has a logit at most
/// twice that below the other's. Err names the first token routed otherwise by more than a near-tie
/// (a wrong top-k or router, which no reference should follow). Empty: the wafer routed as the reference.
pub fn follow_routing(
    graph: &Graph,
    outputs: &[MeshOutput],
    reference: &Values<f32>,
) -> Result<BTreeMap<String, BTreeMap<usize, Vec<usize>>>, String> {
    let u = unit_roundoff(graph.workload.dtype);
    let mut forced: BTreeMap<String, BTreeMap<usize, Vec<usize>>> = BTreeMap::new();
    for d in routed_otherwise(graph, outputs, reference) {
        let logits = reference.f(d.logits);
        let row = logits.get(d.token * d.experts..(d.token + 1) * d.experts).unwrap_or(&[]);
        let tol = 2.0 * STORAGE_ROUNDINGS * u * row.iter().fold(0f64, |m, &l| m.max(l.abs() as f64));
        let wafer = chosen(d.wafer);
        // Each chosen expert against every expert ranked after it: those chosen later, then the rest.
        let after = |i: usize| wafer[i + 1..].iter().copied().chain((0..d.experts).filter(|x| !wafer.contains(x)));
        let near = row.len() == d.experts
            && (0..wafer.len()).all(|i| after(i).all(|b| row[wafer[i]] as f64 >= row[b] as f64 - tol));
        if !near {
            return Err(d.describe());
        }
        forced.entry(d.topk.to_string()).or_default().insert(d.token, wafer);
    }
    Ok(forced)
}

/// The results of weight-streaming training, run as the compiler splits it (`compile::Compiled::phases`):
/// the engine's run of each phase and every result, beside the reference.
pub struct Phased {
    pub runs: Vec<crate::engine::EngineRun>,
    pub outputs: Vec<MeshOutput>,
}

/// Weight-streaming training on the mesh: the forward phase, then the backward phase, on the same wafer,
/// with MemoryX between and after them (`eopts`: the engine's options for each phase).
///
/// Each phase runs with values like any program (weights streaming in from MemoryX every iteration).
/// What a phase sends to MemoryX or SwarmX its ports collect (`Kernel::Collect`, read back like any
/// result and checked against the reference): the forward phase's activations saved for the backward
/// pass, the backward phase's weight gradients and the embedding rows' gradient. The next phase starts
/// with what MemoryX holds: its ports stream those saved tensors back in (`Kernel::Source`, layer by
/// layer in the backward loop's order). A mixture of experts' saved activations in the dispatched
/// layout (`graph::Route::dispatch`) leave in the expert linears' `[capacity, slots * n]` view and are
/// read back, and streamed in again, as the `[slots * capacity, n]` tensors they are (`outputs`); no slot
/// map crosses MemoryX: the backward phase's combine gradient derives the routing again from the saved
/// probabilities, as the pipelined step's does. After the last phase MemoryX runs the ops the plan places off
/// the wafer (`compile::runs_in_memoryx`: the embedding gradients' scatter-add, the sums of tied weights'
/// gradients, and Adam) on the values the wafer sent it, with the reference's semantics and rounding
/// (`functional::reference::evaluate_ops`): every input of those ops must be a step input (weights, Adam
/// state, ids), an output of another of them, or a value the wafer sent, else the run fails naming it;
/// the gradients they leave, w', m', v' (and the master copy) are checked as the pipelined step's are
/// (`adam_error`).
pub fn run_phases(
    programs: &[(String, MeshProgram)],
    graph: &Graph,
    numerics: &Numerics,
    reference: &Values<f32>,
    eopts: &[crate::engine::EngineOptions],
) -> Result<Phased, crate::Error> {
    run_phases_with(programs, graph, numerics, reference, eopts, |_| {})
}

/// `run_phases`, with `between` given what MemoryX holds (by tensor) before each later phase starts
/// and at the end, before its own ops: a test's way to show a phase really starts from it.
pub fn run_phases_with(
    programs: &[(String, MeshProgram)],
    graph: &Graph,
    numerics: &Numerics,
    reference: &Values<f32>,
    eopts: &[crate::engine::EngineOptions],
    mut between: impl FnMut(&mut BTreeMap<u32, Arc<[f32]>>),
) -> Result<Phased, crate::Error> {
    let mut runs = Vec::new();
    let mut outputs: Vec<MeshOutput> = Vec::new();
    // What MemoryX holds: the tensors the phases sent out through the ports, by tensor.
    let mut held: BTreeMap<u32, Arc<[f32]>> = BTreeMap::new();
    for (i, ((_, prog), eopts)) in programs.iter().zip(eopts).enumerate() {
        if i > 0 {
            between(&mut held);
        }
        let mut s = setup(prog, graph, numerics, reference)?;
        for (&t, v) in &held {
            s.tensors.insert(t, Arc::clone(v));
        }
        let (run, results) = crate::engine::run_functional(prog, eopts, Arc::new(s))?;
        let outs = self::outputs(prog, graph, &results, reference)?;
        let readouts = prog.data.as_ref().map_or(&[][..], |d| d.readouts.as_slice());
        for (r, o) in readouts.iter().zip(&outs) {
            if r.rect.is_none() {
                held.insert(o.tensor.0, Arc::from(o.values.as_slice()));
            }
        }
        runs.push(run);
        outputs.extend(outs);
    }
    between(&mut held);
    outputs.extend(memoryx(graph, numerics, reference, &held)?);
    Ok(Phased { runs, outputs })
}

/// MemoryX's part of a weight-streaming training step (see `run_phases`): the off-wafer ops on what the
/// wafer sent (`sent`, by tensor), their results beside the reference.
fn memoryx(
    graph: &Graph,
    numerics: &Numerics,
    reference: &Values<f32>,
    sent: &BTreeMap<u32, Arc<[f32]>>,
) -> Result<Vec<MeshOutput>, FunctionalError> {
    let ops: Vec<crate::graph::OpId> = graph.op_ids().filter(|&o| crate::compile::runs_in_memoryx(graph, o)).collect();
    let producers = graph.producers();
    let mut vals = reference.clone();
    for (&t, v) in sent {
        vals.values[t as usize] = Value::F(v.to_vec());
    }
    for &o in &ops {
        for &t in &graph.op(o).inputs {
            let from_wafer = producers[t.idx()].is_some_and(|p| !ops.contains(&p));
            if from_wafer && !sent.contains_key(&t.0) {
                return Err(FunctionalError::Mesh(format!(
                    "MemoryX runs `{}`, which reads `{}`, and the wafer did not send it",
                    graph.op(o).name,
                    graph.tensor(t).name
                )));
            }
        }
    }
    let precision =
        if graph.workload.dtype == DType::Fp32 { super::Precision::Exact } else { super::Precision::Storage };
    let opts = super::Options { precision, ..super::Options::default() };
    super::reference::evaluate_ops(graph, numerics, &opts, &mut vals, &ops)?;
    // The Adam ops' gradients MemoryX summed itself, and every Adam output.
    let mut out = Vec::new();
    for &o in &ops {
        let op = graph.op(o);
        if !matches!(op.kind, crate::graph::OpKind::Adam { .. }) {
            continue;
        }
        let grad = op.inputs[1];
        let summed = (!sent.contains_key(&grad.0)).then_some(grad);
        for t in summed.into_iter().chain(op.outputs.iter().copied()) {
            let values = vals.f(t).to_vec();
            let (max_rel_error, held, bound) = adam_error(graph, t, &values, reference).ok_or_else(|| {
                FunctionalError::Internal(format!("`{}` is not an Adam tensor", graph.tensor(t).name))
            })?;
            out.push(MeshOutput {
                name: graph.tensor(t).name.clone(),
                tensor: t,
                shape: graph.tensor(t).shape.clone(),
                values,
                max_rel_error,
                held,
                bound: Some(bound),
            });
        }
    }
    Ok(out)
}
