//! Lowering: the dataflow graph of one micro-batch, cut into the kernels one GPU of each pipeline
//! stage runs, with tensor-parallel sharding and the collectives it needs.
//!
//! Fusion rules (what becomes one kernel):
//! 1. A linear layer (forward, input gradient or weight gradient) is one GEMM. Its bias add is fused
//!    into the GEMM's epilogue, and the bias gradient into the weight-gradient GEMM (cuBLASLt
//!    epilogues).
//! 2. Attention, fused (the default): the scores, mask, softmax and context of one layer and pass are
//!    one FlashAttention forward kernel; the attention backward ops of one layer are one backward
//!    kernel plus FlashAttention's two helpers (rowsum(dO * O) before it, the fp32 dQ conversion
//!    after it). Unfused: each attention matmul is a batched GEMM and the softmax (and its gradient)
//!    a memory-bound kernel that reads and writes the score matrix.
//! 3. Views are no kernel: the split of a fused QKV projection, the concatenation of its gradient,
//!    and the KV-cache read (attention reads the cache in place).
//! 4. Every other op (norms, activations, residual adds, rotary embeddings, embedding lookups and
//!    their gradients, cross-entropy, MoE routing, KV-cache appends) is one memory-bound kernel,
//!    as PyTorch runs them eagerly.
//! 5. The optimizer is one multi-tensor Adam kernel per pipeline stage (PyTorch's fused Adam).
//!
//! Tensor parallelism is Megatron-LM's: the q/k/v, up and gate projections are split by output
//! columns, the attention-output and down projections by input rows, attention by heads (KV heads
//! are replicated when there are fewer than GPUs), the embedding table and the LM head by vocabulary;
//! norms and residual adds run replicated. An all-reduce follows every row-parallel projection and
//! the vocabulary-parallel embedding in the forward pass, and the input gradient of every group of
//! column-parallel projections that share an input in the backward pass; the vocabulary-parallel
//! cross-entropy all-reduces three per-row values.

use std::collections::{BTreeMap, BTreeSet};

use super::attention::{FlashPass, FlashShape, FlashVariant};
use super::collective::{CollOp, CollSpec, Group};
use super::gemm::GemmShape;
use super::stream::StreamShape;
use crate::graph::{Attn, Graph, Linear, OpId, OpKind, Pass, Role, TensorId};
use crate::model::{DType, ModelSpec};

/// How attention is lowered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AttentionImpl {
    Fused(FlashVariant),
    Unfused,
}

impl AttentionImpl {
    pub fn name(self) -> &'static str {
        match self {
            AttentionImpl::Fused(v) => v.name(),
            AttentionImpl::Unfused => "unfused",
        }
    }
}

/// What one kernel does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelKind {
    Gemm(GemmShape),
    Flash(FlashShape),
    Stream(StreamShape),
    Collective(CollSpec),
}

impl KernelKind {
    /// Short label for tables.
    pub fn label(&self) -> &'static str {
        match self {
            KernelKind::Gemm(_) => "gemm",
            KernelKind::Flash(f) => match f.pass {
                FlashPass::Forward => "flash_fwd",
                FlashPass::Backward => "flash_bwd",
            },
            KernelKind::Stream(_) => "memory",
            KernelKind::Collective(c) => c.op.name(),
        }
    }

    /// The problem size, printed beside the name (`2048x4608x12288`).
    pub fn shape_text(&self) -> String {
        match self {
            KernelKind::Gemm(g) if g.batch > 1 => format!("{}x{}x{}x{}", g.batch, g.m, g.n, g.k),
            KernelKind::Gemm(g) => format!("{}x{}x{}", g.m, g.n, g.k),
            KernelKind::Flash(f) => {
                format!("b{} h{}/{} q{} kv{} d{}", f.batch, f.heads, f.kv_heads, f.q_len, f.kv_len, f.head_dim)
            }
            KernelKind::Stream(s) => format!("{} B", s.read + s.write),
            KernelKind::Collective(c) => format!("{} B over {}", c.bytes, c.group.size),
        }
    }
}

/// One kernel launch on one GPU, per micro-batch (or per step for the optimizer).
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// The op name without its layer prefix (`attn.qkv.dgrad`), so that layers fold together.
    pub name: String,
    /// The graph ops it executes.
    pub ops: Vec<String>,
    pub pass: Pass,
    pub stage: u32,
    pub kind: KernelKind,
    /// The graph FLOPs it executes on this GPU (its share under tensor parallelism).
    pub flops: u64,
}

/// Parallelism of a run: GPUs = tp x pp x dp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parallel {
    pub tp: u64,
    pub pp: u64,
    pub dp: u64,
    pub microbatches: u64,
    pub zero: u8,
}

impl Parallel {
    pub fn gpus(&self) -> u64 {
        self.tp * self.pp * self.dp
    }
}

/// Where groups of GPUs sit: tensor-parallel ranks are adjacent (inside a node when they fit), then
/// data-parallel, then pipeline stages (Megatron's rank order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub tp: Group,
    pub dp: Group,
    /// Whether neighbouring pipeline stages sit on different nodes.
    pub pp_inter_node: bool,
}

impl Layout {
    pub fn new(p: &Parallel, gpus_per_node: u64) -> Layout {
        let gpn = gpus_per_node.max(1);
        // Tensor-parallel ranks are contiguous from a multiple of tp: they share nodes as far as
        // they fit. Data-parallel ranks are tp apart: gpn / tp of them share a node when tp < gpn.
        let tp = Group { size: p.tp, nodes: p.tp.div_ceil(gpn) };
        let dp_per_node = if p.tp >= gpn { 1 } else { (gpn / p.tp).max(1) };
        let dp = Group { size: p.dp, nodes: p.dp.div_ceil(dp_per_node) };
        // Some pair of neighbouring stages crosses a node boundary once the pipeline spans nodes.
        let stride = p.tp.saturating_mul(p.dp);
        Layout { tp, dp, pp_inter_node: p.pp > 1 && stride.saturating_mul(p.pp) > gpn }
    }
}

/// Memory one GPU of a stage holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageMemory {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub kv_cache: u64,
}

impl StageMemory {
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.gradients)
            .saturating_add(self.optimizer)
            .saturating_add(self.activations)
            .saturating_add(self.kv_cache)
    }
}

/// The kernels of one micro-batch on each stage, and what the step needs besides them.
#[derive(Clone, Debug, PartialEq)]
pub struct Lowered {
    /// Kernels in issue order; the optimizer kernels (pass `Optimizer`) run once per step.
    pub kernels: Vec<Kernel>,
    pub stages: u32,
    pub memory: Vec<StageMemory>,
    /// Gradient bytes one GPU of each stage reduces over data parallelism.
    pub grad_bytes: Vec<u64>,
    /// Weight bytes one GPU of each stage holds before ZeRO sharding (what ZeRO-3 gathers).
    pub weight_bytes: Vec<u64>,
    /// Transformer layers on each stage.
    pub layers: Vec<u64>,
    /// Activation bytes that cross a stage boundary per micro-batch (each way in training).
    pub boundary_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shard {
    Column,
    Row,
    Replicated,
}

/// The op name without recompute and gradient suffixes: `l3.ffn.up.dgrad` -> `l3.ffn.up`.
fn base_name(name: &str) -> &str {
    let mut s = name;
    loop {
        let t = s.trim_end_matches(".rc").trim_end_matches(".dgrad").trim_end_matches(".wgrad");
        if t == s {
            return s;
        }
        s = t;
    }
}

/// The op name without its `lN.` prefix, and without the tensor number the graph gives gradient
/// sums (`attn.residual.grad_sum80`), so that the same op of every layer has one name.
fn strip_layer(name: &str) -> String {
    let mut out = name;
    if let Some(rest) = name.strip_prefix('l') {
        if let Some((num, tail)) = rest.split_once('.') {
            if !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) {
                out = tail;
            }
        }
    }
    match out.rfind(".grad_sum") {
        Some(i) if out[i + 9..].bytes().all(|b| b.is_ascii_digit()) => out[..i + 9].to_string(),
        _ => out.to_string(),
    }
}

fn linear_shard(base: &str) -> Shard {
    const COLUMN: [&str; 8] =
        [".attn.qkv", ".attn.q", ".attn.k", ".attn.v", ".ffn.up", ".ffn.gate", ".experts.gate", ".experts.up"];
    const ROW: [&str; 3] = [".attn.out", ".ffn.down", ".experts.down"];
    if base == "head.logits" || base == "mlm.logits" || COLUMN.iter().any(|s| base.ends_with(s)) {
        Shard::Column
    } else if ROW.iter().any(|s| base.ends_with(s)) {
        Shard::Row
    } else {
        Shard::Replicated
    }
}

fn shard_linear(l: Linear, shard: Shard, tp: u64) -> Linear {
    let mut l = l;
    match shard {
        Shard::Column => l.n = l.n.div_ceil(tp),
        Shard::Row => l.k = l.k.div_ceil(tp),
        Shard::Replicated => {}
    }
    l
}

fn attn_of(k: &OpKind) -> Option<Attn> {
    match *k {
        OpKind::AttnScores(a)
        | OpKind::AttnScoresGradQ(a)
        | OpKind::AttnScoresGradK(a)
        | OpKind::AttnSoftmax(a)
        | OpKind::AttnSoftmaxGrad(a)
        | OpKind::AttnContext(a)
        | OpKind::AttnContextGradP(a)
        | OpKind::AttnContextGradV(a) => Some(a),
        _ => None,
    }
}

/// Heads on one GPU: query heads divided, KV heads divided or (fewer than GPUs) replicated.
pub fn shard_attn(a: Attn, tp: u64) -> Attn {
    let mut a = a;
    a.heads = (a.heads / tp).max(1);
    a.kv_heads = if a.kv_heads >= tp { a.kv_heads / tp } else { 1 };
    a
}

/// The factor by which tensor parallelism divides the KV width.
fn kv_div(spec: Option<&ModelSpec>, tp: u64) -> u64 {
    match spec {
        Some(s) if s.kv_heads >= tp => tp,
        Some(s) => s.kv_heads,
        None => 1,
    }
}

/// Lowering context.
struct Ctx<'a> {
    g: &'a Graph,
    spec: Option<&'a ModelSpec>,
    p: Parallel,
    layout: Layout,
    attention: AttentionImpl,
    dtype: DType,
    stage: Vec<u32>,
}

impl Ctx<'_> {
    /// The divisor tensor parallelism applies to a memory-bound op's bytes and FLOPs.
    fn stream_div(&self, o: OpId) -> u64 {
        let op = self.g.op(o);
        let tp = self.p.tp;
        if tp == 1 {
            return 1;
        }
        let ffn = self.spec.map_or(0, |s| s.ffn_hidden);
        match op.kind {
            OpKind::Gelu(r) | OpKind::GeluGrad(r) | OpKind::SwiGlu(r) | OpKind::SwiGluGrad(r) if r.width == ffn => tp,
            OpKind::Rotary { .. } | OpKind::RotaryGrad { .. } => tp,
            OpKind::AttnSoftmax(_) | OpKind::AttnSoftmaxGrad(_) => tp,
            OpKind::KvCacheAppend { .. } | OpKind::KvCacheRead { .. } => kv_div(self.spec, tp),
            OpKind::CrossEntropy { .. } | OpKind::CrossEntropyGrad { .. } => tp,
            OpKind::Add { rows, .. } if rows.width == ffn => tp,
            OpKind::Add { .. } => {
                // A sum of gradients of a sharded weight (tied embeddings) is sharded with it.
                let out = self.g.tensor(op.outputs[0]);
                match out.grad_of {
                    Some(_) if out.role == Role::WeightGrad => tp,
                    _ => 1,
                }
            }
            _ => 1,
        }
    }

    /// The divisor tensor parallelism applies to an activation an op produces.
    fn act_div(&self, o: OpId) -> u64 {
        let op = self.g.op(o);
        let tp = self.p.tp;
        if tp == 1 {
            return 1;
        }
        match op.kind {
            OpKind::Linear(_) if linear_shard(base_name(&op.name)) == Shard::Column => tp,
            OpKind::Split { .. } | OpKind::Rotary { .. } => tp,
            OpKind::AttnScores(_) | OpKind::AttnSoftmax(_) | OpKind::AttnContext(_) => tp,
            _ => self.stream_div(o),
        }
    }

    fn is_fused_attention(&self, kind: &OpKind) -> bool {
        matches!(self.attention, AttentionImpl::Fused(_)) && attn_of(kind).is_some()
    }
}

/// Stage of each op: layers cut into `pp` contiguous groups (as even as they divide); ops outside the
/// layers follow the op that produces their input (the embedding runs on the first stage, the head on
/// the last).
fn stages(g: &Graph, layers: u64, pp: u64) -> Vec<u32> {
    let producers = g.producers();
    let mut stage = vec![0u32; g.n_ops()];
    for o in g.op_ids() {
        let op = g.op(o);
        stage[o.idx()] = match op.layer {
            Some(l) if layers > 0 => ((l as u64 * pp) / layers) as u32,
            _ => op.inputs.iter().filter_map(|t| producers[t.idx()]).map(|p| stage[p.idx()]).max().unwrap_or(0),
        };
    }
    stage
}

/// Lowers the micro-batch graph `g` for one GPU per stage.
pub fn lower(g: &Graph, spec: Option<&ModelSpec>, p: Parallel, layout: Layout, attention: AttentionImpl) -> Lowered {
    let layers = spec.map_or(0, |s| s.layers);
    let ctx = Ctx { g, spec, p, layout, attention, dtype: g.workload.dtype, stage: stages(g, layers, p.pp) };
    let tp = p.tp;
    let n_stages = p.pp as u32;

    // Weights: their tensor-parallel divisor and the stages that hold them.
    let mut weight_div: BTreeMap<TensorId, u64> = BTreeMap::new();
    let mut weight_stages: BTreeMap<TensorId, BTreeSet<u32>> = BTreeMap::new();
    for o in g.op_ids() {
        let op = g.op(o);
        if op.pass != Pass::Forward {
            continue;
        }
        for (i, &t) in op.inputs.iter().enumerate() {
            if g.tensor(t).role != Role::Weight {
                continue;
            }
            weight_stages.entry(t).or_default().insert(ctx.stage[o.idx()]);
            let div = match op.kind {
                OpKind::Linear(_) => match (linear_shard(base_name(&op.name)), i) {
                    (Shard::Column, _) | (Shard::Row, 1) => tp,
                    _ => 1,
                },
                OpKind::Embedding { .. } if op.name == "embed.tokens" => tp,
                _ => 1,
            };
            let e = weight_div.entry(t).or_insert(div);
            *e = (*e).max(div);
        }
    }

    // Fused attention groups: (pass, layer prefix) -> ops, emitted at the first.
    let mut flash_groups: BTreeMap<(Pass, String), Vec<OpId>> = BTreeMap::new();
    for o in g.op_ids() {
        let op = g.op(o);
        if ctx.is_fused_attention(&op.kind) {
            let prefix = match op.name.find(".attn.") {
                Some(i) => op.name[..i + 5].to_string(),
                None => op.name.clone(),
            };
            let pass = if op.pass == Pass::Recompute { Pass::Recompute } else { op.pass };
            flash_groups.entry((pass, prefix)).or_default().push(o);
        }
    }
    let mut flash_first: BTreeMap<OpId, Vec<OpId>> = BTreeMap::new();
    let mut in_group: BTreeSet<OpId> = BTreeSet::new();
    for ops in flash_groups.into_values() {
        in_group.extend(ops.iter().copied());
        flash_first.insert(ops[0], ops);
    }

    // Backward all-reduces: after the last input-gradient GEMM of each group of column-parallel
    // projections sharing an input.
    let mut last_dgrad: BTreeMap<TensorId, OpId> = BTreeMap::new();
    if tp > 1 {
        let mut fwd_input: BTreeMap<&str, TensorId> = BTreeMap::new();
        for o in g.op_ids() {
            let op = g.op(o);
            if op.pass == Pass::Forward && matches!(op.kind, OpKind::Linear(_)) {
                fwd_input.insert(op.name.as_str(), op.inputs[0]);
            }
        }
        for o in g.op_ids() {
            let op = g.op(o);
            if let OpKind::LinearDgrad(_) = op.kind {
                let base = base_name(&op.name);
                if linear_shard(base) == Shard::Column {
                    if let Some(&x) = fwd_input.get(base) {
                        last_dgrad.insert(x, o);
                    }
                }
            }
        }
    }
    let ar_after: BTreeSet<OpId> = last_dgrad.values().copied().collect();

    let mut kernels = Vec::new();
    let e = ctx.dtype.bytes();
    for o in g.op_ids() {
        let op = g.op(o);
        let stage = ctx.stage[o.idx()];
        let name = strip_layer(&op.name);
        let push = |kernels: &mut Vec<Kernel>, name: String, kind: KernelKind, flops: u64, ops: Vec<String>| {
            kernels.push(Kernel { name, ops, pass: op.pass, stage, kind, flops });
        };
        if in_group.contains(&o) {
            let Some(members) = flash_first.get(&o) else {
                continue;
            };
            let Some(a) = attn_of(&op.kind) else { continue };
            let a = shard_attn(a, tp);
            let AttentionImpl::Fused(variant) = attention else {
                continue;
            };
            let backward = op.pass == Pass::Backward;
            let shape = FlashShape {
                batch: a.batch,
                heads: a.heads,
                kv_heads: a.kv_heads,
                q_len: a.q_len,
                kv_len: a.kv_len,
                head_dim: a.head_dim,
                causal: a.causal,
                dtype: ctx.dtype,
                pass: if backward { FlashPass::Backward } else { FlashPass::Forward },
                variant,
            };
            let flops: u64 = members.iter().map(|m| g.op(*m).cost.flops / tp).sum();
            let ops: Vec<String> = members.iter().map(|m| g.op(*m).name.clone()).collect();
            let first = &g.op(members[0]).name;
            let prefix = strip_layer(match first.find(".attn.") {
                Some(i) => &first[..i + 5],
                None => first,
            });
            let rows = a.batch * a.q_len;
            let o_bytes = rows * a.heads * a.head_dim * e;
            if backward {
                // rowsum(dO * O) per row and head, before the main kernel.
                let pre = StreamShape {
                    read: 2 * o_bytes,
                    write: rows * a.heads * 4,
                    flops: 2 * rows * a.heads * a.head_dim,
                };
                push(&mut kernels, format!("{prefix}.flash_bwd.pre"), KernelKind::Stream(pre), 0, vec![]);
                push(&mut kernels, format!("{prefix}.flash_bwd"), KernelKind::Flash(shape), flops, ops);
                // dQ was accumulated in fp32; convert it to the storage type.
                let conv = StreamShape { read: rows * a.heads * a.head_dim * 4, write: o_bytes, flops: 0 };
                push(&mut kernels, format!("{prefix}.flash_bwd.dq"), KernelKind::Stream(conv), 0, vec![]);
            } else {
                let suffix = if op.pass == Pass::Recompute { ".rc" } else { "" };
                push(&mut kernels, format!("{prefix}.flash_fwd{suffix}"), KernelKind::Flash(shape), flops, ops);
            }
            continue;
        }
        match op.kind {
            OpKind::Split { .. } | OpKind::SplitGrad { .. } | OpKind::KvCacheRead { .. } => {}
            OpKind::Adam { .. } => {}
            OpKind::Linear(l) | OpKind::LinearDgrad(l) | OpKind::LinearWgrad(l) => {
                let base = base_name(&op.name);
                let shard = linear_shard(base);
                let ls = shard_linear(l, shard, tp);
                let sharded = match op.kind {
                    OpKind::Linear(_) => OpKind::Linear(ls),
                    OpKind::LinearDgrad(_) => OpKind::LinearDgrad(ls),
                    _ => OpKind::LinearWgrad(ls),
                };
                let div = if shard == Shard::Replicated { 1 } else { tp };
                if let Some([b, m, n, k]) = sharded.matmul_bmnk() {
                    // The weight's two dimensions are the leading dimensions of the operands in the
                    // forward, the input gradient and the weight gradient (row-major activations and
                    // weights; the token dimension never is one).
                    let aligned = GemmShape::aligned_dim(ls.k, ctx.dtype) && GemmShape::aligned_dim(ls.n, ctx.dtype);
                    let shape = GemmShape { batch: b, m, n, k, dtype: ctx.dtype, aligned };
                    push(
                        &mut kernels,
                        name.clone(),
                        KernelKind::Gemm(shape),
                        op.cost.flops / div,
                        vec![op.name.clone()],
                    );
                }
                let fwd_like = matches!(op.pass, Pass::Forward | Pass::Recompute);
                if tp > 1 && fwd_like && matches!(op.kind, OpKind::Linear(_)) && shard == Shard::Row {
                    let bytes = g.tensor(op.outputs[0]).bytes;
                    push(&mut kernels, format!("{name}.allreduce"), tp_allreduce(&ctx, bytes), 0, vec![]);
                }
                if ar_after.contains(&o) {
                    let bytes = g.tensor(op.outputs[0]).bytes;
                    push(&mut kernels, format!("{name}.allreduce"), tp_allreduce(&ctx, bytes), 0, vec![]);
                }
            }
            OpKind::AttnScores(a)
            | OpKind::AttnScoresGradQ(a)
            | OpKind::AttnScoresGradK(a)
            | OpKind::AttnContext(a)
            | OpKind::AttnContextGradP(a)
            | OpKind::AttnContextGradV(a) => {
                let sharded = match op.kind {
                    OpKind::AttnScores(_) => OpKind::AttnScores(shard_attn(a, tp)),
                    OpKind::AttnScoresGradQ(_) => OpKind::AttnScoresGradQ(shard_attn(a, tp)),
                    OpKind::AttnScoresGradK(_) => OpKind::AttnScoresGradK(shard_attn(a, tp)),
                    OpKind::AttnContext(_) => OpKind::AttnContext(shard_attn(a, tp)),
                    OpKind::AttnContextGradP(_) => OpKind::AttnContextGradP(shard_attn(a, tp)),
                    _ => OpKind::AttnContextGradV(shard_attn(a, tp)),
                };
                if let Some([b, m, n, k]) = sharded.matmul_bmnk() {
                    // Sequence and head dimensions are each the leading dimension of Q, K, V or the scores.
                    let aligned = [m, n, k].iter().all(|&d| GemmShape::aligned_dim(d, ctx.dtype));
                    let shape = GemmShape { batch: b, m, n, k, dtype: ctx.dtype, aligned };
                    push(&mut kernels, name, KernelKind::Gemm(shape), op.cost.flops / tp, vec![op.name.clone()]);
                }
            }
            OpKind::AllReduce { elems } => {
                let spec = CollSpec { op: CollOp::AllReduce, bytes: elems * e, group: ctx.layout.dp };
                push(&mut kernels, name, KernelKind::Collective(spec), 0, vec![op.name.clone()]);
            }
            _ => {
                let div = ctx.stream_div(o);
                let s = StreamShape {
                    read: op.cost.bytes_read / div,
                    write: op.cost.bytes_written / div,
                    flops: op.cost.flops / div,
                };
                push(&mut kernels, name.clone(), KernelKind::Stream(s), op.cost.flops / div, vec![op.name.clone()]);
                if tp > 1 && op.pass == Pass::Forward {
                    let all_reduced = match op.kind {
                        OpKind::Embedding { .. } if op.name == "embed.tokens" => Some(g.tensor(op.outputs[0]).bytes),
                        // Max, sum of exponentials and the target logit, per row, in fp32.
                        OpKind::CrossEntropy { rows, .. } => Some(3 * rows * 4),
                        _ => None,
                    };
                    if let Some(bytes) = all_reduced {
                        push(&mut kernels, format!("{name}.allreduce"), tp_allreduce(&ctx, bytes), 0, vec![]);
                    }
                }
            }
        }
    }

    // The optimizer: one multi-tensor Adam kernel per stage over its share of the parameters.
    let zero_div = |level: u8| if p.zero >= level { p.dp } else { 1 };
    let mut adam: Vec<(StreamShape, u64, Vec<String>)> = vec![(StreamShape::default(), 0, vec![]); n_stages as usize];
    let mut opt_state: BTreeMap<TensorId, TensorId> = BTreeMap::new();
    for o in g.op_ids() {
        let op = g.op(o);
        if let OpKind::Adam { .. } = op.kind {
            let w = op.inputs[0];
            let div = weight_div.get(&w).copied().unwrap_or(1) * zero_div(1);
            let s = &mut adam[ctx.stage[o.idx()] as usize];
            s.0.read += op.cost.bytes_read / div;
            s.0.write += op.cost.bytes_written / div;
            s.0.flops += op.cost.flops / div;
            s.1 += op.cost.flops / div;
            s.2.push(op.name.clone());
            for &t in &op.inputs[2..] {
                opt_state.insert(t, w);
            }
        }
    }
    for (stage, (s, flops, ops)) in adam.into_iter().enumerate() {
        if ops.is_empty() {
            continue;
        }
        kernels.push(Kernel {
            name: "adam (multi-tensor)".into(),
            ops,
            pass: Pass::Optimizer,
            stage: stage as u32,
            kind: KernelKind::Stream(s),
            flops,
        });
    }

    // Memory per GPU of each stage.
    let train = g.workload.phase == crate::model::Phase::Train;
    let mut memory = vec![StageMemory::default(); n_stages as usize];
    let mut weight_bytes = vec![0u64; n_stages as usize];
    for (&w, st) in &weight_stages {
        let bytes = g.tensor(w).bytes / weight_div.get(&w).copied().unwrap_or(1);
        for &s in st {
            weight_bytes[s as usize] += bytes;
            memory[s as usize].weights += bytes / zero_div(3);
            if train {
                memory[s as usize].gradients += bytes / zero_div(2);
            }
        }
    }
    for (&t, w) in &opt_state {
        let bytes = g.tensor(t).bytes / weight_div.get(w).copied().unwrap_or(1) / zero_div(1);
        if let Some(st) = weight_stages.get(w) {
            for &s in st {
                memory[s as usize].optimizer += bytes;
            }
        }
    }
    let producers = g.producers();
    let mut saved = vec![0u64; n_stages as usize];
    let mut transient = vec![0u64; n_stages as usize];
    let mut saved_set: BTreeSet<TensorId> = BTreeSet::new();
    for o in g.op_ids() {
        let op = g.op(o);
        let fused_internal = ctx.is_fused_attention(&op.kind);
        if matches!(op.pass, Pass::Backward | Pass::Recompute) {
            for &t in &op.inputs {
                let Some(p) = producers[t.idx()] else { continue };
                let prod = g.op(p);
                if prod.pass != Pass::Forward || g.tensor(t).role != Role::Activation {
                    continue;
                }
                // Flash attention keeps no score matrix; it saves a log-sum-exp per row and head.
                if matches!(prod.kind, OpKind::AttnScores(_) | OpKind::AttnSoftmax(_))
                    && ctx.is_fused_attention(&prod.kind)
                {
                    if let OpKind::AttnSoftmax(a) = prod.kind {
                        if saved_set.insert(t) {
                            let a = shard_attn(a, tp);
                            saved[ctx.stage[p.idx()] as usize] += a.batch * a.heads * a.q_len * 4;
                        }
                    }
                    continue;
                }
                if saved_set.insert(t) {
                    saved[ctx.stage[p.idx()] as usize] += g.tensor(t).bytes / ctx.act_div(p);
                }
            }
        }
        if !fused_internal {
            let live: u64 = op
                .inputs
                .iter()
                .chain(op.outputs.iter())
                .filter(|t| matches!(g.tensor(**t).role, Role::Activation | Role::ActivationGrad))
                .map(|t| g.tensor(*t).bytes)
                .sum::<u64>()
                / ctx.act_div(o).max(ctx.stream_div(o));
            let s = &mut transient[ctx.stage[o.idx()] as usize];
            *s = (*s).max(live);
        }
    }
    let kvd = kv_div(spec, tp);
    for o in g.op_ids() {
        let op = g.op(o);
        if let OpKind::KvCacheAppend { .. } = op.kind {
            // The cache after this step: the appended tensor, held for every micro-batch in flight.
            let bytes = g.tensor(op.outputs[0]).bytes / kvd;
            memory[ctx.stage[o.idx()] as usize].kv_cache += bytes * p.microbatches;
        }
    }
    for s in 0..n_stages as usize {
        // 1F1B: stage s holds the activations of min(M, P - s) micro-batches in flight.
        let in_flight = p.microbatches.min(p.pp - s as u64);
        memory[s].activations = saved[s] * in_flight + transient[s];
    }
    let mut layer_count = vec![0u64; n_stages as usize];
    for l in 0..layers {
        layer_count[((l * p.pp) / layers.max(1)) as usize] += 1;
    }
    let boundary_bytes = spec.map_or(0, |s| g.workload.tokens() * s.hidden * e);
    Lowered {
        kernels,
        stages: n_stages,
        memory,
        grad_bytes: if train { weight_bytes.clone() } else { vec![0; n_stages as usize] },
        weight_bytes,
        layers: layer_count,
        boundary_bytes,
    }
}

fn tp_allreduce(ctx: &Ctx, bytes: u64) -> KernelKind {
    KernelKind::Collective(CollSpec { op: CollOp::AllReduce, bytes, group: ctx.layout.tp })
}
