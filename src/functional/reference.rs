//! The reference evaluator: every op of a [`Graph`] computed plainly, in the op's id order (a
//! topological order), one value per graph tensor.
//!
//! Semantics, chosen to be those of the family's Hugging Face implementation:
//! - Tensors are row-major in the graph's shapes. A linear layer's weight is `[in, out]` (GPT-2's
//!   Conv1D) or `[out, in]` (`nn.Linear`) as its `WeightLayout` says; every dot product accumulates
//!   over k in increasing order from zero and adds the bias last.
//! - Attention: query head h reads key/value head `h / (heads / kv_heads)` (transformers' `repeat_kv`);
//!   scores are unscaled, the softmax scales by `1 / sqrt(head_dim)`, masks keys after the query's
//!   position (`kv_len - q_len + i`, so decode sees the whole cache) and outside a sliding window.
//! - Rotary: row r of a `[batch * seq, heads * head_dim]` tensor is at position `context + r % seq`.
//! - MoE: the router's softmax over all experts, the top k by probability (ties to the lower index),
//!   renormalised to sum to one (Mixtral). Routing is real, not the graph's balanced estimate, laid out
//!   in the graph's fixed `active x capacity` buffer as `Route::dispatch` says: with every expert
//!   active, slot e holds up to `capacity` of expert e's copies and the copies over it are dropped
//!   (Switch Transformer's and GShard's capacity; first choices first, then tokens in order): a dropped
//!   copy adds nothing to its token's output, the other copy keeps its renormalised weight. Padding
//!   rows stay zero. Grouped linear ops use expert e's weights on expert e's rows.
//! - Cross-entropy: mean over rows whose label is not -100 (transformers' ignore index).
//! - Adam: `m' = b1 m + (1 - b1) g`, `v' = b2 v + (1 - b2) g^2`, `w' = w - lr m'/(1 - b1^t) /
//!   (sqrt(v'/(1 - b2^t)) + eps)`, applied to the fp32 master copy when there is one.

use std::collections::BTreeMap;
use std::rc::Rc;

use super::inputs::feeds_check;
use super::numerics::{Act, Numerics, RotaryStyle};
use super::{Feeds, FunctionalError, Real};
use crate::graph::{Attn, Elem, Graph, Linear, Op, OpKind, Pick, Route, TensorId, WeightLayout};
use crate::model::{DType, NormKind, Phase};

/// A tensor's value: floats, or integer ids (token ids, positions, labels).
#[derive(Clone, Debug, PartialEq)]
pub enum Value<T> {
    F(Vec<T>),
    I(Vec<i64>),
}

impl<T> Value<T> {
    pub fn len(&self) -> usize {
        match self {
            Value::F(v) => v.len(),
            Value::I(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How stored values are rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Every value in the evaluator's type (fp32 for the CLI), whatever the workload dtype.
    Exact,
    /// Values of fp16/bf16 tensors are rounded to that dtype (round to nearest even) when they are
    /// stored: weights as fed and every op's outputs; arithmetic inside an op stays in the evaluator's
    /// type (fp32 accumulation), and Adam's moments and master weights stay fp32.
    Storage,
}

/// Adam's hyperparameters (torch.optim.Adam's defaults, no weight decay) and the step number.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 1 for the first step (the bias corrections use it).
    pub step: u64,
}

impl Default for AdamConfig {
    fn default() -> AdamConfig {
        AdamConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 1 }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    pub adam: AdamConfig,
    pub precision: Precision,
    /// MoE routing to follow instead of the top-k's own, by top-k op name and token: the experts in
    /// rank order (`functional::mesh::follow_routing`: where the wafer settled a near-tie of router
    /// logits otherwise, within their rounding bound). Empty: every token routed by its own top-k.
    pub forced_routing: BTreeMap<String, BTreeMap<usize, Vec<usize>>>,
}

impl Default for Options {
    fn default() -> Options {
        Options { adam: AdamConfig::default(), precision: Precision::Exact, forced_routing: BTreeMap::new() }
    }
}

/// The value of every tensor of a graph after evaluation, indexed by `TensorId`.
#[derive(Clone, Debug)]
pub struct Values<T> {
    pub values: Vec<Value<T>>,
    /// Per MoE top-k op (by name, in op order): the token copies dropped over an expert's capacity.
    pub moe_dropped: Vec<(String, usize)>,
}

impl<T: Real> Values<T> {
    /// The floats of tensor `t` (empty for an id tensor).
    pub fn f(&self, t: TensorId) -> &[T] {
        match &self.values[t.idx()] {
            Value::F(v) => v,
            Value::I(_) => &[],
        }
    }

    /// The floats of the tensor named `name`, if the graph has one.
    pub fn by_name<'a>(&'a self, graph: &Graph, name: &str) -> Option<&'a [T]> {
        graph.tensors.iter().position(|t| t.name == name).map(|i| self.f(TensorId(i as u32)))
    }
}

/// Expert routing of one MoE layer, made by `MoeTopK` and carried along the dispatched tensors.
#[derive(Debug)]
struct Routing {
    /// For each token, its top-k experts (by probability, ties to the lower index) and the row of the
    /// dispatched buffer its copy for that expert occupies.
    slots: Vec<Vec<(usize, usize)>>,
    /// (expert, first row, rows) of the dispatched buffer's used rows, in row order.
    segments: Vec<(usize, usize, usize)>,
    /// Copies dropped over an expert's capacity.
    dropped: usize,
}

struct Ctx<'a, T> {
    graph: &'a Graph,
    num: &'a Numerics,
    opts: &'a Options,
    vals: Vec<Option<Value<T>>>,
    routing: Vec<Option<Rc<Routing>>>,
    dropped: Vec<(String, usize)>,
}

fn internal(msg: String) -> FunctionalError {
    FunctionalError::Internal(msg)
}

/// Evaluates every op of `graph` on the source values in `feeds` (weights, inputs, optimizer state,
/// caches: every tensor no op produces, by name).
pub fn evaluate<T: Real>(
    graph: &Graph,
    numerics: &Numerics,
    feeds: &Feeds<T>,
    opts: &Options,
) -> Result<Values<T>, FunctionalError> {
    let n = graph.tensors.len();
    let producers = graph.producers();
    let mut cx = Ctx { graph, num: numerics, opts, vals: vec![None; n], routing: vec![None; n], dropped: Vec::new() };
    for (i, t) in graph.tensors.iter().enumerate() {
        if producers[i].is_some() {
            continue;
        }
        let v = feeds_check(graph, TensorId(i as u32), feeds)?;
        cx.vals[i] = Some(cx.round(TensorId(i as u32), v)?);
        debug_assert_eq!(cx.vals[i].as_ref().map(Value::len), Some(t.elems() as usize));
    }
    for o in graph.op_ids() {
        let op = graph.op(o);
        let outs = cx.eval(op)?;
        if outs.len() != op.outputs.len() {
            return Err(internal(format!(
                "op {}: {} outputs, the graph has {}",
                op.name,
                outs.len(),
                op.outputs.len()
            )));
        }
        // Routing marks the router's probabilities and the tensors whose rows are dispatched expert
        // rows: set by the top-k, carried from the probabilities into the dispatched buffer (and its
        // gradient), then along expert-row ops. MoE ops whose outputs are token rows carry none, so a
        // later layer can never pick up an earlier layer's routing.
        let routing = match op.kind {
            OpKind::MoeTopK(_) => None,
            OpKind::MoeDispatch(_) => cx.routing[op.inputs[1].idx()].clone(),
            OpKind::MoeCombineGrad(_) => cx.routing[op.inputs[2].idx()].clone(),
            OpKind::MoeCombine(_) | OpKind::MoeDispatchGrad(_) | OpKind::MoeTopKGrad(_) => None,
            _ => op.inputs.iter().find_map(|t| cx.routing[t.idx()].clone()),
        };
        for (i, (&t, v)) in op.outputs.iter().zip(outs).enumerate() {
            // MoeCombineGrad's second output is the probabilities' gradient, in token rows.
            let routing = if matches!(op.kind, OpKind::MoeCombineGrad(_)) && i > 0 { None } else { routing.clone() };
            let want = graph.tensor(t).elems() as usize;
            if v.len() != want {
                return Err(internal(format!(
                    "op {}: output {} has {} values, its shape {:?} holds {want}",
                    op.name,
                    graph.tensor(t).name,
                    v.len(),
                    graph.tensor(t).shape
                )));
            }
            cx.vals[t.idx()] = Some(cx.round(t, v)?);
            if cx.routing[t.idx()].is_none() {
                cx.routing[t.idx()] = routing;
            }
        }
    }
    let values = cx
        .vals
        .into_iter()
        .enumerate()
        .map(|(i, v)| v.ok_or_else(|| internal(format!("tensor {} was never computed", graph.tensors[i].name))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Values { values, moe_dropped: cx.dropped })
}

/// Evaluates `ops`, in the order given, on `values` (which hold every input they read), replacing their
/// outputs: what an evaluator off the wafer computes from the values the wafer sent it (MemoryX's
/// optimizer under weight streaming, `functional::mesh::memoryx`), with the reference's semantics and
/// rounding.
pub fn evaluate_ops<T: Real>(
    graph: &Graph,
    numerics: &Numerics,
    opts: &Options,
    values: &mut Values<T>,
    ops: &[crate::graph::OpId],
) -> Result<(), FunctionalError> {
    let n = graph.tensors.len();
    let vals = std::mem::take(&mut values.values).into_iter().map(Some).collect();
    let mut cx = Ctx { graph, num: numerics, opts, vals, routing: vec![None; n], dropped: Vec::new() };
    let mut done = Ok(());
    for &o in ops {
        let op = graph.op(o);
        let outs = match cx.eval(op) {
            Ok(outs) if outs.len() == op.outputs.len() => outs,
            Ok(outs) => {
                done = Err(internal(format!(
                    "op {}: {} outputs, the graph has {}",
                    op.name,
                    outs.len(),
                    op.outputs.len()
                )));
                break;
            }
            Err(e) => {
                done = Err(e);
                break;
            }
        };
        for (&t, v) in op.outputs.iter().zip(outs) {
            match cx.round(t, v) {
                Ok(v) => cx.vals[t.idx()] = Some(v),
                Err(e) => done = Err(e),
            }
        }
    }
    values.values = cx.vals.into_iter().map(|v| v.unwrap_or(Value::F(Vec::new()))).collect();
    done
}

/// Rounds an f32 to fp16 or bf16 and back (round to nearest, ties to even).
fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::Fp16 => half::f16::from_f32(x).to_f32(),
        DType::Bf16 => half::bf16::from_f32(x).to_f32(),
        DType::Fp32 | DType::Fp8 => x,
    }
}

impl<T: Real> Ctx<'_, T> {
    fn round(&self, t: TensorId, v: Value<T>) -> Result<Value<T>, FunctionalError> {
        let tensor = self.graph.tensor(t);
        match (self.opts.precision, tensor.elem, v) {
            (Precision::Storage, Elem::Float(DType::Fp8), _) => Err(FunctionalError::Input(
                "the reference does not model fp8 storage; use --dtype fp32, fp16 or bf16".into(),
            )),
            (Precision::Storage, Elem::Float(d @ (DType::Fp16 | DType::Bf16)), Value::F(mut xs)) => {
                for x in &mut xs {
                    *x = T::from_f32(round_to(d, x.to_f32()));
                }
                Ok(Value::F(xs))
            }
            (_, _, v) => Ok(v),
        }
    }

    /// `x` as tensor `t` stores it (rounded to its fp16/bf16 storage where the run rounds).
    fn stored(&self, t: TensorId, x: T) -> T {
        match (self.opts.precision, self.graph.tensor(t).elem) {
            (Precision::Storage, Elem::Float(d @ (DType::Fp16 | DType::Bf16))) => T::from_f32(round_to(d, x.to_f32())),
            _ => x,
        }
    }

    fn f(&self, t: TensorId) -> Result<&[T], FunctionalError> {
        match self.vals[t.idx()].as_ref() {
            Some(Value::F(v)) => Ok(v),
            Some(Value::I(_)) => Err(internal(format!("tensor {} holds ids, not floats", self.graph.tensor(t).name))),
            None => Err(internal(format!("tensor {} read before it was computed", self.graph.tensor(t).name))),
        }
    }

    fn ids(&self, t: TensorId) -> Result<&[i64], FunctionalError> {
        match self.vals[t.idx()].as_ref() {
            Some(Value::I(v)) => Ok(v),
            _ => Err(internal(format!("tensor {} holds no ids", self.graph.tensor(t).name))),
        }
    }

    /// The routing carried by input `i` of `op` (the probabilities, or a dispatched-row tensor).
    fn routing(&self, op: &Op, i: usize) -> Result<Rc<Routing>, FunctionalError> {
        self.routing[op.inputs[i].idx()]
            .clone()
            .ok_or_else(|| internal(format!("op {}: input {i} carries no expert routing", op.name)))
    }

    /// Row segments (weight group, first row, rows) of a linear op: one for a plain layer, the
    /// routing's for experts.
    fn segments(&self, op: &Op, l: &Linear) -> Result<Vec<(usize, usize, usize)>, FunctionalError> {
        if l.groups == 1 && l.weight_groups == 1 {
            Ok(vec![(0, 0, l.m as usize)])
        } else {
            // Input 0 is the dispatched rows (x, or dy for the gradients).
            Ok(self.routing(op, 0)?.segments.clone())
        }
    }

    /// Position of the first new token of every sequence: the cached tokens in decode, else 0.
    fn pos0(&self) -> u64 {
        if self.graph.workload.phase == Phase::Decode {
            self.graph.workload.context
        } else {
            0
        }
    }

    fn eval(&mut self, op: &Op) -> Result<Vec<Value<T>>, FunctionalError> {
        let ins = &op.inputs;
        let one = |v: Vec<T>| Ok(vec![Value::F(v)]);
        match op.kind {
            OpKind::Embedding { rows, vocab, width } => {
                let (ids, table) = (self.ids(ins[0])?, self.f(ins[1])?);
                let w = width as usize;
                let mut y = Vec::with_capacity(rows as usize * w);
                for &id in ids {
                    if id < 0 || id as u64 >= vocab {
                        return Err(FunctionalError::Input(format!(
                            "{}: id {id} is outside the table `{}` of {vocab} rows",
                            self.graph.tensor(ins[0]).name,
                            self.graph.tensor(ins[1]).name
                        )));
                    }
                    y.extend_from_slice(&table[id as usize * w..(id as usize + 1) * w]);
                }
                one(y)
            }
            OpKind::EmbeddingGrad { vocab, width, .. } => {
                let (ids, dy) = (self.ids(ins[0])?, self.f(ins[1])?);
                let w = width as usize;
                let mut dt = vec![T::zero(); vocab as usize * w];
                for (r, &id) in ids.iter().enumerate() {
                    for c in 0..w {
                        dt[id as usize * w + c] += dy[r * w + c];
                    }
                }
                one(dt)
            }
            OpKind::Linear(l) => {
                let segs = self.segments(op, &l)?;
                let b = if l.bias { Some(self.f(ins[2])?) } else { None };
                one(linear(&l, &segs, self.f(ins[0])?, self.f(ins[1])?, b))
            }
            OpKind::LinearDgrad(l) => {
                let segs = self.segments(op, &l)?;
                one(linear_dgrad(&l, &segs, self.f(ins[0])?, self.f(ins[1])?))
            }
            OpKind::LinearWgrad(l) => {
                let segs = self.segments(op, &l)?;
                let (dw, db) = linear_wgrad(&l, &segs, self.f(ins[0])?, self.f(ins[1])?);
                let mut outs = vec![Value::F(dw)];
                if l.bias {
                    outs.push(Value::F(db));
                }
                Ok(outs)
            }
            OpKind::Split { rows, widths } => {
                let x = self.f(ins[0])?;
                let total: u64 = widths.iter().sum();
                let mut outs = Vec::new();
                let mut off = 0usize;
                for w in widths {
                    let w = w as usize;
                    let mut y = Vec::with_capacity(rows as usize * w);
                    for r in 0..rows as usize {
                        let base = r * total as usize + off;
                        y.extend_from_slice(&x[base..base + w]);
                    }
                    off += w;
                    outs.push(Value::F(y));
                }
                Ok(outs)
            }
            OpKind::SplitGrad { rows, widths } => {
                let parts = [self.f(ins[0])?, self.f(ins[1])?, self.f(ins[2])?];
                let mut y = Vec::with_capacity(rows as usize * widths.iter().sum::<u64>() as usize);
                for r in 0..rows as usize {
                    for (p, w) in parts.iter().zip(widths) {
                        y.extend_from_slice(&p[r * w as usize..(r + 1) * w as usize]);
                    }
                }
                one(y)
            }
            OpKind::AttnScores(a) => one(attn_scores(&a, self.f(ins[0])?, self.f(ins[1])?)),
            OpKind::AttnSoftmax(a) => one(self.softmax(&a, self.f(ins[0])?)),
            OpKind::AttnSoftmaxGrad(a) => {
                let (p, dp) = (self.f(ins[0])?, self.f(ins[1])?);
                let scale = T::one() / T::from_f64(a.head_dim as f64).sqrt();
                let kv = a.kv_len as usize;
                let mut ds = vec![T::zero(); p.len()];
                for row in 0..p.len() / kv {
                    let r = row * kv..(row + 1) * kv;
                    let mut dot = T::zero();
                    for j in r.clone() {
                        dot += p[j] * dp[j];
                    }
                    for j in r {
                        ds[j] = scale * p[j] * (dp[j] - dot);
                    }
                }
                one(ds)
            }
            OpKind::AttnContext(a) => one(attn_context(&a, self.f(ins[0])?, self.f(ins[1])?)),
            OpKind::AttnScoresGradQ(a) => {
                // dQ[i, h, :] = sum_j dS[h, i, j] K[j, kvh(h), :]: the context product with dS as probabilities.
                one(attn_context(&a, self.f(ins[0])?, self.f(ins[1])?))
            }
            OpKind::AttnScoresGradK(a) => one(attn_kv_grad(&a, self.f(ins[0])?, self.f(ins[1])?)),
            OpKind::AttnContextGradP(a) => {
                // dP[h, i, j] = dO[i, h, :] . V[j, kvh(h), :]: the scores product with dO as queries.
                one(attn_scores(&a, self.f(ins[0])?, self.f(ins[1])?))
            }
            OpKind::AttnContextGradV(a) => one(attn_kv_grad(&a, self.f(ins[0])?, self.f(ins[1])?)),
            OpKind::Norm { kind, rows } => {
                let beta = if kind.has_bias() { Some(self.f(ins[2])?) } else { None };
                one(norm(kind, rows.width as usize, self.num.norm_eps, self.f(ins[0])?, self.f(ins[1])?, beta))
            }
            OpKind::NormGrad { kind, rows } => {
                let (dx, dg, db) = norm_grad(
                    kind,
                    rows.width as usize,
                    self.num.norm_eps,
                    self.f(ins[0])?,
                    self.f(ins[1])?,
                    self.f(ins[2])?,
                );
                let mut outs = vec![Value::F(dx), Value::F(dg)];
                if kind.has_bias() {
                    outs.push(Value::F(db));
                }
                Ok(outs)
            }
            OpKind::Gelu(_) => {
                let act = self.num.act;
                one(self.f(ins[0])?.iter().map(|&x| gelu(act, x)).collect())
            }
            OpKind::GeluGrad(_) => {
                let act = self.num.act;
                let (x, dy) = (self.f(ins[0])?, self.f(ins[1])?);
                one(x.iter().zip(dy).map(|(&x, &dy)| gelu_grad(act, x) * dy).collect())
            }
            OpKind::Tanh(_) => one(self.f(ins[0])?.iter().map(|x| x.tanh()).collect()),
            OpKind::TanhGrad(_) => {
                let (y, dy) = (self.f(ins[0])?, self.f(ins[1])?);
                one(y.iter().zip(dy).map(|(&y, &dy)| (T::one() - y * y) * dy).collect())
            }
            OpKind::SwiGlu(_) => {
                let (g, u) = (self.f(ins[0])?, self.f(ins[1])?);
                one(g.iter().zip(u).map(|(&g, &u)| g * sigmoid(g) * u).collect())
            }
            OpKind::SwiGluGrad(_) => {
                let (g, u, dy) = (self.f(ins[0])?, self.f(ins[1])?, self.f(ins[2])?);
                let mut dg = Vec::with_capacity(g.len());
                let mut du = Vec::with_capacity(g.len());
                for i in 0..g.len() {
                    let s = sigmoid(g[i]);
                    dg.push(dy[i] * u[i] * s * (T::one() + g[i] * (T::one() - s)));
                    du.push(dy[i] * g[i] * s);
                }
                Ok(vec![Value::F(dg), Value::F(du)])
            }
            OpKind::Add { .. } => {
                let mut y = self.f(ins[0])?.to_vec();
                for t in &ins[1..] {
                    for (a, &b) in y.iter_mut().zip(self.f(*t)?) {
                        *a += b;
                    }
                }
                one(y)
            }
            OpKind::Rotary { rows, heads, head_dim, rot_dims } => {
                one(self.rotary(self.f(ins[0])?, rows, heads, head_dim, rot_dims, false))
            }
            OpKind::RotaryGrad { rows, heads, head_dim, rot_dims } => {
                one(self.rotary(self.f(ins[0])?, rows, heads, head_dim, rot_dims, true))
            }
            OpKind::KvCacheRead { batch, len, new, width } | OpKind::KvCacheAppend { batch, len, new, width } => {
                let (cache, fresh) =
                    if len > 0 { (self.f(ins[0])?, self.f(ins[1])?) } else { (&[][..], self.f(ins[0])?) };
                let (len, new, w) = (len as usize, new as usize, width as usize);
                let mut y = Vec::with_capacity(batch as usize * (len + new) * w);
                for b in 0..batch as usize {
                    y.extend_from_slice(&cache[b * len * w..(b + 1) * len * w]);
                    y.extend_from_slice(&fresh[b * new * w..(b + 1) * new * w]);
                }
                one(y)
            }
            OpKind::TokenSelect { batch, seq, width, pick } => {
                let x = self.f(ins[0])?;
                let (s, w) = (seq as usize, width as usize);
                let at = if pick == Pick::First { 0 } else { s - 1 };
                let mut y = Vec::with_capacity(batch as usize * w);
                for b in 0..batch as usize {
                    y.extend_from_slice(&x[(b * s + at) * w..(b * s + at + 1) * w]);
                }
                one(y)
            }
            OpKind::TokenSelectGrad { batch, seq, width, pick } => {
                let dy = self.f(ins[0])?;
                let (s, w) = (seq as usize, width as usize);
                let at = if pick == Pick::First { 0 } else { s - 1 };
                let mut dx = vec![T::zero(); batch as usize * s * w];
                for b in 0..batch as usize {
                    dx[(b * s + at) * w..(b * s + at + 1) * w].copy_from_slice(&dy[b * w..(b + 1) * w]);
                }
                one(dx)
            }
            OpKind::MoeTopK(r) => {
                let stored = |p: T| self.stored(op.outputs[0], p);
                let forced = self.opts.forced_routing.get(&op.name);
                let (probs, routing) = moe_topk(&r, self.f(ins[0])?, &stored, forced);
                self.dropped.push((op.name.clone(), routing.dropped));
                // The routing belongs to the probabilities; everything downstream of them inherits it.
                self.routing[op.outputs[0].idx()] = Some(Rc::new(routing));
                one(probs)
            }
            OpKind::MoeTopKGrad(r) => {
                // Renormalised top-k is a softmax over the selected logits: dl = p (dp - <p, dp>).
                let (p, dp) = (self.f(ins[0])?, self.f(ins[1])?);
                let e = r.experts as usize;
                let mut dl = vec![T::zero(); p.len()];
                for t in 0..r.rows as usize {
                    let row = t * e..(t + 1) * e;
                    let mut dot = T::zero();
                    for j in row.clone() {
                        dot += p[j] * dp[j];
                    }
                    for j in row {
                        dl[j] = p[j] * (dp[j] - dot);
                    }
                }
                one(dl)
            }
            OpKind::MoeDispatch(r) => {
                let routing = self.routing(op, 1)?;
                let x = self.f(ins[0])?;
                let w = r.width as usize;
                let mut xd = vec![T::zero(); dispatched_rows(&r) * w];
                for (t, slots) in routing.slots.iter().enumerate() {
                    for &(_, row) in slots {
                        xd[row * w..(row + 1) * w].copy_from_slice(&x[t * w..(t + 1) * w]);
                    }
                }
                one(xd)
            }
            OpKind::MoeDispatchGrad(r) => {
                let routing = self.routing(op, 1)?;
                let dxd = self.f(ins[0])?;
                let w = r.width as usize;
                let mut dx = vec![T::zero(); r.rows as usize * w];
                for (t, slots) in routing.slots.iter().enumerate() {
                    for &(_, row) in slots {
                        for c in 0..w {
                            dx[t * w + c] += dxd[row * w + c];
                        }
                    }
                }
                one(dx)
            }
            OpKind::MoeCombine(r) => {
                let routing = self.routing(op, 1)?;
                let (yd, p) = (self.f(ins[0])?, self.f(ins[1])?);
                let (w, e) = (r.width as usize, r.experts as usize);
                let mut y = vec![T::zero(); r.rows as usize * w];
                for (t, slots) in routing.slots.iter().enumerate() {
                    for &(ex, row) in slots {
                        let pw = p[t * e + ex];
                        for c in 0..w {
                            y[t * w + c] += pw * yd[row * w + c];
                        }
                    }
                }
                one(y)
            }
            OpKind::MoeCombineGrad(r) => {
                let routing = self.routing(op, 2)?;
                let (dy, yd, p) = (self.f(ins[0])?, self.f(ins[1])?, self.f(ins[2])?);
                let (w, e) = (r.width as usize, r.experts as usize);
                let mut dyd = vec![T::zero(); dispatched_rows(&r) * w];
                let mut dp = vec![T::zero(); r.rows as usize * e];
                for (t, slots) in routing.slots.iter().enumerate() {
                    for &(ex, row) in slots {
                        let pw = p[t * e + ex];
                        let mut dot = T::zero();
                        for c in 0..w {
                            dyd[row * w + c] = pw * dy[t * w + c];
                            dot += dy[t * w + c] * yd[row * w + c];
                        }
                        dp[t * e + ex] = dot;
                    }
                }
                Ok(vec![Value::F(dyd), Value::F(dp)])
            }
            OpKind::CrossEntropy { classes, .. } | OpKind::CrossEntropyGrad { classes, .. } => {
                let (logits, labels) = (self.f(ins[0])?, self.ids(ins[1])?);
                let c = classes as usize;
                let valid = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
                for &l in labels {
                    if l != IGNORE_INDEX && (l < 0 || l as u64 >= classes) {
                        return Err(FunctionalError::Input(format!(
                            "{}: label {l} is outside the {classes} classes (use -100 to ignore a position)",
                            self.graph.tensor(ins[1]).name
                        )));
                    }
                }
                let inv = if valid == 0 { T::zero() } else { T::one() / T::from_f64(valid as f64) };
                let grad = matches!(op.kind, OpKind::CrossEntropyGrad { .. });
                let mut loss = T::zero();
                let mut dl = if grad { vec![T::zero(); logits.len()] } else { Vec::new() };
                for (r, &label) in labels.iter().enumerate() {
                    if label == IGNORE_INDEX {
                        continue;
                    }
                    let row = &logits[r * c..(r + 1) * c];
                    let m = row.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
                    let mut s = T::zero();
                    for &x in row {
                        s += (x - m).exp();
                    }
                    let lse = m + s.ln();
                    loss += lse - row[label as usize];
                    if grad {
                        for j in 0..c {
                            dl[r * c + j] = (row[j] - m).exp() / s * inv;
                        }
                        dl[r * c + label as usize] -= inv;
                    }
                }
                if grad {
                    one(dl)
                } else {
                    one(vec![loss * inv])
                }
            }
            OpKind::Adam { master, .. } => {
                let a = self.opts.adam;
                let (w, g, m, v) = (self.f(ins[0])?, self.f(ins[1])?, self.f(ins[2])?, self.f(ins[3])?);
                let p = if master { self.f(ins[4])? } else { w };
                let t = a.step.max(1) as i32;
                let (b1, b2) = (T::from_f64(a.beta1), T::from_f64(a.beta2));
                let c1 = T::one() - T::from_f64(a.beta1.powi(t));
                let c2 = T::one() - T::from_f64(a.beta2.powi(t));
                let (lr, eps) = (T::from_f64(a.lr), T::from_f64(a.eps));
                let n = w.len();
                let (mut p2, mut m2, mut v2) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
                for i in 0..n {
                    let mi = b1 * m[i] + (T::one() - b1) * g[i];
                    let vi = b2 * v[i] + (T::one() - b2) * g[i] * g[i];
                    p2.push(p[i] - lr * (mi / c1) / ((vi / c2).sqrt() + eps));
                    m2.push(mi);
                    v2.push(vi);
                }
                // The new weight is the master copy, rounded to the weight's dtype when it is stored.
                let mut outs = vec![Value::F(p2.clone()), Value::F(m2), Value::F(v2)];
                if master {
                    outs.push(Value::F(p2));
                }
                Ok(outs)
            }
            OpKind::AllReduce { .. } => one(self.f(ins[0])?.to_vec()),
        }
    }

    fn softmax(&self, a: &Attn, s: &[T]) -> Vec<T> {
        let scale = T::one() / T::from_f64(a.head_dim as f64).sqrt();
        let (q, kv) = (a.q_len as usize, a.kv_len as usize);
        let mut p = vec![T::zero(); s.len()];
        for row in 0..s.len() / kv {
            let i = row % q;
            let base = row * kv;
            let vis = |j: usize| visible(a, self.num.sliding_window, i, j);
            let mut m = T::neg_infinity();
            for j in (0..kv).filter(|&j| vis(j)) {
                m = m.max(s[base + j] * scale);
            }
            let mut sum = T::zero();
            for j in (0..kv).filter(|&j| vis(j)) {
                let e = (s[base + j] * scale - m).exp();
                p[base + j] = e;
                sum += e;
            }
            for j in (0..kv).filter(|&j| vis(j)) {
                p[base + j] = p[base + j] / sum;
            }
        }
        p
    }

    /// Rotates (or, for the gradient, rotates back) the first `rot` dimensions of every head.
    fn rotary(&self, x: &[T], rows: u64, heads: u64, d: u64, rot: u64, inverse: bool) -> Vec<T> {
        let seq = self.graph.workload.seq.max(1);
        let pos0 = self.pos0();
        let inv_freq = self.num.inv_freq(rot);
        let (d, half) = (d as usize, rot as usize / 2);
        let width = heads as usize * d;
        let mut y = x.to_vec();
        for r in 0..rows as usize {
            let pos = (pos0 + r as u64 % seq) as f64;
            let (cos, sin): (Vec<T>, Vec<T>) = inv_freq
                .iter()
                .map(|f| {
                    let angle = T::from_f64(pos * f);
                    (angle.cos(), if inverse { -angle.sin() } else { angle.sin() })
                })
                .unzip();
            for h in 0..heads as usize {
                let base = r * width + h * d;
                for i in 0..half {
                    let (a, b) = match self.num.rotary_style {
                        RotaryStyle::Half => (base + i, base + i + half),
                        RotaryStyle::Interleaved => (base + 2 * i, base + 2 * i + 1),
                    };
                    let (xa, xb) = (x[a], x[b]);
                    y[a] = xa * cos[i] - xb * sin[i];
                    y[b] = xb * cos[i] + xa * sin[i];
                }
            }
        }
        y
    }
}

/// transformers' `ignore_index` for labels.
pub const IGNORE_INDEX: i64 = -100;

/// Whether query i (of q_len) sees key j (of kv_len): keys up to the query's position when causal,
/// and within the sliding window when there is one.
fn visible(a: &Attn, window: Option<u64>, i: usize, j: usize) -> bool {
    let pos = (a.kv_len - a.q_len) as usize + i;
    if a.causal && j > pos {
        return false;
    }
    match window {
        Some(w) if a.causal => j + w as usize > pos,
        _ => true,
    }
}

fn dispatched_rows(r: &Route) -> usize {
    (r.active() * r.capacity()) as usize
}

fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_CUBIC: f64 = 0.044715;

fn gelu<T: Real>(act: Act, x: T) -> T {
    let half = T::from_f64(0.5);
    match act {
        Act::GeluErf => half * x * (T::one() + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf()),
        Act::GeluTanh => {
            let inner = T::from_f64(SQRT_2_OVER_PI) * (x + T::from_f64(GELU_CUBIC) * x * x * x);
            half * x * (T::one() + inner.tanh())
        }
    }
}

fn gelu_grad<T: Real>(act: Act, x: T) -> T {
    let half = T::from_f64(0.5);
    match act {
        Act::GeluErf => {
            let cdf = half * (T::one() + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
            let pdf = (-half * x * x).exp() * T::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt());
            cdf + x * pdf
        }
        Act::GeluTanh => {
            let c = T::from_f64(SQRT_2_OVER_PI);
            let k = T::from_f64(GELU_CUBIC);
            let th = (c * (x + k * x * x * x)).tanh();
            half * (T::one() + th) + half * x * (T::one() - th * th) * c * (T::one() + T::from_f64(3.0) * k * x * x)
        }
    }
}

/// W(e, kk, j): element (kk, j) of weight group e in the layer's layout.
fn widx(l: &Linear, e: usize, kk: usize, j: usize) -> usize {
    let (k, n) = (l.k as usize, l.n as usize);
    match l.layout {
        WeightLayout::InOut => e * k * n + kk * n + j,
        WeightLayout::OutIn => e * k * n + j * k + kk,
    }
}

fn linear<T: Real>(l: &Linear, segs: &[(usize, usize, usize)], x: &[T], w: &[T], b: Option<&[T]>) -> Vec<T> {
    let (k, n) = (l.k as usize, l.n as usize);
    let rows = (l.groups * l.m) as usize;
    let mut y = vec![T::zero(); rows * n];
    for &(e, start, count) in segs {
        for i in start..start + count {
            let xr = &x[i * k..(i + 1) * k];
            for j in 0..n {
                let mut acc = T::zero();
                for (kk, &xv) in xr.iter().enumerate() {
                    acc += xv * w[widx(l, e, kk, j)];
                }
                if let Some(b) = b {
                    acc += b[e * n + j];
                }
                y[i * n + j] = acc;
            }
        }
    }
    y
}

pub(super) fn linear_dgrad<T: Real>(l: &Linear, segs: &[(usize, usize, usize)], dy: &[T], w: &[T]) -> Vec<T> {
    let (k, n) = (l.k as usize, l.n as usize);
    let rows = (l.groups * l.m) as usize;
    let mut dx = vec![T::zero(); rows * k];
    for &(e, start, count) in segs {
        for i in start..start + count {
            for kk in 0..k {
                let mut acc = T::zero();
                for j in 0..n {
                    acc += dy[i * n + j] * w[widx(l, e, kk, j)];
                }
                dx[i * k + kk] = acc;
            }
        }
    }
    dx
}

pub(super) fn linear_wgrad<T: Real>(l: &Linear, segs: &[(usize, usize, usize)], x: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let (k, n) = (l.k as usize, l.n as usize);
    let groups = l.weight_groups as usize;
    let mut dw = vec![T::zero(); groups * k * n];
    let mut db = vec![T::zero(); groups * n];
    for &(e, start, count) in segs {
        for i in start..start + count {
            for kk in 0..k {
                let xv = x[i * k + kk];
                for j in 0..n {
                    dw[widx(l, e, kk, j)] += xv * dy[i * n + j];
                }
            }
            for j in 0..n {
                db[e * n + j] += dy[i * n + j];
            }
        }
    }
    (dw, db)
}

/// (batch, heads, kv heads, query length, key length, head dim) of an attention, as indices.
fn dims(a: &Attn) -> (usize, usize, usize, usize, usize, usize) {
    let u = |x: u64| x as usize;
    (u(a.batch), u(a.heads), u(a.kv_heads), u(a.q_len), u(a.kv_len), u(a.head_dim))
}

/// S[b, h, i, j] = A[b*qa + i, h, :] . B[b*kv + j, kvh(h), :] (the scores, and dP from dO and V).
fn attn_scores<T: Real>(a: &Attn, qm: &[T], km: &[T]) -> Vec<T> {
    let (bs, h, kvh, q, kv, d) = dims(a);
    let grp = h / kvh;
    let mut s = vec![T::zero(); bs * h * q * kv];
    for b in 0..bs {
        for hh in 0..h {
            for i in 0..q {
                let qrow = &qm[(b * q + i) * h * d + hh * d..][..d];
                for j in 0..kv {
                    let krow = &km[(b * kv + j) * kvh * d + (hh / grp) * d..][..d];
                    let mut acc = T::zero();
                    for dd in 0..d {
                        acc += qrow[dd] * krow[dd];
                    }
                    s[((b * h + hh) * q + i) * kv + j] = acc;
                }
            }
        }
    }
    s
}

/// O[b*q + i, h, :] = sum_j P[b, h, i, j] V[b*kv + j, kvh(h), :] (the context, and dQ from dS and K).
pub(super) fn attn_context<T: Real>(a: &Attn, p: &[T], vm: &[T]) -> Vec<T> {
    let (bs, h, kvh, q, kv, d) = dims(a);
    let grp = h / kvh;
    let mut o = vec![T::zero(); bs * q * h * d];
    for b in 0..bs {
        for hh in 0..h {
            for i in 0..q {
                let out = (b * q + i) * h * d + hh * d;
                for j in 0..kv {
                    let pv = p[((b * h + hh) * q + i) * kv + j];
                    let vrow = (b * kv + j) * kvh * d + (hh / grp) * d;
                    for dd in 0..d {
                        o[out + dd] += pv * vm[vrow + dd];
                    }
                }
            }
        }
    }
    o
}

/// G[b*kv + j, g, :] = sum over the heads h of group g and queries i of P[b, h, i, j] X[b*q + i, h, :]
/// (dK from dS and Q, dV from P and dO).
pub(super) fn attn_kv_grad<T: Real>(a: &Attn, p: &[T], xm: &[T]) -> Vec<T> {
    let (bs, h, kvh, q, kv, d) = dims(a);
    let grp = h / kvh;
    let mut g = vec![T::zero(); bs * kv * kvh * d];
    for b in 0..bs {
        for hh in 0..h {
            for j in 0..kv {
                let out = (b * kv + j) * kvh * d + (hh / grp) * d;
                for i in 0..q {
                    let pv = p[((b * h + hh) * q + i) * kv + j];
                    let xrow = (b * q + i) * h * d + hh * d;
                    for dd in 0..d {
                        g[out + dd] += pv * xm[xrow + dd];
                    }
                }
            }
        }
    }
    g
}

fn norm<T: Real>(kind: NormKind, w: usize, eps: f64, x: &[T], gamma: &[T], beta: Option<&[T]>) -> Vec<T> {
    let eps = T::from_f64(eps);
    let wf = T::from_f64(w as f64);
    let mut y = vec![T::zero(); x.len()];
    for r in 0..x.len() / w {
        let row = &x[r * w..(r + 1) * w];
        let out = &mut y[r * w..(r + 1) * w];
        match kind {
            NormKind::LayerNorm => {
                let mut sum = T::zero();
                for &v in row {
                    sum += v;
                }
                let mean = sum / wf;
                let mut var = T::zero();
                for &v in row {
                    var += (v - mean) * (v - mean);
                }
                let rstd = T::one() / (var / wf + eps).sqrt();
                for c in 0..w {
                    out[c] = (row[c] - mean) * rstd * gamma[c] + beta.map_or(T::zero(), |b| b[c]);
                }
            }
            NormKind::RmsNorm => {
                let mut ms = T::zero();
                for &v in row {
                    ms += v * v;
                }
                let rstd = T::one() / (ms / wf + eps).sqrt();
                for c in 0..w {
                    out[c] = gamma[c] * (row[c] * rstd);
                }
            }
        }
    }
    y
}

fn norm_grad<T: Real>(kind: NormKind, w: usize, eps: f64, x: &[T], gamma: &[T], dy: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
    let eps = T::from_f64(eps);
    let wf = T::from_f64(w as f64);
    let mut dx = vec![T::zero(); x.len()];
    let mut dg = vec![T::zero(); w];
    let mut db = vec![T::zero(); w];
    let mut xhat = vec![T::zero(); w];
    for r in 0..x.len() / w {
        let row = &x[r * w..(r + 1) * w];
        let dyr = &dy[r * w..(r + 1) * w];
        let (mean, rstd) = match kind {
            NormKind::LayerNorm => {
                let mut sum = T::zero();
                for &v in row {
                    sum += v;
                }
                let mean = sum / wf;
                let mut var = T::zero();
                for &v in row {
                    var += (v - mean) * (v - mean);
                }
                (mean, T::one() / (var / wf + eps).sqrt())
            }
            NormKind::RmsNorm => {
                let mut ms = T::zero();
                for &v in row {
                    ms += v * v;
                }
                (T::zero(), T::one() / (ms / wf + eps).sqrt())
            }
        };
        // dxhat = dy * gamma; dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), without the
        // mean(dxhat) term for RMSNorm (it does not centre).
        let (mut s1, mut s2) = (T::zero(), T::zero());
        for c in 0..w {
            xhat[c] = (row[c] - mean) * rstd;
            let g = dyr[c] * gamma[c];
            s1 += g;
            s2 += g * xhat[c];
            dg[c] += dyr[c] * xhat[c];
            db[c] += dyr[c];
        }
        let (m1, m2) = (s1 / wf, s2 / wf);
        for c in 0..w {
            let g = dyr[c] * gamma[c];
            dx[r * w + c] = match kind {
                NormKind::LayerNorm => rstd * (g - m1 - xhat[c] * m2),
                NormKind::RmsNorm => rstd * (g - xhat[c] * m2),
            };
        }
    }
    (dx, dg, db)
}

/// Mixtral's routing: the top k experts by router logit (ties to the lower index; the softmax over all
/// experts keeps their order), their probabilities renormalised over the k (a softmax over the chosen
/// logits, which is Mixtral's `softmax`, `topk`, divide by the sum); and the dispatch layout
/// (`Route::dispatch`, with its capacity and drops). A token's choices are ranked (first choices take
/// capacity before second ones) by their probabilities as stored (`stored`: rounded to the storage
/// dtype in a rounding run), ties to the lower expert: what the wafer, which derives the routing from
/// the stored probabilities it receives, can tell apart. In bf16 two chosen experts' probabilities
/// often round to one value where their logits differ. A token `forced` names takes those experts in
/// that rank instead (`Options::forced_routing`), its probabilities the softmax over their logits.
fn moe_topk<T: Real>(
    r: &Route,
    logits: &[T],
    stored: &dyn Fn(T) -> T,
    forced: Option<&BTreeMap<usize, Vec<usize>>>,
) -> (Vec<T>, Routing) {
    let (rows, e, k) = (r.rows as usize, r.experts as usize, r.top_k as usize);
    let mut probs = vec![T::zero(); rows * e];
    let mut chosen: Vec<Vec<usize>> = Vec::with_capacity(rows);
    for t in 0..rows {
        let row = &logits[t * e..(t + 1) * e];
        let forced = forced.and_then(|f| f.get(&t)).filter(|f| f.len() == k && f.iter().all(|&x| x < e));
        let mut order: Vec<usize> = (0..e).collect();
        // Highest logit first; ties to the lower expert index (a stable sort keeps index order).
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal));
        let top: Vec<usize> = forced.cloned().unwrap_or_else(|| order[..k].to_vec());
        let m = row[top[0]];
        let mut sum = T::zero();
        for &x in &top {
            sum += (row[x] - m).exp();
        }
        for &x in &top {
            probs[t * e + x] = (row[x] - m).exp() / sum;
        }
        let rank = |x: usize| stored(probs[t * e + x]);
        let mut top = top;
        if forced.is_none() {
            top.sort_by(|&a, &b| rank(b).partial_cmp(&rank(a)).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
        }
        chosen.push(top);
    }
    let d = r.dispatch(&chosen);
    let a = r.active() as usize;
    // Each used row of the buffer is its own segment, in row order (capacity-major: rows of one slot
    // are `active` apart).
    let mut segments = Vec::new();
    for p in 0..r.capacity() as usize {
        for s in 0..a {
            if let (Some(ex), true) = (d.slot_expert[s], p < d.slot_rows[s]) {
                segments.push((ex, p * a + s, 1));
            }
        }
    }
    let dropped = d.dropped();
    // Only the copies that were dispatched, in each token's choice order (as the combine sums them).
    let slots =
        d.copies.into_iter().map(|cs| cs.into_iter().filter_map(|(ex, row)| row.map(|r| (ex, r))).collect()).collect();
    (probs, Routing { slots, segments, dropped })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token's choices are ranked by their probabilities as stored: two experts whose logits differ
    /// but whose bf16 probabilities round to one value rank the lower expert first, as the wafer, which
    /// sees only the stored probabilities, ranks them; unrounded, the higher logit comes first.
    #[test]
    fn choices_rank_by_their_stored_probabilities() {
        let r = Route { rows: 1, width: 8, experts: 4, top_k: 2, capacity_pct: 200 };
        let logits = [0.0f32, 0.001, -5.0, -5.0];
        let first = |stored: &dyn Fn(f32) -> f32| -> Vec<usize> {
            let (probs, routing) = moe_topk(&r, &logits, stored, None);
            assert!(probs[2] == 0.0 && probs[3] == 0.0, "experts 0 and 1 are the top 2: {probs:?}");
            routing.slots[0].iter().map(|&(e, _)| e).collect()
        };
        assert_eq!(first(&|p| p), [1, 0]);
        assert_eq!(first(&|p| round_to(DType::Bf16, p)), [0, 1]);
    }
}
