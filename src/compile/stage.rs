//! Stages: the graph's ops grouped into the units the compiler places, one region each, and the
//! streams of data between them and the IO ports.
//!
//! - Views cost nothing: `split` and `split_grad` disappear and their consumers read the slices from
//!   the real producers.
//! - A KV-cache read or append joins the attention stage that reads the same cache (the cache lives
//!   in that stage's SRAM).
//! - Weight streaming folds the layers: the ops of one layer (forward, and backward in training) are
//!   placed once and run once per layer (`iters = L`); a stream between layers becomes a loop.
//!
//! Every stage knows its inputs (slots fed by streams), its resident tensors and its outputs; the
//! algorithms (`kernel.rs`) only see this description, never the graph.

use std::collections::BTreeMap;

use crate::graph::{Graph, OpId, OpKind, Pass, Role, TensorId};
use crate::mesh::Peer;
use crate::model::NormKind;

use super::{CompileError, Mode};

pub(crate) type StageId = usize;

/// Which loop a stage runs in (weight streaming folds the layers into loops).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Loop {
    /// Runs once per step.
    Once,
    /// Runs once per layer in the forward pass (iteration i is layer i).
    Fwd,
    /// Runs once per layer in the backward pass (iteration i is layer L - 1 - i).
    Bwd,
}

/// How a fabric input reaches the stage's compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotKind {
    /// Consumed as it streams in: one iteration's data per iteration of the stage.
    Live,
    /// Arrives ahead of use and is kept in SRAM: an operand that must be whole before the compute
    /// starts (attention's K and V), or saved for the backward pass. `all`: the compute waits for every
    /// store of the step (data saved for a later loop), else for the stores of its own iteration.
    Stored { all: bool },
    /// Weights streamed in from MemoryX once per iteration, in column bands (weight streaming).
    Weights,
    /// The optimizer's updated copy of a resident weight, written into the tile at the end of the step.
    Refresh,
}

#[derive(Clone, Debug)]
pub(crate) struct Slot {
    /// The graph tensor the slot receives (its first instance's, when layers fold).
    pub tensor: TensorId,
    /// Values per iteration of the stage.
    pub values: u64,
    pub elem_bytes: u64,
    pub kind: SlotKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeldKind {
    Weight,
    KvCache,
    OptState,
    /// A single-op workload's operand, placed in SRAM before the run (as published per-op benchmarks
    /// measure them).
    Preplaced,
}

/// A tensor resident in the stage's SRAM.
#[derive(Clone, Debug)]
pub(crate) struct Held {
    pub name: String,
    /// Bytes of one copy (spread over the stage's PEs).
    pub bytes: u64,
    /// Copies held at once (one per layer for a folded loop's KV caches).
    pub copies: u64,
    pub kind: HeldKind,
}

#[derive(Clone, Debug)]
pub(crate) struct OutSlot {
    /// The graph tensor the slot produces (its first instance's, when layers fold).
    pub tensor: TensorId,
    /// Values per iteration.
    pub values: u64,
    pub elem_bytes: u64,
}

/// Where an op input comes from, inside its stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operand {
    Slot(usize),
    Held(usize),
    /// Produced inside the stage (a fused op's output) or not needed on the wafer.
    Internal,
}

/// The computation of a stage, in the sizes the algorithms need (per iteration).
#[derive(Clone, Debug)]
pub(crate) enum Work {
    /// out[rows, cols] = a[rows, k] x b[k, cols] with `b` stationary: MACs = rows x k x cols
    /// (rows are per group for grouped linears; cols run over groups x n, or batch x heads x n).
    Matmul {
        a: usize,
        b: Operand,
        /// The token's fresh K or V appended to a resident cache (decode).
        fresh: Option<usize>,
        rows: u64,
        k: u64,
        cols: u64,
        /// Bias add: rows x cols extra FLOPs.
        bias: bool,
        /// Attention: the contraction stays whole on every PE (no reduction), so it streams.
        no_split_k: bool,
        out: usize,
    },
    /// out[k, cols] = sum over streamed rows of x[row, k] x dy[row, cols] (weight gradients, dK, dV).
    Accum {
        x: usize,
        dy: usize,
        rows: u64,
        k: u64,
        cols: u64,
        out: usize,
        /// Bias gradient: the column sums of dy (rows x cols FLOPs), a second output.
        bias_out: Option<usize>,
    },
    /// Per row of `width` values: a reduction across the row, then an elementwise pass.
    RowReduce {
        main: usize,
        rows: u64,
        width: u64,
        per_elem: u64,
        out: Option<usize>,
        /// Column sums over all rows (norm gradients' dgamma and dbeta), emitted once per iteration.
        colsum: Option<usize>,
        /// A scalar over all rows (the loss), emitted once per iteration.
        scalar: Option<usize>,
    },
    /// An elementwise op over rows x width "work elements" (FLOPs = rows x width x per_elem).
    Elementwise {
        main: Option<usize>,
        rows: u64,
        width: u64,
        per_elem: u64,
        /// The output accumulates over the iteration and leaves at its end (embedding gradient).
        accumulate: bool,
    },
    /// Embedding rows selected by ids: a lookup tree over the resident table (0 FLOPs).
    Lookup {
        ids: usize,
        rows: u64,
        width: u64,
        out: usize,
    },
    /// Rows looked up by MemoryX and streamed in (weight streaming): a relay (0 FLOPs).
    Relay {
        main: usize,
        rows: u64,
        width: u64,
    },
    /// Single ops on pre-placed operands.
    SingleGemv {
        k: u64,
        n: u64,
    },
    SingleGemm {
        m: u64,
        n: u64,
        k: u64,
    },
    SingleAdd {
        n: u64,
    },
    AllReduce {
        elems: u64,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct Stage {
    pub name: String,
    /// The op whose kind names the stage (first instance).
    pub main: OpId,
    /// Every graph op the stage executes (all layers when folded).
    pub ops: Vec<OpId>,
    /// The ops of each iteration (the main op, then the ops fused into it, in op order): one list
    /// outside a loop, one per layer in a folded loop.
    pub inst: Vec<Vec<OpId>>,
    pub lp: Loop,
    pub iters: u32,
    /// Layer of the main op, for splitting across wafers.
    pub layer: Option<u32>,
    pub work: Work,
    pub flops_iter: u64,
    pub inputs: Vec<Slot>,
    pub held: Vec<Held>,
    pub outputs: Vec<OutSlot>,
    /// Dtype bytes of the stage's floating-point data.
    pub dtype_bytes: u64,
    /// The pass of the main op (forward, backward, ...), for reports.
    pub pass: Pass,
    /// A MoE dispatch or combine (or their gradients): which rows go where is data (the routing of
    /// every token of the step), so the tiling runs it once over all the rows where that fits.
    pub routes_rows: bool,
}

impl Stage {
    pub fn flops(&self) -> u64 {
        self.flops_iter * self.iters as u64
    }
    pub fn kind_name(&self, g: &Graph) -> &'static str {
        g.op(self.main).kind.name()
    }
}

/// One end of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum End {
    /// A stage's output slot (as a source) or input slot (as a destination).
    Stage { stage: StageId, slot: usize },
    /// Off the wafer.
    Port(PeerKind),
}

/// What is behind the ports of a stream (a `mesh::Peer` without the wafer index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum PeerKind {
    Host,
    MemoryX,
    SwarmX,
    /// The previous or next wafer (multi-wafer), by wafer index.
    Wafer(u32),
}

impl PeerKind {
    pub fn peer(self) -> Peer {
        match self {
            PeerKind::Host => Peer::Host,
            PeerKind::MemoryX => Peer::MemoryX,
            PeerKind::SwarmX => Peer::SwarmX,
            PeerKind::Wafer(w) => Peer::Wafer(w),
        }
    }
    pub fn name(self) -> String {
        match self {
            PeerKind::Host => "host".into(),
            PeerKind::MemoryX => "memoryx".into(),
            PeerKind::SwarmX => "swarmx".into(),
            PeerKind::Wafer(w) => format!("wafer{w}"),
        }
    }
}

/// Data moving from one end to another, `values` per sending iteration, on the sending iterations
/// `first .. first + count` (0-based) of the source.
#[derive(Clone, Debug)]
pub(crate) struct Stream {
    pub name: String,
    pub from: End,
    pub to: End,
    pub values: u64,
    pub elem_bytes: u64,
    pub send_first: u32,
    pub send_count: u32,
}

impl Stream {
    pub fn bytes_per_step(&self) -> u64 {
        self.values * self.elem_bytes * self.send_count as u64
    }
}

/// The stages of one compile, with their streams.
#[derive(Clone, Debug)]
pub(crate) struct Stages {
    pub stages: Vec<Stage>,
    pub streams: Vec<Stream>,
    /// Layers folded into loops (weight streaming), else 1.
    pub layers: u32,
    /// FLOPs of the ops that run off the wafer (the optimizer in MemoryX).
    pub offload_flops: u64,
    pub notes: Vec<String>,
}

/// Ops to drop as views and the slices they alias.
fn is_view(k: &OpKind) -> bool {
    matches!(k, OpKind::Split { .. } | OpKind::SplitGrad { .. })
}

/// Resolves a tensor read by a consumer to the real producers' tensors: a split output is a slice of
/// its input; a split_grad output is the concatenation of its inputs.
fn resolve(g: &Graph, producers: &[Option<OpId>], t: TensorId) -> Vec<TensorId> {
    match producers[t.idx()] {
        Some(p) if matches!(g.op(p).kind, OpKind::Split { .. }) => {
            // The slice itself is what moves; its producer is the split input's producer.
            vec![t]
        }
        Some(p) if matches!(g.op(p).kind, OpKind::SplitGrad { .. }) => {
            g.op(p).inputs.iter().flat_map(|&i| resolve(g, producers, i)).collect()
        }
        _ => vec![t],
    }
}

/// The op that really produces `t` (skipping views).
fn real_producer(g: &Graph, producers: &[Option<OpId>], t: TensorId) -> Option<OpId> {
    let p = producers[t.idx()]?;
    match g.op(p).kind {
        OpKind::Split { .. } => real_producer(g, producers, g.op(p).inputs[0]),
        _ => Some(p),
    }
}

/// Loop membership and iteration of an op, and its position key for folding.
struct Fold {
    layers: u32,
    /// Stage key of each op: ops with the same key share a stage.
    key: Vec<Option<(Loop, usize)>>,
    iter: Vec<u32>,
}

fn pass_loop(p: Pass) -> Loop {
    match p {
        Pass::Forward => Loop::Fwd,
        _ => Loop::Bwd,
    }
}

/// Folds the layers for weight streaming: op j of (layer l, pass group) maps to position j of layer 0.
fn fold(g: &Graph, on_wafer: &[bool], layers: u32) -> Result<Fold, CompileError> {
    let n = g.n_ops();
    let mut key = vec![None; n];
    let mut iter = vec![0u32; n];
    if layers <= 1 {
        return Ok(Fold { layers: 1, key, iter });
    }
    // Ops of each (loop, layer), in op order.
    let mut groups: BTreeMap<(Loop, u32), Vec<OpId>> = BTreeMap::new();
    for o in g.op_ids() {
        if !on_wafer[o.idx()] {
            continue;
        }
        let op = g.op(o);
        if let Some(l) = op.layer {
            groups.entry((pass_loop(op.pass), l)).or_default().push(o);
        }
    }
    for lp in [Loop::Fwd, Loop::Bwd] {
        let first = match groups.get(&(lp, 0)) {
            Some(v) => v.clone(),
            None => continue,
        };
        for l in 0..layers {
            let ops = groups.get(&(lp, l)).cloned().unwrap_or_default();
            let same = ops.len() == first.len()
                && ops.iter().zip(&first).all(|(&a, &b)| {
                    let (x, y) = (g.op(a), g.op(b));
                    x.kind == y.kind && x.cost == y.cost && x.pass == y.pass
                });
            if !same {
                return Err(CompileError::Unsupported(format!(
                    "weight streaming folds identical layers into one loop, but layer {l} of the {} pass \
                     differs from layer 0",
                    if lp == Loop::Fwd { "forward" } else { "backward" }
                )));
            }
            for (j, &o) in ops.iter().enumerate() {
                key[o.idx()] = Some((lp, j));
                iter[o.idx()] = if lp == Loop::Fwd { l } else { layers - 1 - l };
            }
        }
    }
    Ok(Fold { layers, key, iter })
}

/// Bytes of one element of a float tensor in the workload dtype.
fn elem_bytes(g: &Graph, t: TensorId) -> u64 {
    g.tensor(t).elem.bytes()
}

/// Under weight streaming, whether op `o` runs in MemoryX: the optimizer, and with it the scatter-add of
/// embedding gradients and the sums of tied weights' gradients (the tables never sit on the wafer).
pub fn runs_in_memoryx(g: &Graph, o: OpId) -> bool {
    let op = g.op(o);
    op.pass == Pass::Optimizer
        || matches!(op.kind, OpKind::EmbeddingGrad { .. })
        || (matches!(op.kind, OpKind::Add { .. }) && g.tensor(op.outputs[0]).role == Role::WeightGrad)
}

/// Builds the stages of `g` for `mode`.
pub(crate) fn build(g: &Graph, mode: Mode, single: bool) -> Result<Stages, CompileError> {
    let producers = g.producers();
    let n = g.n_ops();
    let mut notes = Vec::new();
    // The optimizer runs in MemoryX under weight streaming.
    let mut on_wafer = vec![true; n];
    let mut offload_ops = Vec::new();
    let mut offload_flops = 0u64;
    for o in g.op_ids() {
        let op = g.op(o);
        if is_view(&op.kind) {
            on_wafer[o.idx()] = false;
        }
        if mode == Mode::WeightStreaming && runs_in_memoryx(g, o) {
            on_wafer[o.idx()] = false;
            offload_ops.push(o);
            offload_flops += op.cost.flops;
        }
    }
    if !offload_ops.is_empty() {
        let adam = offload_ops.iter().filter(|&&o| g.op(o).pass == Pass::Optimizer).count();
        let other = offload_ops.len() - adam;
        notes.push(format!(
            "the optimizer ({adam} Adam ops{}, {offload_flops} FLOPs) runs in MemoryX: weight gradients leave through \
             the IO ports",
            if other > 0 {
                format!(", with {other} embedding-gradient scatter-adds and tied-gradient sums")
            } else {
                String::new()
            }
        ));
    }
    let layers = if mode == Mode::WeightStreaming {
        g.op_ids().filter_map(|o| g.op(o).layer).max().map_or(1, |l| l + 1)
    } else {
        1
    };
    let fold = fold(g, &on_wafer, layers)?;

    // KV-cache fusion: reads and appends join the attention op that reads the same cache or fresh rows.
    let mut consumers: Vec<Vec<OpId>> = vec![Vec::new(); g.tensors.len()];
    for o in g.op_ids() {
        for &t in &g.op(o).inputs {
            consumers[t.idx()].push(o);
        }
    }
    let mut fused_into: Vec<Option<OpId>> = vec![None; n];
    for o in g.op_ids() {
        let op = g.op(o);
        match op.kind {
            OpKind::KvCacheRead { .. } => {
                let out = op.outputs[0];
                let Some(&c) = consumers[out.idx()].first() else {
                    return Err(CompileError::Internal(format!("{}: a cache read nobody uses", op.name)));
                };
                fused_into[o.idx()] = Some(c);
            }
            OpKind::KvCacheAppend { .. } => {
                let fresh = *op.inputs.last().unwrap_or(&op.outputs[0]);
                // The attention op reading the same fresh rows, directly or through a cache read.
                let target = consumers[fresh.idx()].iter().find_map(|&c| match g.op(c).kind {
                    OpKind::AttnScores(_) | OpKind::AttnContext(_) => Some(c),
                    OpKind::KvCacheRead { .. } => consumers[g.op(c).outputs[0].idx()].first().copied(),
                    _ => None,
                });
                fused_into[o.idx()] = target;
            }
            _ => {}
        }
    }
    // Stages: one per folded position (weight streaming) or per op, in op order of their first instance.
    let mut key_stage: BTreeMap<(Loop, usize), usize> = BTreeMap::new();
    let mut groups: Vec<Vec<OpId>> = Vec::new();
    for o in g.op_ids() {
        if !on_wafer[o.idx()] || fused_into[o.idx()].is_some() {
            continue;
        }
        match fold.key[o.idx()] {
            Some(k) => {
                let i = *key_stage.entry(k).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[i].push(o);
            }
            None => groups.push(vec![o]),
        }
    }
    // Pipeline order: by the first iteration's instance.
    let first = |v: &Vec<OpId>| *v.iter().min_by_key(|o| (fold.iter[o.idx()], o.0)).unwrap_or(&v[0]);
    groups.sort_by_key(|v| first(v).0);
    let mut stage_of: Vec<Option<StageId>> = vec![None; n];
    for (sid, v) in groups.iter().enumerate() {
        for &o in v {
            stage_of[o.idx()] = Some(sid);
        }
    }
    for o in g.op_ids() {
        if let Some(t) = fused_into[o.idx()] {
            stage_of[o.idx()] = stage_of[t.idx()];
        }
    }
    // Each stage's instances by iteration: the main op, then its fused ops in op order.
    let mut instances: Vec<Vec<Vec<OpId>>> = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    let mut slot_maps = Vec::new();
    for v in &groups {
        let main0 = first(v);
        let lp = fold.key[main0.idx()].map_or(Loop::Once, |k| k.0);
        let iters = if lp == Loop::Once { 1 } else { fold.layers };
        let mut by_iter: Vec<Vec<OpId>> = vec![Vec::new(); iters as usize];
        for &m in v {
            let it = if lp == Loop::Once { 0 } else { fold.iter[m.idx()] as usize };
            let mut list = vec![m];
            list.extend(g.op_ids().filter(|&f| fused_into[f.idx()] == Some(m)));
            by_iter[it] = list;
        }
        if by_iter.iter().any(|l| l.len() != by_iter[0].len()) {
            return Err(CompileError::Internal(format!("{}: layers fuse different ops", g.op(main0).name)));
        }
        let op = g.op(main0);
        let mut name = op.name.clone();
        if lp != Loop::Once {
            let pre = format!("l{}.", op.layer.unwrap_or(0));
            name = match name.strip_prefix(&pre) {
                Some(rest) => format!("l*.{rest}"),
                None => format!("l*:{name}"),
            };
        }
        let mut st = StageBuilder {
            g,
            mode,
            single,
            slots: Vec::new(),
            held: Vec::new(),
            outputs: Vec::new(),
            slot_of: BTreeMap::new(),
            slot_map: BTreeMap::new(),
        };
        let (work, _operands, flops_iter) = st.work(&by_iter[0], &producers, &fused_into)?;
        let mut ops: Vec<OpId> = by_iter.iter().flatten().copied().collect();
        ops.sort();
        stages.push(Stage {
            name,
            main: main0,
            ops,
            inst: by_iter.clone(),
            lp,
            iters,
            layer: op.layer,
            work,
            flops_iter,
            inputs: st.slots,
            held: st.held,
            outputs: st.outputs,
            dtype_bytes: g.workload.dtype.bytes(),
            pass: op.pass,
            routes_rows: matches!(
                op.kind,
                OpKind::MoeDispatch(_) | OpKind::MoeCombine(_) | OpKind::MoeDispatchGrad(_) | OpKind::MoeCombineGrad(_)
            ),
        });
        slot_maps.push(st.slot_map);
        instances.push(by_iter);
    }
    // The stages' FLOPs must be the graph's on-wafer FLOPs (folded layers are identical).
    let graph_flops: u64 = g.op_ids().filter(|o| stage_of[o.idx()].is_some()).map(|o| g.op(o).cost.flops).sum();
    let stage_flops: u64 = stages.iter().map(|s| s.flops()).sum();
    if graph_flops != stage_flops {
        return Err(CompileError::Internal(format!(
            "stage FLOPs {stage_flops} differ from the graph's on-wafer FLOPs {graph_flops}"
        )));
    }
    let mut streams = Vec::new();
    let ctx = LinkCtx {
        g,
        on_wafer: &on_wafer,
        producers: &producers,
        stage_of: &stage_of,
        fold: &fold,
        instances: &instances,
        slot_maps: &slot_maps,
        mode,
    };
    ctx.link(&mut stages, &mut streams, &mut notes)?;
    count_slot_maps(g, &mut stages, &mut streams);
    Ok(Stages { stages, streams, layers: fold.layers, offload_flops, notes })
}

/// Bytes of the expert id a dispatched row carries on the fabric: one 32-bit wavelet, as the wafer's
/// other integer data (token ids, labels) travels.
const EXPERT_ID_BYTES: u64 = 4;

/// A MoE layer's slot map (which expert each slot of the dispatched buffer holds, `Route::dispatch`) rides
/// with the dispatched rows from the dispatch to the combine, and with their gradients from the combine's
/// gradient to the dispatch's gradient: the grouped linears read it to pick each slot's expert weights.
/// It is data the program moves, so it is counted as the hardware would carry it: every row of the
/// dispatched buffer (`active x capacity` rows, `Route::dispatch`) carries its slot's expert id in one
/// 32-bit wavelet. With one copy per slot (decode) that is the map itself, `active` wavelets; with a
/// capacity of c rows per slot it is the map c times, once per row that needs it. Every stream of a tensor
/// in the dispatched layout, and the slots that send and receive it, count these wavelets as extra values
/// of their dtype (`EXPERT_ID_BYTES / elem_bytes` per row), so wavelets sent and received, link time,
/// buffers and cycles include them. Being a whole wavelet per row, they keep every run of rows a whole
/// number of wavelets, so the tilings' runs do not change.
fn count_slot_maps(g: &Graph, stages: &mut [Stage], streams: &mut [Stream]) {
    // Tensors that carry a slot map, with the dispatched buffer's rows, in op order (a topological order).
    let mut carries: BTreeMap<TensorId, u64> = BTreeMap::new();
    for o in g.op_ids() {
        let op = g.op(o);
        let rows = match &op.kind {
            OpKind::MoeDispatch(r) | OpKind::MoeCombineGrad(r) => {
                carries.insert(op.outputs[0], r.active() * r.capacity());
                continue;
            }
            // Where the dispatched rows end, and weight gradients (every expert's, in expert order).
            OpKind::MoeCombine(_) | OpKind::MoeDispatchGrad(_) | OpKind::LinearWgrad(_) | OpKind::Adam { .. } => {
                continue
            }
            _ => op.inputs.iter().filter_map(|t| carries.get(t).copied()).max(),
        };
        if let Some(rows) = rows {
            for &t in &op.outputs {
                carries.insert(t, rows);
            }
        }
    }
    if carries.is_empty() {
        return;
    }
    let extra =
        |t: TensorId, elem_bytes: u64| carries.get(&t).map_or(0, |&rows| rows * EXPERT_ID_BYTES / elem_bytes.max(1));
    for sm in streams.iter_mut() {
        let t = match (sm.from, sm.to) {
            (End::Stage { stage, slot }, _) => Some(stages[stage].outputs[slot].tensor),
            (_, End::Stage { stage, slot }) => Some(stages[stage].inputs[slot].tensor),
            _ => None,
        };
        if let Some(t) = t {
            sm.values += extra(t, sm.elem_bytes);
        }
    }
    for st in stages.iter_mut() {
        for sl in st.inputs.iter_mut() {
            sl.values += extra(sl.tensor, sl.elem_bytes);
        }
        for o in st.outputs.iter_mut() {
            o.values += extra(o.tensor, o.elem_bytes);
        }
    }
}

/// Builds one stage's description from its first instance.
struct StageBuilder<'a> {
    g: &'a Graph,
    mode: Mode,
    single: bool,
    slots: Vec<Slot>,
    held: Vec<Held>,
    outputs: Vec<OutSlot>,
    /// Slot index of each input tensor (a tensor read twice shares a slot).
    slot_of: BTreeMap<TensorId, usize>,
    /// (position of the op in the instance, input index, part) -> slot.
    slot_map: BTreeMap<(usize, usize, usize), usize>,
}

impl StageBuilder<'_> {
    fn new_slot(&mut self, t: TensorId, values: u64, kind: SlotKind) -> usize {
        if let Some(&i) = self.slot_of.get(&t) {
            return i;
        }
        let tt = self.g.tensor(t);
        self.slots.push(Slot { tensor: t, values, elem_bytes: tt.elem.bytes(), kind });
        self.slot_of.insert(t, self.slots.len() - 1);
        self.slots.len() - 1
    }

    fn held(&mut self, t: TensorId, kind: HeldKind) -> usize {
        let tt = self.g.tensor(t);
        if let Some(i) = self.held.iter().position(|h| h.name == tt.name) {
            return i;
        }
        self.held.push(Held { name: tt.name.clone(), bytes: tt.bytes, copies: 1, kind });
        self.held.len() - 1
    }

    /// The operand for input `j` (part `k`) of the op at `pos` in the instance.
    fn operand(
        &mut self,
        key: (usize, usize, usize),
        t: TensorId,
        producers: &[Option<OpId>],
        fused_into: &[Option<OpId>],
    ) -> Operand {
        let tt = self.g.tensor(t);
        let od = if let Some(p) = real_producer(self.g, producers, t) {
            if fused_into[p.idx()].is_some() {
                return Operand::Internal;
            }
            Operand::Slot(self.new_slot(t, tt.elems(), SlotKind::Live))
        } else {
            match tt.role {
                Role::Weight if self.mode == Mode::WeightStreaming && !self.single => {
                    Operand::Slot(self.new_slot(t, tt.elems(), SlotKind::Weights))
                }
                Role::Weight => Operand::Held(self.held(t, HeldKind::Weight)),
                Role::KvCache => Operand::Held(self.held(t, HeldKind::KvCache)),
                Role::OptimizerState => Operand::Held(self.held(t, HeldKind::OptState)),
                Role::Input if self.single => Operand::Held(self.held(t, HeldKind::Preplaced)),
                _ => Operand::Slot(self.new_slot(t, tt.elems(), SlotKind::Live)),
            }
        };
        if let Operand::Slot(s) = od {
            self.slot_map.insert(key, s);
        }
        od
    }

    fn output(&mut self, t: TensorId) -> usize {
        let tt = self.g.tensor(t);
        self.outputs.push(OutSlot { tensor: t, values: tt.elems(), elem_bytes: tt.elem.bytes() });
        self.outputs.len() - 1
    }

    /// The work of an instance (main op first, then fused ops), the operands of the main op's
    /// inputs, and the FLOPs per iteration.
    fn work(
        &mut self,
        inst: &[OpId],
        producers: &[Option<OpId>],
        fused_into: &[Option<OpId>],
    ) -> Result<(Work, Vec<Operand>, u64), CompileError> {
        let g = self.g;
        let o = inst[0];
        let op = g.op(o);
        let flops = op.cost.flops;
        // Inputs: a split_grad output expands to its parts (one slot each).
        let mut operands = Vec::new();
        for (j, &t) in op.inputs.iter().enumerate() {
            let mut first = None;
            for (k, p) in resolve(g, producers, t).into_iter().enumerate() {
                let od = self.operand((0, j, k), p, producers, fused_into);
                first.get_or_insert(od);
            }
            operands.push(first.unwrap_or(Operand::Internal));
        }
        // A fused cache read's cache and fresh rows stand in for its output.
        let mut fresh = None;
        for (pos, &f) in inst.iter().enumerate().skip(1) {
            let fop = g.op(f);
            match fop.kind {
                OpKind::KvCacheRead { .. } => {
                    let cache = self.operand((pos, 0, 0), fop.inputs[0], producers, fused_into);
                    let fr = self.operand((pos, 1, 0), fop.inputs[1], producers, fused_into);
                    if let Some(i) = op.inputs.iter().position(|&t| t == fop.outputs[0]) {
                        operands[i] = cache;
                    }
                    if let Operand::Slot(s) = fr {
                        fresh = Some(s);
                    }
                }
                OpKind::KvCacheAppend { .. } => {
                    for (j, &t) in fop.inputs.iter().enumerate() {
                        let _ = self.operand((pos, j, 0), t, producers, fused_into);
                    }
                }
                _ => {}
            }
        }
        let slot = |od: Operand| -> Result<usize, CompileError> {
            match od {
                Operand::Slot(s) => Ok(s),
                _ => Err(CompileError::Internal(format!("{}: expected a streamed input", op.name))),
            }
        };
        let outs: Vec<usize> = op.outputs.iter().map(|&t| self.output(t)).collect();
        let one = |i: usize| outs.get(i).copied();
        let ew = |main: Option<usize>, rows: u64, width: u64, per: u64| Work::Elementwise {
            main,
            rows,
            width,
            per_elem: per,
            accumulate: false,
        };
        let first_slot = operands.iter().find_map(|od| match od {
            Operand::Slot(s) => Some(*s),
            _ => None,
        });
        // The input that arrives last: the one whose producer comes latest (ops are numbered in a
        // topological order; the first of equals). A join is paced by it, and the tiling buffers the
        // others for a whole iteration: a residual add's skip input runs ahead of the branch it skips
        // by the whole branch (attention waits for every token), so it must be the one buffered.
        let late_slot = operands
            .iter()
            .zip(&op.inputs)
            .enumerate()
            .filter_map(|(j, (od, &t))| match od {
                Operand::Slot(s) => Some(((real_producer(g, producers, t), std::cmp::Reverse(j)), *s)),
                _ => None,
            })
            .max_by_key(|(key, _)| *key)
            .map(|(_, s)| s);
        use crate::graph::ops::flops_per_elem as fpe;
        // Single ops: every operand is pre-placed.
        if self.single {
            let work = match op.kind {
                OpKind::Linear(l) if l.m == 1 => Work::SingleGemv { k: l.k, n: l.n },
                OpKind::Linear(l) => Work::SingleGemm { m: l.m, n: l.n, k: l.k },
                OpKind::Add { rows, .. } => Work::SingleAdd { n: rows.rows * rows.width },
                OpKind::AllReduce { elems } => Work::AllReduce { elems },
                _ => return Err(CompileError::Internal(format!("{}: not a single-op workload", op.name))),
            };
            self.outputs.clear();
            return Ok((work, operands, flops));
        }
        let per = |rows: u64, width: u64| flops / (rows * width).max(1);
        let rr = |main: usize, rows: u64, width: u64, per_elem: u64, out: Option<usize>| Work::RowReduce {
            main,
            rows,
            width,
            per_elem,
            out,
            colsum: None,
            scalar: None,
        };
        let work = match op.kind {
            OpKind::Linear(l) => Work::Matmul {
                a: slot(operands[0])?,
                b: operands[1],
                fresh: None,
                rows: l.m,
                k: l.k,
                cols: l.groups * l.n,
                bias: l.bias,
                no_split_k: false,
                out: outs[0],
            },
            OpKind::LinearDgrad(l) => Work::Matmul {
                a: slot(operands[0])?,
                b: operands[1],
                fresh: None,
                rows: l.m,
                k: l.n,
                cols: l.groups * l.k,
                bias: false,
                no_split_k: false,
                out: outs[0],
            },
            OpKind::LinearWgrad(l) => Work::Accum {
                x: slot(operands[0])?,
                dy: slot(operands[1])?,
                rows: l.m,
                k: l.k,
                cols: l.groups * l.n,
                out: outs[0],
                bias_out: if l.bias { one(1) } else { None },
            },
            OpKind::AttnScores(a) | OpKind::AttnContextGradP(a) => Work::Matmul {
                a: slot(operands[0])?,
                b: operands[1],
                fresh,
                rows: a.q_len,
                k: a.head_dim,
                cols: a.batch * a.heads * a.kv_len,
                bias: false,
                no_split_k: true,
                out: outs[0],
            },
            OpKind::AttnContext(a) | OpKind::AttnScoresGradQ(a) => Work::Matmul {
                a: slot(operands[0])?,
                b: operands[1],
                fresh,
                rows: a.q_len,
                k: a.kv_len,
                cols: a.batch * a.heads * a.head_dim,
                bias: false,
                no_split_k: true,
                out: outs[0],
            },
            OpKind::AttnScoresGradK(a) | OpKind::AttnContextGradV(a) => Work::Accum {
                x: slot(operands[0])?,
                dy: slot(operands[1])?,
                rows: a.q_len,
                k: a.kv_len,
                cols: a.batch * a.heads * a.head_dim,
                out: outs[0],
                bias_out: None,
            },
            OpKind::AttnSoftmax(a) => {
                rr(slot(operands[0])?, a.batch * a.heads * a.q_len, a.kv_len, fpe::SOFTMAX, one(0))
            }
            OpKind::AttnSoftmaxGrad(a) => {
                rr(slot(operands[1])?, a.batch * a.heads * a.q_len, a.kv_len, fpe::SOFTMAX_GRAD, one(0))
            }
            OpKind::Norm { kind, rows } => rr(
                slot(operands[0])?,
                rows.rows,
                rows.width,
                match kind {
                    NormKind::LayerNorm => fpe::LAYERNORM,
                    NormKind::RmsNorm => fpe::RMSNORM,
                },
                one(0),
            ),
            OpKind::NormGrad { kind, rows } => {
                // dgamma (and dbeta) leave together as one column-sum stream.
                if outs.len() > 2 {
                    let v = self.outputs[outs[2]].values;
                    self.outputs[outs[1]].values += v;
                    self.outputs.pop();
                }
                Work::RowReduce {
                    main: slot(operands[2])?,
                    rows: rows.rows,
                    width: rows.width,
                    per_elem: match kind {
                        NormKind::LayerNorm => fpe::LAYERNORM_GRAD,
                        NormKind::RmsNorm => fpe::RMSNORM_GRAD,
                    },
                    out: one(0),
                    colsum: one(1),
                    scalar: None,
                }
            }
            OpKind::CrossEntropy { rows, classes } => Work::RowReduce {
                main: slot(operands[0])?,
                rows,
                width: classes,
                per_elem: fpe::CROSS_ENTROPY,
                out: None,
                colsum: None,
                scalar: one(0),
            },
            OpKind::CrossEntropyGrad { rows, classes } => {
                rr(slot(operands[0])?, rows, classes, fpe::CROSS_ENTROPY_GRAD, one(0))
            }
            OpKind::MoeTopK(r) => rr(slot(operands[0])?, r.rows, r.experts, fpe::SOFTMAX + r.top_k, one(0)),
            OpKind::MoeTopKGrad(r) => rr(slot(operands[1])?, r.rows, r.experts, fpe::SOFTMAX_GRAD, one(0)),
            OpKind::Embedding { rows, width, .. } => {
                if self.mode == Mode::WeightStreaming {
                    // MemoryX looks the rows up and streams them in; the ids never enter the wafer.
                    self.slots.clear();
                    self.slot_of.clear();
                    self.slot_map.clear();
                    self.held.clear();
                    let t = op.inputs[1];
                    let s = self.new_slot(t, rows * width, SlotKind::Live);
                    self.slot_map.insert((0, 1, 0), s);
                    operands = vec![Operand::Internal, Operand::Slot(s)];
                    Work::Relay { main: s, rows, width }
                } else {
                    Work::Lookup { ids: slot(operands[0])?, rows, width, out: outs[0] }
                }
            }
            OpKind::EmbeddingGrad { rows, width, .. } => {
                Work::Elementwise { main: Some(slot(operands[1])?), rows, width, per_elem: 1, accumulate: true }
            }
            OpKind::Gelu(r) | OpKind::Tanh(r) => ew(first_slot, r.rows, r.width, per(r.rows, r.width)),
            // Joins: paced by the input that comes last (a gradient op's dy; its saved forward input
            // arrives a whole forward pass earlier and waits in the FIFO the tiling declares).
            OpKind::GeluGrad(r) | OpKind::TanhGrad(r) | OpKind::SwiGlu(r) | OpKind::SwiGluGrad(r) => {
                ew(late_slot, r.rows, r.width, per(r.rows, r.width))
            }
            OpKind::Add { rows, n } => {
                if self.single {
                    Work::SingleAdd { n: rows.rows * rows.width }
                } else {
                    ew(late_slot, rows.rows, rows.width, n - 1)
                }
            }
            OpKind::Rotary { rows, heads, rot_dims, .. } | OpKind::RotaryGrad { rows, heads, rot_dims, .. } => {
                ew(first_slot, rows, heads * rot_dims, fpe::ROTARY)
            }
            OpKind::TokenSelect { batch, width, .. } => ew(first_slot, batch, width, 0),
            // Its input is one row per sequence, which every output row of the sequence waits for: the
            // stage runs per sequence (rows of `seq * width`), never in token chunks of a sequence.
            OpKind::TokenSelectGrad { batch, seq, width, .. } => ew(first_slot, batch, seq * width, 0),
            OpKind::MoeDispatch(r) => ew(first_slot, r.active() * r.capacity(), r.width, 0),
            OpKind::MoeDispatchGrad(r) => ew(first_slot, r.rows, r.width, r.top_k - 1),
            OpKind::MoeCombine(r) => ew(first_slot, r.rows, r.width, 2 * r.top_k),
            OpKind::MoeCombineGrad(r) => ew(first_slot, r.rows, r.width, 3 * r.top_k),
            OpKind::Adam { params, .. } => {
                let shape = &g.tensor(op.inputs[0]).shape;
                let rows = shape.first().copied().unwrap_or(1).max(1);
                ew(first_slot, rows, params / rows, fpe::ADAM)
            }
            OpKind::KvCacheAppend { batch, new, width, .. } => ew(first_slot, batch * new, width, 0),
            OpKind::KvCacheRead { .. } | OpKind::Split { .. } | OpKind::SplitGrad { .. } => {
                return Err(CompileError::Internal(format!("{}: a view left unfused", op.name)))
            }
            OpKind::AllReduce { elems } => Work::AllReduce { elems },
        };
        let computed = work_flops(&work);
        if computed != flops {
            return Err(CompileError::Internal(format!(
                "{}: the stage's work counts {computed} FLOPs, the graph {flops}",
                op.name
            )));
        }
        Ok((work, operands, flops))
    }
}

/// FLOPs of a stage's work per iteration (must equal the graph's).
pub(crate) fn work_flops(w: &Work) -> u64 {
    match *w {
        Work::Matmul { rows, k, cols, bias, .. } => 2 * rows * k * cols + if bias { rows * cols } else { 0 },
        Work::Accum { rows, k, cols, bias_out, .. } => {
            2 * rows * k * cols + if bias_out.is_some() { rows * cols } else { 0 }
        }
        Work::RowReduce { rows, width, per_elem, .. } => rows * width * per_elem,
        Work::Elementwise { rows, width, per_elem, .. } => rows * width * per_elem,
        Work::Lookup { .. } | Work::Relay { .. } | Work::AllReduce { .. } => 0,
        Work::SingleGemv { k, n } => 2 * k * n,
        Work::SingleGemm { m, n, k } => 2 * m * n * k,
        Work::SingleAdd { n } => n,
    }
}

struct LinkCtx<'a> {
    g: &'a Graph,
    on_wafer: &'a [bool],
    producers: &'a [Option<OpId>],
    stage_of: &'a [Option<StageId>],
    fold: &'a Fold,
    instances: &'a [Vec<Vec<OpId>>],
    slot_maps: &'a [BTreeMap<(usize, usize, usize), usize>],
    mode: Mode,
}

impl LinkCtx<'_> {
    /// Connects producers to consumers: one stream per (source, destination slot), classified by the
    /// iterations it runs on; then the streams that leave the wafer and the optimizer's refreshes.
    fn link(
        &self,
        stages: &mut [Stage],
        streams: &mut Vec<Stream>,
        notes: &mut Vec<String>,
    ) -> Result<(), CompileError> {
        let g = self.g;
        let fold = self.fold;
        let layers = fold.layers;
        // Output slot of every main-op instance's output tensor.
        let mut out_slot: BTreeMap<TensorId, (StageId, usize)> = BTreeMap::new();
        for (sid, st) in stages.iter().enumerate() {
            if st.outputs.is_empty() {
                continue;
            }
            for inst in &self.instances[sid] {
                for (i, &t) in g.op(inst[0]).outputs.iter().enumerate() {
                    out_slot.insert(t, (sid, i.min(st.outputs.len().saturating_sub(1))));
                }
            }
        }
        // Per (dest stage, dest slot, source): the (source iteration, dest iteration) pairs.
        type Key = (StageId, usize, End);
        let mut pairs: BTreeMap<Key, Vec<(u32, u32)>> = BTreeMap::new();
        let mut names: BTreeMap<Key, String> = BTreeMap::new();
        let mut consumed: Vec<bool> = vec![false; g.tensors.len()];
        for (sid, insts) in self.instances.iter().enumerate() {
            for (it_c, inst) in insts.iter().enumerate() {
                let it_c = it_c as u32;
                for (pos, &o) in inst.iter().enumerate() {
                    for (j, &t0) in g.op(o).inputs.iter().enumerate() {
                        for (k, t) in resolve(g, self.producers, t0).into_iter().enumerate() {
                            let Some(&slot) = self.slot_maps[sid].get(&(pos, j, k)) else {
                                continue;
                            };
                            let from = match real_producer(g, self.producers, t) {
                                None => {
                                    let peer = match g.tensor(t).role {
                                        Role::Weight | Role::KvCache | Role::OptimizerState => PeerKind::MemoryX,
                                        _ => PeerKind::Host,
                                    };
                                    (End::Port(peer), 0)
                                }
                                Some(p) => {
                                    consumed[t.idx()] = true;
                                    let Some(ps) = self.stage_of[p.idx()] else { continue };
                                    let it_p0 = if stages[ps].lp == Loop::Once { 0 } else { fold.iter[p.idx()] };
                                    // Inside the stage (a fused op), unless it feeds the stage's next
                                    // iteration (a layer's output read by the same op of the next layer).
                                    if ps == sid && it_p0 == it_c {
                                        continue;
                                    }
                                    // A split output is a slice of the split's input.
                                    let src = match self.producers[t.idx()] {
                                        Some(q) if matches!(g.op(q).kind, OpKind::Split { .. }) => g.op(q).inputs[0],
                                        _ => t,
                                    };
                                    let Some(&(_, oslot)) = out_slot.get(&src) else {
                                        return Err(CompileError::Internal(format!(
                                            "{}: no output slot carries `{}`",
                                            stages[ps].name,
                                            g.tensor(src).name
                                        )));
                                    };
                                    let it_p = if stages[ps].lp == Loop::Once { 0 } else { fold.iter[p.idx()] };
                                    (End::Stage { stage: ps, slot: oslot }, it_p)
                                }
                            };
                            let key = (sid, slot, from.0);
                            pairs.entry(key).or_default().push((from.1, it_c));
                            names.entry(key).or_insert_with(|| g.tensor(t).name.clone());
                        }
                    }
                }
            }
        }
        for ((sid, slot, from), mut ps) in pairs {
            ps.sort();
            ps.dedup();
            let name = names[&(sid, slot, from)].clone();
            let (values, eb) = (stages[sid].inputs[slot].values, stages[sid].inputs[slot].elem_bytes);
            let dst_lp = stages[sid].lp;
            let src_lp = match from {
                End::Stage { stage, .. } => stages[stage].lp,
                End::Port(_) => Loop::Once,
            };
            let to = End::Stage { stage: sid, slot };
            if stages[sid].inputs[slot].kind == SlotKind::Weights {
                // The weights of each layer, once per iteration.
                streams.push(Stream {
                    name,
                    from,
                    to,
                    values,
                    elem_bytes: eb,
                    send_first: 0,
                    send_count: stages[sid].iters,
                });
                continue;
            }
            let it_src: Vec<u32> = ps.iter().map(|p| p.0).collect();
            let contiguous = |v: &[u32]| v.windows(2).all(|w| w[1] == w[0] + 1);
            let (send_first, send_count, ahead) = match (src_lp, dst_lp) {
                _ if src_lp == dst_lp && ps.iter().all(|p| p.0 == p.1) && contiguous(&it_src) => {
                    (it_src[0], it_src.len() as u32, false)
                }
                _ if src_lp == dst_lp && ps.iter().all(|p| p.1 == p.0 + 1) && contiguous(&it_src) => {
                    (it_src[0], it_src.len() as u32, false)
                }
                // From outside the loop: live in the loop's first iteration, else kept until used.
                (Loop::Once, _) if ps.len() == 1 => (0, 1, ps[0].1 != 0),
                (_, Loop::Once) if ps.len() == 1 => (ps[0].0, 1, false),
                (Loop::Fwd, Loop::Bwd) if contiguous(&it_src) => (it_src[0], it_src.len() as u32, true),
                _ => {
                    return Err(CompileError::Unsupported(format!(
                        "cannot fold the stream of `{name}` into `{}`: its iterations {ps:?} fit no loop pattern",
                        stages[sid].name
                    )))
                }
            };
            // Saved for the backward pass: stored whole (pipelined: per run; folded: the whole step).
            let src_pass = match from {
                End::Stage { stage, .. } => stages[stage].pass,
                End::Port(_) => Pass::Forward,
            };
            let saved = self.mode == Mode::Pipelined
                && src_pass == Pass::Forward
                && matches!(stages[sid].pass, Pass::Backward | Pass::Recompute)
                && matches!(from, End::Stage { .. });
            let s = &mut stages[sid].inputs[slot];
            if ahead || saved {
                s.kind = SlotKind::Stored { all: ahead && layers > 1 };
            }
            streams.push(Stream { name, from, to, values, elem_bytes: eb, send_first, send_count });
        }
        // Attention's stationary operand streamed from a producer must be whole before the compute.
        for st in stages.iter_mut() {
            if let Work::Matmul { b: Operand::Slot(b), no_split_k: true, .. } = st.work {
                if st.inputs[b].kind == SlotKind::Live {
                    st.inputs[b].kind = SlotKind::Stored { all: false };
                }
            }
        }
        // Outputs leaving the wafer: graph outputs not updated in place, and (weight streaming) weight
        // gradients for the optimizer in MemoryX.
        let out_set: std::collections::BTreeSet<TensorId> = g.outputs.iter().copied().collect();
        let mut seen: std::collections::BTreeSet<(StageId, usize)> = std::collections::BTreeSet::new();
        for (&t, &(sid, oslot)) in &out_slot {
            let tt = g.tensor(t);
            let st = &stages[sid];
            let grad = self.mode == Mode::WeightStreaming && tt.role == Role::WeightGrad && !consumed[t.idx()];
            let leaves = out_set.contains(&t) && tt.updates.is_none() && tt.role != Role::KvCache;
            // Read by an op that runs in MemoryX (an embedding gradient's rows).
            let to_mx = tt.role != Role::WeightGrad
                && g.op_ids().any(|o| {
                    !self.on_wafer[o.idx()]
                        && g.op(o).inputs.contains(&t)
                        && !matches!(g.op(o).kind, OpKind::Split { .. } | OpKind::SplitGrad { .. })
                });
            if !(grad || leaves || to_mx) || seen.contains(&(sid, oslot)) {
                continue;
            }
            seen.insert((sid, oslot));
            let it = self.producers[t.idx()].map_or(0, |p| if st.lp == Loop::Once { 0 } else { fold.iter[p.idx()] });
            let (peer, first, count) = if grad {
                (PeerKind::SwarmX, 0, st.iters)
            } else if to_mx {
                (PeerKind::MemoryX, 0, st.iters)
            } else {
                (PeerKind::Host, it, 1)
            };
            streams.push(Stream {
                name: tt.name.clone(),
                from: End::Stage { stage: sid, slot: oslot },
                to: End::Port(peer),
                values: st.outputs[oslot].values,
                elem_bytes: st.outputs[oslot].elem_bytes,
                send_first: first,
                send_count: count,
            });
        }
        // Pipelined training: the optimizer's updated weight refreshes the other resident copies.
        if self.mode == Mode::Pipelined {
            let mut refresh = Vec::new();
            for (sid, st) in stages.iter().enumerate() {
                let op = g.op(st.main);
                if !matches!(op.kind, OpKind::Adam { .. }) {
                    continue;
                }
                let w = op.inputs[0];
                let wname = g.tensor(w).name.clone();
                for (hid, h) in stages.iter().enumerate() {
                    if hid != sid && h.held.iter().any(|x| x.name == wname && x.kind == HeldKind::Weight) {
                        refresh.push((sid, hid, w, wname.clone(), g.tensor(w).elems(), elem_bytes(g, w)));
                    }
                }
            }
            if !refresh.is_empty() {
                notes.push(
                    "Adam runs on the wafer; each updated weight refreshes the copies its forward and backward stages hold"
                        .into(),
                );
            }
            for (sid, hid, w, name, values, eb) in refresh {
                let slot = stages[hid].inputs.len();
                stages[hid].inputs.push(Slot { tensor: w, values, elem_bytes: eb, kind: SlotKind::Refresh });
                streams.push(Stream {
                    name: format!("{name}'"),
                    from: End::Stage { stage: sid, slot: 0 },
                    to: End::Stage { stage: hid, slot },
                    values,
                    elem_bytes: eb,
                    send_first: 0,
                    send_count: 1,
                });
            }
        }
        // Weight streaming: the KV caches of every layer stay resident in their stage.
        if layers > 1 {
            for st in stages.iter_mut() {
                if st.lp != Loop::Once {
                    for h in st.held.iter_mut() {
                        if h.kind == HeldKind::KvCache {
                            h.copies = layers as u64;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
