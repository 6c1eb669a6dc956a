//! Lowering: the stages of each wafer placed, their IO assigned to channels, their streams routed on
//! colors, and every region's program assembled into the flat `mesh::MeshProgram`.

use std::collections::BTreeMap;

use crate::graph::{Graph, Role};
use crate::hw::WaferHw;
use crate::mesh::data::{self as data_t, Kernel, ProgramData, Readout, TaskData};
use crate::mesh::{
    self, ColorId, Coord, MeshProgram, Need, Pattern, Peer, Port, PortId, Rect, Region, RegionId, Route, RunRange,
    Senders, Task, TaskIdx, Template, TemplateId, Tile, Timing, PROGRAM_VERSION,
};
use crate::report::{PlanPort, PlanRegion, PlanStream, PlanSummary, ProgramStats};

use super::data;
use super::io::{self, Channel};
use super::kernel::{self, wl, Dest, Feed, Iface, KCtx, OutIface, StageIo};
use super::place::{self, Placement};
use super::route::{self, ColorBook, Hop};
use super::stage::{self, End, Loop, PeerKind, SlotKind, Stage, Stream, Work};
use super::{CompileError, CompileOptions, Compiled, Mode};

/// The data SRAM and limits the kernels work with.
pub(crate) fn kctx(hw: &WaferHw) -> KCtx {
    KCtx {
        pe: hw.pe,
        colors: hw.fabric.colors,
        avail: hw.pe.sram_bytes - hw.pe.code_reserve_bytes,
        hop_cycles: hw.fabric.hop_cycles as u64,
    }
}

/// Compiles in the requested mode, or pipelined with weight streaming as the fallback.
pub(crate) fn compile_all(
    g: &Graph,
    hw: &WaferHw,
    opts: &CompileOptions,
    single: bool,
) -> Result<Compiled, CompileError> {
    let weights: u64 = g.tensors.iter().filter(|t| t.role == Role::Weight).map(|t| t.bytes).sum();
    let has = |r: Role| g.tensors.iter().any(|t| t.role == r);
    let resident_what =
        [(Role::Weight, "weights"), (Role::OptimizerState, "optimizer state"), (Role::KvCache, "KV cache")]
            .iter()
            .filter(|(r, _)| has(*r))
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(", ");
    let sram = hw.mesh.pes() * (hw.pe.sram_bytes - hw.pe.code_reserve_bytes) * opts.wafers as u64;
    // What pipelined mode keeps in SRAM before any activation: when it alone overflows, go straight
    // to weight streaming.
    // (Tensors no op produces: the optimizer's updated copies overwrite them in place.)
    let mut produced = vec![false; g.tensors.len()];
    for o in g.op_ids() {
        for &t in &g.op(o).outputs {
            produced[t.idx()] = true;
        }
    }
    let resident: u64 = g
        .tensors
        .iter()
        .enumerate()
        .filter(|(i, t)| !produced[*i] && matches!(t.role, Role::Weight | Role::OptimizerState | Role::KvCache))
        .map(|(_, t)| t.bytes)
        .sum();
    match (opts.mode, single) {
        (Some(Mode::WeightStreaming), true) => Err(CompileError::Unsupported(
            "--mode weight-streaming: a single-op workload runs resident, its operands pre-placed in SRAM".into(),
        )),
        (_, true) => attempt(
            g,
            hw,
            opts,
            Mode::Pipelined,
            true,
            "single op: operands pre-placed in SRAM, as published per-op benchmarks measure them".into(),
        ),
        (Some(m), false) => attempt(g, hw, opts, m, false, "chosen with --mode".into()),
        (None, false) if resident > sram && opts.wafers == 1 => attempt(
            g,
            hw,
            opts,
            Mode::WeightStreaming,
            false,
            format!(
                "the resident state ({}: {}) exceeds the data SRAM ({})",
                resident_what,
                crate::report::fmt::human(resident as f64, "B"),
                crate::report::fmt::human(sram as f64, "B")
            ),
        ),
        (None, false) => {
            let why = format!(
                "every layer fits in SRAM at once (weights {} of {} data SRAM)",
                crate::report::fmt::human(weights as f64, "B"),
                crate::report::fmt::human(sram as f64, "B")
            );
            match attempt(g, hw, opts, Mode::Pipelined, false, why) {
                Ok(c) => Ok(c),
                Err(e) if e.is_user_error() && opts.wafers == 1 && !matches!(e, CompileError::Unsupported(_)) => {
                    let short = e.to_string();
                    let short = short.split(';').next().unwrap_or(&short).to_string();
                    attempt(
                        g,
                        hw,
                        opts,
                        Mode::WeightStreaming,
                        false,
                        format!("the model does not fit pipelined ({short})"),
                    )
                }
                Err(e) => Err(e),
            }
        }
    }
}

fn attempt(
    g: &Graph,
    hw: &WaferHw,
    opts: &CompileOptions,
    mode: Mode,
    single: bool,
    reason: String,
) -> Result<Compiled, CompileError> {
    attempt_mode(g, hw, opts, mode, single, reason).map_err(|e| match mode {
        // A single op has only its mesh and its SRAM.
        _ if single => e.rehint(crate::compile::place::HINT, SINGLE_HINT),
        // Already streaming weights: the way out is a bigger mesh or less data per step.
        Mode::WeightStreaming => e.rehint(crate::compile::place::HINT, WS_HINT),
        Mode::Pipelined => e,
    })
}

pub(crate) const WS_HINT: &str = "use a larger --mesh, a smaller batch or sequence, or more SRAM per PE";
const SINGLE_HINT: &str = "use a larger --mesh, a smaller op, or more SRAM per PE (--set pe.sram_bytes=...)";

fn attempt_mode(
    g: &Graph,
    hw: &WaferHw,
    opts: &CompileOptions,
    mode: Mode,
    single: bool,
    reason: String,
) -> Result<Compiled, CompileError> {
    let st = stage::build(g, mode, single)?;
    let k = kctx(hw);
    let wafers = opts.wafers.max(1);
    // Stages per wafer: layers split evenly, ops before the first layer on wafer 0, after the last on K-1.
    let layers = g.op_ids().filter_map(|o| g.op(o).layer).max().map_or(0, |l| l + 1);
    if wafers > 1 && layers < wafers {
        return Err(CompileError::Unsupported(format!(
            "--wafers {wafers}: the model has only {layers} layers to split"
        )));
    }
    // Weight-streaming training runs in two phases on the whole wafer: the forward pass, then the
    // backward pass; data that crosses goes out to MemoryX and comes back.
    let phased = mode == Mode::WeightStreaming && g.workload.phase == crate::model::Phase::Train && wafers == 1;
    let mut seen_layer = false;
    let group_of: Vec<u32> = st
        .stages
        .iter()
        .map(|s| {
            if phased {
                return match (s.lp, s.pass) {
                    (Loop::Fwd, _) | (Loop::Once, crate::graph::Pass::Forward) => 0,
                    _ => 1,
                };
            }
            match s.layer {
                Some(l) => {
                    seen_layer = true;
                    l * wafers / layers.max(1)
                }
                None if seen_layer => wafers - 1,
                None => 0,
            }
        })
        .collect();
    let mut group_of = group_of;
    let mut groups = if phased { 2 } else { wafers };
    let mut outs = Vec::new();
    let mut w = 0;
    while w < groups {
        let local: Vec<usize> = (0..st.stages.len()).filter(|&i| group_of[i] == w).collect();
        let map: BTreeMap<usize, usize> = local.iter().enumerate().map(|(i, &s)| (s, i)).collect();
        let mut stages: Vec<Stage> = local.iter().map(|&i| st.stages[i].clone()).collect();
        let mut streams = Vec::new();
        for (gi, s) in st.streams.iter().enumerate() {
            let remap = |e: End| -> End {
                match e {
                    End::Stage { stage, slot } => match map.get(&stage) {
                        Some(&l) => End::Stage { stage: l, slot },
                        None if phased => End::Port(PeerKind::MemoryX),
                        None => End::Port(PeerKind::Wafer(group_of[stage])),
                    },
                    End::Port(p) => End::Port(p),
                }
            };
            let (from, to) = (remap(s.from), remap(s.to));
            if matches!((from, to), (End::Port(_), End::Port(_))) {
                continue;
            }
            let mut s2 = s.clone();
            let crossing = phased
                && (matches!(s.from, End::Stage { stage, .. } if !map.contains_key(&stage))
                    || matches!(s.to, End::Stage { stage, .. } if !map.contains_key(&stage)));
            if crossing {
                if let End::Stage { stage, slot } = to {
                    // Restored from MemoryX, one iteration's data per iteration of the consumer.
                    s2.name = format!("{} (restored)", s.name);
                    s2.send_first = 0;
                    if stages[stage].inputs[slot].kind == (SlotKind::Stored { all: true }) {
                        stages[stage].inputs[slot].kind = SlotKind::Live;
                    }
                } else {
                    s2.name = format!("{} (saved)", s.name);
                }
            }
            s2.from = from;
            s2.to = to;
            streams.push((gi, s2));
        }
        let (wafer, phase) = if phased { (0, w) } else { (w, 0) };
        let cut = LoopCut::new(st.layers, opts.layer_iters);
        // Weights spread over every channel need a color at every router their trains cross; where
        // they run short (a model too short to fold, whose every stream spreads at once), the weights
        // come through the channels on their regions' rows, with less bandwidth: a warning says how much.
        let out = match compile_wafer(g, hw, &k, mode, wafer, phase, stages.clone(), streams.clone(), cut, true) {
            Err(CompileError::Colors { stream, .. }) => {
                let mut o = compile_wafer(g, hw, &k, mode, wafer, phase, stages, streams, cut, false)?;
                let w = rows_only_warning(hw, &o.ports, &stream, phased.then_some((phase, groups)))?;
                o.notes.push(w);
                Ok(o)
            }
            r => r,
        };
        let out = match out {
            // The backward pass does not fit the wafer at once: the once-stages before its layer loop
            // (the model's head: loss gradient, LM head gradients, final norm gradient) take the whole
            // wafer in a phase of their own, as weight streaming runs any layer, and the loop follows in a
            // third phase; what crosses (the head's input gradient) goes out to MemoryX and comes back.
            Err(e) if phased && groups == 2 && w == 1 && fits_error(&e) => match split_head(&st.stages, &group_of) {
                Some(split) => {
                    group_of = split;
                    groups = 3;
                    continue;
                }
                None => return Err(e),
            },
            Err(e) if groups == 3 && w == 2 => return Err(after_split(e)),
            r => r?,
        };
        outs.push(out);
        w += 1;
    }
    // Link the ports of streams that cross wafers.
    let mut cross: BTreeMap<usize, Vec<(u32, PortId, bool)>> = BTreeMap::new();
    for (w, o) in outs.iter().enumerate().filter(|_| !phased) {
        for &(gi, pid, outgoing) in &o.cross {
            cross.entry(gi).or_default().push((w as u32, pid, outgoing));
        }
    }
    for ends in cross.values() {
        if let (Some(&(wa, pa, _)), Some(&(wb, pb, _))) = (ends.iter().find(|e| e.2), ends.iter().find(|e| !e.2)) {
            outs[wa as usize].program.ports[pa.0 as usize].peer_port = Some(pb);
            outs[wa as usize].program.ports[pa.0 as usize].peer = Peer::Wafer(wb);
            // The receiving port names no peer port: nothing goes back through it.
            outs[wb as usize].program.ports[pb.0 as usize].peer = Peer::Wafer(wa);
        }
    }
    let mut notes = st.notes.clone();
    for o in &outs {
        notes.extend(o.notes.iter().cloned());
    }
    notes.dedup();
    let workload = workload_text(&g.workload, single);
    let mut program = ProgramStats::default();
    for o in &outs {
        let p = &o.program;
        program.templates += p.templates.len() as u64;
        program.tiles += p.tiles.len() as u64;
        program.routes += p.routes.len() as u64;
        program.ports += p.ports.len() as u64;
        program.tasks += p.templates.iter().map(|t| t.tasks.len() as u64).sum::<u64>();
    }
    let plan = PlanSummary {
        model: g.model.clone(),
        workload,
        hardware: hw.name.clone(),
        mesh_width: hw.mesh.width,
        mesh_height: hw.mesh.height,
        mode: mode.name().into(),
        mode_reason: reason,
        wafers,
        phases: if phased { groups } else { 1 },
        micro_batches: 1,
        layers_folded: st.layers,
        bands: outs.iter().map(|o| o.bands).max().unwrap_or(1),
        wafer_flops: outs.iter().map(|o| o.program.graph_flops).sum(),
        offload_flops: st.offload_flops,
        regions: outs.iter().flat_map(|o| o.regions.clone()).collect(),
        streams: outs.iter().flat_map(|o| o.streams.clone()).collect(),
        ports: outs.iter().flat_map(|o| o.ports.clone()).collect(),
        notes,
        program,
    };
    Ok(Compiled {
        plan,
        programs: outs.into_iter().map(|o| o.program).collect(),
        layout: if phased {
            super::Layout::Phases
        } else if wafers > 1 {
            super::Layout::Wafers
        } else {
            super::Layout::Single
        },
        micro_batches: 1,
    })
}

/// A failure to fit the wafer (SRAM, mesh size), which a phase with fewer stages may not have.
fn fits_error(e: &CompileError) -> bool {
    matches!(e, CompileError::Sram { .. } | CompileError::MeshTooSmall { .. })
}

/// A failure to fit the backward layer loop's phase says that the head's backward already has its own.
fn after_split(e: CompileError) -> CompileError {
    const WHERE: &str =
        "the backward layer loop's phase, the head's backward already split off into a phase of its own";
    match e {
        CompileError::Sram { op, class, needed, available, sram, reserve, hint } => {
            CompileError::Sram { op, class: format!("{class}; in {WHERE}"), needed, available, sram, reserve, hint }
        }
        CompileError::MeshTooSmall { what, hint } => {
            CompileError::MeshTooSmall { what: format!("{WHERE}: {what}"), hint }
        }
        e => e,
    }
}

/// The groups of a weight-streaming training step with its backward phase (group 1) split in two: the
/// once-stages before the backward layer loop stay in group 1, the loop and everything after it go to
/// group 2. None when either part would be empty (nothing to gain from splitting).
fn split_head(stages: &[Stage], group_of: &[u32]) -> Option<Vec<u32>> {
    let first_loop = stages.iter().zip(group_of).position(|(s, &g)| g == 1 && s.lp != Loop::Once)?;
    let head = (0..first_loop).any(|i| group_of[i] == 1);
    head.then(|| (0..stages.len()).map(|i| if group_of[i] == 1 && i >= first_loop { 2 } else { group_of[i] }).collect())
}

/// The plan's one-line description of a workload.
pub(crate) fn workload_text(w: &crate::model::Workload, single: bool) -> String {
    match w.phase {
        crate::model::Phase::Decode => {
            format!("decode: batch {} x 1 new token, KV cache {} tokens, {}", w.batch, w.context, w.dtype)
        }
        _ if single => format!("one op, {}", w.dtype),
        p => format!("{}: batch {} x seq {} = {} tokens, {}", p.name(), w.batch, w.seq, w.tokens(), w.dtype),
    }
}

struct WaferOut {
    program: MeshProgram,
    regions: Vec<PlanRegion>,
    streams: Vec<PlanStream>,
    ports: Vec<PlanPort>,
    notes: Vec<String>,
    bands: u32,
    /// (global stream, port, outgoing) for streams that cross wafers.
    cross: Vec<(usize, PortId, bool)>,
}

/// The facts tiling needs about every stage's streams.
fn stage_ios(stages: &[Stage], streams: &[(usize, Stream)]) -> Vec<StageIo> {
    stages
        .iter()
        .enumerate()
        .map(|(sid, st)| {
            let mut io = StageIo {
                gathered: vec![false; st.outputs.len()],
                stored_copies: vec![1; st.inputs.len()],
                ..Default::default()
            };
            for s in &st.inputs {
                if matches!(s.kind, SlotKind::Live | SlotKind::Stored { .. }) {
                    io.per_iter_values.push((s.values, s.elem_bytes));
                }
            }
            for (o, out) in st.outputs.iter().enumerate() {
                if kernel::per_run_output(st, o) {
                    io.per_iter_values.push((out.values, out.elem_bytes));
                }
            }
            for (_, s) in streams {
                if let End::Stage { stage, slot } = s.from {
                    if stage == sid {
                        io.gathered[slot] = true;
                        if kernel::per_run_output(st, slot) {
                            io.per_iter_values.push((s.values, s.elem_bytes));
                        }
                    }
                }
                if let End::Stage { stage, slot } = s.to {
                    if stage == sid {
                        match st.inputs[slot].kind {
                            SlotKind::Stored { all: true } => {
                                let c = &mut io.stored_copies[slot];
                                *c = if *c == 1 { s.send_count as u64 } else { *c + s.send_count as u64 };
                            }
                            SlotKind::Live | SlotKind::Stored { .. } => {
                                io.per_iter_values.push((s.values, s.elem_bytes))
                            }
                            _ => {}
                        }
                    }
                }
            }
            io
        })
        .collect()
}

/// Merges the MemoryX streams into one input slot: one stream of every iteration's data, in the
/// order the slot consumes them.
fn merge_memoryx_feeds(streams: &mut Vec<(usize, Stream)>) {
    let mut first: BTreeMap<End, usize> = BTreeMap::new();
    let mut out: Vec<(usize, Stream)> = Vec::new();
    for (gi, s) in streams.drain(..) {
        let mergeable = matches!(s.from, End::Port(PeerKind::MemoryX)) && s.name.ends_with("(restored)");
        if mergeable {
            if let Some(&i) = first.get(&s.to) {
                if out[i].1.values == s.values && out[i].1.elem_bytes == s.elem_bytes {
                    out[i].1.send_count += s.send_count;
                    continue;
                }
            }
            first.insert(s.to, out.len());
        }
        out.push((gi, s));
    }
    *streams = out;
}

/// Moves data saved for a later loop off the wafer: the sender streams it to MemoryX, which sends it
/// back when the consumer's iteration needs it.
fn offload_stash(stages: &mut [Stage], streams: &mut Vec<(usize, Stream)>) -> u64 {
    let mut bytes = 0;
    let mut out = Vec::new();
    for (gi, s) in streams.drain(..) {
        let stash = match s.to {
            End::Stage { stage, slot } => matches!(stages[stage].inputs[slot].kind, SlotKind::Stored { all: true }),
            _ => false,
        };
        if !stash || !matches!(s.from, End::Stage { .. }) {
            out.push((gi, s));
            continue;
        }
        bytes += s.bytes_per_step();
        let mut to_mx = s.clone();
        to_mx.to = End::Port(PeerKind::MemoryX);
        to_mx.name = format!("{} (saved)", s.name);
        let mut back = s.clone();
        back.from = End::Port(PeerKind::MemoryX);
        back.name = format!("{} (restored)", s.name);
        back.send_first = 0;
        out.push((usize::MAX - gi, to_mx));
        out.push((gi, back));
    }
    for st in stages.iter_mut() {
        for sl in st.inputs.iter_mut() {
            if sl.kind == (SlotKind::Stored { all: true }) {
                sl.kind = SlotKind::Live;
            }
        }
    }
    *streams = out;
    bytes
}

/// A flow to route: who sends, the pattern, and what it is for.
struct Flow {
    name: String,
    sender: Senders,
    start: Coord,
    rx0: u8,
    pattern: Pattern,
}

#[derive(Default)]
struct PortWork {
    tasks: Vec<Task>,
    /// The data side table of each task, and why values cannot pass (if so).
    data: Vec<TaskData>,
    unsupported: Vec<String>,
    readouts: Vec<Readout>,
    streams: Vec<String>,
    bytes: u64,
    peer: Option<Peer>,
    /// The loop iterations (first, count) each send task streams, by task index.
    send_iters: BTreeMap<usize, (u32, u32)>,
}

/// A MemoryX port streams the tensors of a layer loop in turn, layer by layer: its send tasks with the
/// same repeat over the same loop iterations (one run per layer) alternate, run n of each after run n of
/// the one before it and the first after run n - 1 of the last. (Equal repeats over other iterations,
/// say every layer's stream and all but one layer's at two runs each, are not one layer's tensors.) Without this the task picker (lowest ready index) would stream
/// one tensor for every layer before the next tensor of the first layer, which only works if the
/// fabric buffers whole layers of weights: with finite router queues the port stalls on a tensor the
/// wafer cannot take yet while the tensor it waits for is queued behind it (a deadlock).
fn interleave_layer_streams(tasks: &mut [Task], iters: &BTreeMap<usize, (u32, u32)>) {
    // Key: the repeat and the iterations (first, count) it covers.
    type Key = (u32, Option<(u32, u32)>);
    let mut groups: BTreeMap<Key, Vec<usize>> = BTreeMap::new();
    for (i, t) in tasks.iter().enumerate() {
        if t.repeat > 1 && t.needs.is_empty() && t.name.starts_with("send:") {
            groups.entry((t.repeat, iters.get(&i).copied())).or_default().push(i);
        }
    }
    for idx in groups.values().filter(|g| g.len() > 1) {
        for (j, &i) in idx.iter().enumerate() {
            let (prev, first) = if j == 0 { (idx[idx.len() - 1], 0) } else { (idx[j - 1], 1) };
            tasks[i].needs.push(Need::After { task: TaskIdx(prev as u32), first, num: 1, den: 1 });
        }
    }
}

/// The warning of a wafer (or phase) whose weights, spread over every IO channel, ran out of router
/// colors on `stream` and come through the channels on their regions' rows instead: how many channels
/// carry weights from MemoryX then, the bandwidth the others leave unused, and how far the most loaded
/// channel is above an even share of the weights over all of them (the factor by which the weights'
/// stream time grows, when it is IO-bound). Notes starting with `warning: ` are also printed on stderr.
fn rows_only_warning(
    hw: &WaferHw,
    ports: &[PlanPort],
    stream: &str,
    phase: Option<(u32, u32)>,
) -> Result<String, CompileError> {
    use crate::report::fmt::human;
    let all = io::channels(hw)?;
    let total: f64 = all.iter().map(|c| c.bytes_per_s(hw.clock_hz)).sum();
    let used: Vec<&PlanPort> = ports.iter().filter(|p| p.peer == "memoryx" && p.bytes > 0).collect();
    let rate: f64 = used.iter().map(|p| p.bytes_per_s).sum();
    let bytes: u64 = used.iter().map(|p| p.bytes).sum();
    let most = used.iter().map(|p| p.bytes).max().unwrap_or(0);
    let even = bytes as f64 / all.len().max(1) as f64;
    let phase = phase.map_or(String::new(), |(i, n)| format!(" ({} phase)", super::phase_name(i as usize, n as usize)));
    Ok(format!(
        "warning: weights spread over every IO channel ran out of router colors{phase} (stream `{stream}`): they \
         come through the channels on their regions' rows only, {} of the {} channels ({}/s of {}/s; {} channels \
         and {}/s lost), the most loaded carrying {} per step from MemoryX, {:.2}x an even share over all channels",
        used.len(),
        all.len(),
        human(rate, "B"),
        human(total, "B"),
        all.len().saturating_sub(used.len()),
        human((total - rate).max(0.0), "B"),
        human(most as f64, "B"),
        if even > 0.0 { most as f64 / even } else { 0.0 }
    ))
}

/// The folded layer loop emitted for fewer iterations than the model has layers (`layer_iters`): the
/// first `keep - 1` iterations and the last (`full - 1`, relabelled `keep - 1`). Only what the program
/// emits is cut (task repeats, stream runs, FLOPs); every decision (placement, tiling, IO channels,
/// routes) is taken on the whole loop, so the cut program is the whole program with a shorter loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoopCut {
    full: u32,
    keep: u32,
}

impl LoopCut {
    fn new(full: u32, keep: Option<u32>) -> LoopCut {
        LoopCut { full, keep: keep.map_or(full, |k| k.clamp(2.min(full), full)) }
    }
    /// Iterations emitted of a stage that runs `iters` times (1 outside the loop).
    pub(crate) fn iters(&self, iters: u32) -> u32 {
        if iters == self.full {
            self.keep
        } else {
            iters
        }
    }
    /// The emitted iterations `first..first + count` of the loop's `first..first + count`.
    fn range(&self, name: &str, first: u32, count: u32) -> Result<(u32, u32), CompileError> {
        if self.keep == self.full {
            return Ok((first, count));
        }
        let end = first + count;
        if end > self.full {
            return Err(CompileError::Unsupported(format!(
                "stream `{name}` sends {count} times from iteration {first}, past the loop's {} iterations: the \
                 loop cannot be cut",
                self.full
            )));
        }
        let head = self.keep - 1;
        let kept_head = end.min(head).saturating_sub(first);
        let last = first < self.full && self.full - 1 < end;
        let count2 = kept_head + last as u32;
        if count2 == 0 {
            return Err(CompileError::Unsupported(format!(
                "stream `{name}` sends only in iterations {first}..{end}, which a loop cut to {} iterations leaves out",
                self.keep
            )));
        }
        Ok((if first < head { first } else { head }, count2))
    }
}

#[allow(clippy::too_many_arguments)]
fn compile_wafer(
    g: &Graph,
    hw: &WaferHw,
    k: &KCtx,
    mode: Mode,
    wafer: u32,
    phase: u32,
    mut stages: Vec<Stage>,
    mut streams: Vec<(usize, Stream)>,
    cut: LoopCut,
    spread: bool,
) -> Result<WaferOut, CompileError> {
    let mesh = hw.mesh;
    let mut notes = Vec::new();
    // Data restored from MemoryX into one slot comes as one stream (MemoryX holds all of it).
    merge_memoryx_feeds(&mut streams);
    let mut ios = stage_ios(&stages, &streams);
    // IO channels first: band boundaries follow their rows.
    let needs_io = streams.iter().any(|(_, s)| matches!(s.from, End::Port(_)) || matches!(s.to, End::Port(_)));
    let chans: Vec<Channel> = if needs_io { io::channels(hw)? } else { Vec::new() };
    let mut align: Vec<u32> = chans
        .iter()
        .filter(|c| matches!(c.side, crate::mesh::Dir::West | crate::mesh::Dir::East))
        .map(|c| c.at.y)
        .collect();
    align.sort();
    align.dedup();
    let placement: Placement = match place::place(&stages, &ios, mesh, k, &align) {
        Ok(p) => p,
        Err(e)
            if mode == Mode::WeightStreaming
                && e.is_user_error()
                && stages.iter().any(|s| s.inputs.iter().any(|i| i.kind == (SlotKind::Stored { all: true }))) =>
        {
            let bytes = offload_stash(&mut stages, &mut streams);
            notes.push(format!(
                "activations saved for the backward pass ({}) do not fit on the wafer: they leave to MemoryX through \
                 the IO ports and come back, last layer first, when the backward pass needs them",
                crate::report::fmt::human(bytes as f64, "B")
            ));
            ios = stage_ios(&stages, &streams);
            place::place(&stages, &ios, mesh, k, &align)?
        }
        Err(e) => return Err(e),
    };
    let rects = placement.rects.clone();
    let tilings = placement.tilings.clone();

    // IO channel assignment.
    let mut load = vec![0u64; chans.len()];
    let mut nflows = vec![0u32; chans.len()];
    // Channels used by each wafer peer (a channel serves one peer).
    let mut peer_of: Vec<Option<Peer>> = vec![None; chans.len()];
    // Proportional band counts for the big off-wafer streams (weights in, gradients out).
    let big: u64 = streams.iter().filter(|(_, s)| is_big(&stages, s)).map(|(_, s)| s.bytes_per_step()).sum();
    let gateway = |sid: usize, slot: usize| -> Coord { Coord { x: rects[sid].x + slot as u32, y: rects[sid].y } };
    let mut ifaces: Vec<Iface> = stages
        .iter()
        .enumerate()
        .map(|(sid, st)| Iface {
            feeds: vec![Vec::new(); st.inputs.len()],
            wbands: Vec::new(),
            wband_rows: false,
            wslot: None,
            outs: st
                .outputs
                .iter()
                .enumerate()
                .map(|(o, _)| OutIface {
                    gathered: ios[sid].gathered[o],
                    bands: vec![(0, rects[sid].w)],
                    dests: Vec::new(),
                })
                .collect(),
        })
        .collect();
    let mut flows: Vec<(Flow, FlowUse)> = Vec::new();
    let mut port_work: BTreeMap<usize, PortWork> = BTreeMap::new();
    let mut cross = Vec::new();
    let mut plan_streams = Vec::new();
    let mut io_bytes = vec![0u64; stages.len()];
    // Data saved to MemoryX comes back through the channel it left by.
    let mut restore_ch: BTreeMap<usize, usize> = BTreeMap::new();
    // Fan-out becomes a daisy chain: the same data to several stages goes to the first, whose input
    // gateway forwards it to the next, and so on (short hops instead of parallel long flows).
    let mut chain_prev: Vec<Option<usize>> = vec![None; streams.len()];
    {
        let mut groups: BTreeMap<(End, u32, u32, u64, String), Vec<usize>> = BTreeMap::new();
        for (i, (_, s)) in streams.iter().enumerate() {
            if let (End::Stage { .. }, End::Stage { .. }) = (s.from, s.to) {
                groups.entry((s.from, s.send_first, s.send_count, s.values, s.name.clone())).or_default().push(i);
            }
        }
        for v in groups.values_mut() {
            v.sort_by_key(|&i| match streams[i].1.to {
                End::Stage { stage, slot } => (stage, slot),
                _ => (usize::MAX, 0),
            });
            for w in v.windows(2) {
                chain_prev[w[1]] = Some(w[0]);
            }
        }
    }
    // The data table's folded loops: per stage of a loop, the tensors of each iteration it emits.
    let mut loops: Vec<data_t::LoopMap> = Vec::new();
    let mut loop_of: Vec<Option<u32>> = vec![None; stages.len()];
    let mut loop_bad: Vec<String> = Vec::new();
    for (sid, st) in stages.iter().enumerate() {
        if st.iters <= 1 {
            continue;
        }
        let n = cut.iters(st.iters);
        let its: Vec<u32> = if n == st.iters { (0..n).collect() } else { (0..n - 1).chain([st.iters - 1]).collect() };
        match data::loop_map(g, st, &its) {
            Ok(m) => {
                loop_of[sid] = Some(loops.len() as u32);
                loops.push(m);
            }
            Err(e) => loop_bad.push(e),
        }
    }
    // The weights of the layer loop come through every IO channel, not only those on their region's
    // rows: MemoryX streams each layer to the whole wafer at the system's IO rate, and every region of
    // the layer takes its weights at once, so each weight stream gets a share of the channels in
    // proportion to its bytes (`io::apportion`). The weight streams outside the loop (the head, run
    // once) share every channel among themselves in the same way.
    let max_bands = |b: usize| (rects[b].w / (tilings[b].gateways + 1)).max(1);
    let spread_n: Vec<Option<u32>> = {
        let spread_to = |s: &Stream| match (s.from, s.to) {
            (End::Port(PeerKind::MemoryX), End::Stage { stage, .. }) if is_big(&stages, s) => Some(stage),
            _ => None,
        };
        // Two groups, each over every channel: the loop's streams (all at once, every layer), and the
        // streams outside it (the head's, once; or every stream of a model too short to fold).
        let mut n: Vec<Option<u32>> = vec![None; streams.len()];
        for looped in [true, false].into_iter().filter(|_| spread) {
            let group: Vec<usize> = (0..streams.len())
                .filter(|&i| spread_to(&streams[i].1).is_some_and(|b| (stages[b].iters > 1) == looped))
                .collect();
            let want: Vec<(u64, u32)> = group
                .iter()
                .map(|&i| (streams[i].1.bytes_per_step(), spread_to(&streams[i].1).map_or(1, max_bands)))
                .collect();
            for (k, got) in io::apportion(chans.len(), &want).into_iter().enumerate() {
                n[group[k]] = Some(got);
            }
        }
        n
    };
    let mut feed_pos: BTreeMap<usize, (usize, usize, usize)> = BTreeMap::new();
    let mut forwards: Vec<(usize, usize)> = Vec::new();
    for (si, (gi, s)) in streams.iter().enumerate() {
        let runs_s = match s.from {
            End::Stage { stage, slot } => kernel::out_runs(&stages[stage], &tilings[stage], slot),
            End::Port(_) => match s.to {
                End::Stage { stage, slot } => match stages[stage].inputs[slot].kind {
                    SlotKind::Live | SlotKind::Stored { .. } => {
                        let r = tilings[stage].runs;
                        let per = r as u64 * if s.elem_bytes < 4 { 4 / s.elem_bytes } else { 1 };
                        if s.values % per == 0 {
                            r
                        } else {
                            1
                        }
                    }
                    _ => 1,
                },
                End::Port(_) => 1,
            },
        };
        let w_s = wl(s.values / runs_s as u64, s.elem_bytes);
        // What the program emits (a cut loop sends fewer times); `bytes` below stays the whole step's.
        let (send_first, send_count) = cut.range(&s.name, s.send_first, s.send_count)?;
        let repeat = send_count * runs_s;
        let window = match s.from {
            End::Stage { stage, .. } if send_count < cut.iters(stages[stage].iters) => {
                Some(RunRange { first: send_first * runs_s + 1, last: (send_first + send_count) * runs_s })
            }
            _ => None,
        };
        let bytes = s.bytes_per_step();
        let n_big = |max: u32| -> u32 {
            if chans.is_empty() || big == 0 {
                return 1;
            }
            let share = (chans.len() as u128 * bytes as u128).div_ceil(big as u128) as u32;
            share.clamp(1, max.max(1))
        };
        match (s.from, s.to) {
            (End::Stage { stage: a, slot: o }, End::Stage { stage: b, slot }) => {
                let to = gateway(b, slot);
                if let Some(prev) = chain_prev[si] {
                    let End::Stage { stage: pb, slot: ps } = streams[prev].1.to else {
                        continue;
                    };
                    let from = gateway(pb, ps);
                    let fl = Flow {
                        name: s.name.clone(),
                        sender: Senders::Pes(unit(from)),
                        start: from,
                        rx0: route::R,
                        pattern: Pattern::To { dx: to.x as i32 - from.x as i32, dy: to.y as i32 - from.y as i32 },
                    };
                    flows.push((fl, FlowUse::Chain { prev, si, b, slot, w: w_s, repeat }));
                    continue;
                }
                let from = out_gateway(&rects[a], 0, &ifaces[a].outs[o]);
                let fl = Flow {
                    name: s.name.clone(),
                    sender: Senders::Pes(unit(from)),
                    start: from,
                    rx0: route::R,
                    pattern: Pattern::To { dx: to.x as i32 - from.x as i32, dy: to.y as i32 - from.y as i32 },
                };
                flows.push((fl, FlowUse::Pair { a, o, b, slot, w: w_s, repeat, window, si }));
            }
            (End::Port(peer), End::Stage { stage: b, slot }) => {
                io_bytes[b] += bytes;
                let banded = kernel::banded_slot(&stages[b]) == Some(slot);
                let gws = tilings[b].gateways;
                let width = rects[b].w;
                let max_bands = if banded { (width / (gws + 1)).max(1) } else { 1 };
                let spread = spread_n[si].filter(|_| banded && !restore_ch.contains_key(gi));
                let nb = match spread {
                    Some(n) => n.min(max_bands),
                    None if banded => n_big(max_bands),
                    None => 1,
                };
                let near = gateway(b, slot);
                // A channel linked to another wafer carries that one stream (its port has one peer port).
                let avoid: Vec<usize> = (0..chans.len())
                    .filter(|&i| peer_of[i].is_some() || (matches!(peer, PeerKind::Wafer(_)) && nflows[i] > 0))
                    .collect();
                // Weights come straight in: a channel on a row of the region's compute block multicasts
                // its band by itself (along its row into the region, then up and down the band's columns).
                let fr = tilings[b].frame;
                let (yc0, yc1) = (rects[b].y + fr.row0(), rects[b].y + fr.row0() + fr.rc());
                let single_feed = streams.iter().filter(|(_, x)| x.to == s.to).count() == 1;
                let direct_cands: Vec<usize> = if stages[b].inputs[slot].kind == SlotKind::Weights
                    || (single_feed && stages[b].inputs[slot].kind != SlotKind::Refresh)
                {
                    (0..chans.len())
                        .filter(|&i| {
                            let c = &chans[i];
                            !avoid.contains(&i)
                                && matches!(c.side, crate::mesh::Dir::West | crate::mesh::Dir::East)
                                && c.at.y >= yc0
                                && c.at.y < yc1
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                // A spread weight stream goes straight in (row bands) only when channels on the region's
                // rows are as little loaded as the least loaded anywhere; else it takes the least loaded
                // channels of the wafer in column bands, each channel's train crossing the fabric to its
                // band's gateway on the region's input row (hops and links the engine charges).
                let spread_pick = spread.map(|_| {
                    // Bytes per step of each band, in band order.
                    let band_bytes = |bands: &[(u32, u32)], rows: bool| -> Vec<u64> {
                        bands
                            .iter()
                            .map(|&(a, z)| {
                                let v = kernel::weight_band_values(&stages[b], &tilings[b], a, z, rows);
                                // The whole step's (a cut loop decides as the whole does).
                                wl(v, s.elem_bytes) * 4 * s.send_count as u64
                            })
                            .collect()
                    };
                    let worst = |v: &[usize], by: &[u64]| v.iter().zip(by).map(|(&i, &x)| load[i] + x).max();
                    let all: Vec<usize> = (0..chans.len()).filter(|i| !avoid.contains(i)).collect();
                    let cbands = col_bands(&stages[b], &tilings[b], width, nb, gws + 1);
                    let mut any = io::spread(&chans, &load, &nflows, cbands.len(), near, &all, false);
                    // Column bands from west to east: west channels take the western bands (their trains
                    // run east along their rows to the band's gateway), east ones the eastern.
                    any.sort_by_key(|&i| (chans[i].side != crate::mesh::Dir::West, chans[i].at.y, i));
                    let any_bytes = band_bytes(&cbands, false);
                    let mut rows = io::spread(&chans, &load, &nflows, nb as usize, near, &direct_cands, true);
                    rows.sort_by_key(|&i| (chans[i].at.y, i));
                    let ys: Vec<u32> = rows.iter().map(|&i| chans[i].at.y - yc0).collect();
                    let rows_bytes = band_bytes(&row_bands(&ys, yc1 - yc0), true);
                    if rows.len() == nb as usize && worst(&rows, &rows_bytes) <= worst(&any, &any_bytes) {
                        (true, rows, rows_bytes, Vec::new())
                    } else {
                        (false, any, any_bytes, cbands)
                    }
                });
                let direct = match &spread_pick {
                    Some((d, _, _, _)) => *d,
                    None => {
                        !direct_cands.is_empty() && !restore_ch.contains_key(gi) && !matches!(peer, PeerKind::Wafer(_))
                    }
                };
                let spread_bands = spread_pick.as_ref().map(|p| p.3.clone()).unwrap_or_default();
                let chosen = match (restore_ch.get(gi), spread_pick) {
                    (Some(&ch), _) => vec![ch],
                    (None, Some((_, got, by, _))) => {
                        for (&i, &x) in got.iter().zip(&by) {
                            load[i] += x.max(1);
                            nflows[i] += 1;
                        }
                        got
                    }
                    (None, None) if direct => {
                        let sub: Vec<Channel> = direct_cands.iter().map(|&i| chans[i].clone()).collect();
                        let mut sub_load: Vec<u64> = direct_cands.iter().map(|&i| load[i]).collect();
                        let mut sub_flows: Vec<u32> = direct_cands.iter().map(|&i| nflows[i]).collect();
                        let got = io::pick(
                            &sub,
                            &mut sub_load,
                            &mut sub_flows,
                            (nb as usize).min(sub.len()),
                            bytes,
                            near,
                            &[],
                            true,
                        );
                        for (k, &i) in direct_cands.iter().enumerate() {
                            load[i] = sub_load[k];
                            nflows[i] = sub_flows[k];
                        }
                        got.into_iter().map(|k| direct_cands[k]).collect()
                    }
                    (None, None) => {
                        io::pick(&chans, &mut load, &mut nflows, nb as usize, bytes, near, &avoid, is_big(&stages, s))
                    }
                };
                let mut chosen = chosen;
                if direct && banded && chosen.len() > 1 {
                    // Row bands around each channel's row: a band's multicast never crosses another's,
                    // so the bands can share a color.
                    chosen.sort_by_key(|&i| (chans[i].at.y, i));
                    chosen.dedup_by_key(|i| chans[*i].at.y);
                }
                let nb = chosen.len() as u32;
                if direct && banded && nb > 1 {
                    let ys: Vec<u32> = chosen.iter().map(|&i| chans[i].at.y - yc0).collect();
                    ifaces[b].wbands = row_bands(&ys, yc1 - yc0);
                    ifaces[b].wband_rows = true;
                    ifaces[b].wslot = Some(slot);
                } else if banded && nb > 1 {
                    ifaces[b].wbands = if spread_bands.len() == nb as usize {
                        spread_bands
                    } else {
                        col_bands(&stages[b], &tilings[b], width, nb, gws + 1)
                    };
                    ifaces[b].wslot = Some(slot);
                }
                let bands = if ifaces[b].wslot == Some(slot) { ifaces[b].wbands.clone() } else { vec![(0, width)] };
                for (j, &ch) in chosen.iter().enumerate() {
                    if matches!(peer, PeerKind::Wafer(_)) {
                        peer_of[ch] = Some(peer.peer());
                    }
                    let (c0, c1) = bands[j.min(bands.len() - 1)];
                    let rows_banded = ifaces[b].wband_rows && ifaces[b].wslot == Some(slot);
                    let (to, w, rep) = if bands.len() > 1 {
                        let v = kernel::weight_band_values(&stages[b], &tilings[b], c0, c1, rows_banded);
                        (Coord { x: rects[b].x + c1 - 1, y: rects[b].y }, wl(v, s.elem_bytes), send_count)
                    } else {
                        (near, w_s, repeat)
                    };
                    let c = &chans[ch];
                    let pattern = if direct && rows_banded {
                        Pattern::Rect {
                            dx: rects[b].x as i32 - c.at.x as i32,
                            dy: (yc0 + c0) as i32 - c.at.y as i32,
                            w: width,
                            h: c1 - c0,
                        }
                    } else if direct {
                        Pattern::Rect {
                            dx: (rects[b].x + c0) as i32 - c.at.x as i32,
                            dy: yc0 as i32 - c.at.y as i32,
                            w: c1 - c0,
                            h: yc1 - yc0,
                        }
                    } else {
                        Pattern::To { dx: to.x as i32 - c.at.x as i32, dy: to.y as i32 - c.at.y as i32 }
                    };
                    let fl = Flow {
                        name: s.name.clone(),
                        sender: Senders::Port(PortId(ch as u32)),
                        start: c.at,
                        rx0: route::bit(c.side),
                        pattern,
                    };
                    let saved = restore_ch.contains_key(gi).then_some(*gi);
                    flows.push((
                        fl,
                        FlowUse::PortIn {
                            ch,
                            b,
                            slot,
                            band: j,
                            w,
                            repeat: rep,
                            iters: (send_first, send_count),
                            peer,
                            gi: *gi,
                            gate: saved,
                            direct,
                        },
                    ));
                }
            }
            (End::Stage { stage: a, slot: o }, End::Port(peer)) => {
                io_bytes[a] += bytes;
                let near = out_gateway(&rects[a], 0, &ifaces[a].outs[o]);
                let avoid: Vec<usize> = (0..chans.len())
                    .filter(|&i| peer_of[i].is_some() || (matches!(peer, PeerKind::Wafer(_)) && nflows[i] > 0))
                    .collect();
                // A long result (the logits) leaves in column bands, each through its own channel, rather
                // than through one gateway and one channel. A `ToPort` route runs along the output row
                // first, and every band's gateway is its west column: bands leaving by the same side
                // share that row's links, and two bands leaving east share them up to the edge. So at
                // most three bands: the westmost band and the next leave west (one to a channel above
                // the output row, one below, so they share no edge links either), the eastmost leaves
                // east. A band carries at least OUT_BAND_MIN wavelets, so a short result keeps one.
                // Only results to the host: gradients to SwarmX (already spread by the placement's bands)
                // and hidden states to the next wafer keep one channel.
                let nb = if *gi <= usize::MAX / 2
                    && matches!(peer, PeerKind::Host)
                    && kernel::port_bandable_output(&stages[a], &tilings[a], o)
                {
                    ((w_s / OUT_BAND_MIN) as u32).clamp(1, OUT_BANDS_MAX).min(rects[a].w)
                } else {
                    1
                };
                let mut chosen = Vec::new();
                if nb > 1 {
                    let sp = kernel::split(rects[a].w as u64, nb as u64);
                    let mut c0 = 0u32;
                    let mut bands = Vec::new();
                    for j in 0..nb {
                        let wj = sp.at(j as u64) as u32;
                        bands.push((c0, c0 + wj));
                        c0 += wj;
                    }
                    let vals: Vec<u64> = bands
                        .iter()
                        .map(|&(c0, c1)| kernel::out_band_values(&stages[a], &tilings[a], o, c0, c1))
                        .collect();
                    if vals.iter().all(|&v| v > 0) {
                        ifaces[a].outs[o].bands = bands;
                        chosen = out_band_channels(&chans, &rects[a], &ifaces[a].outs[o], &avoid, hw.mesh.width);
                        if chosen.len() == nb as usize {
                            for (j, &ch) in chosen.iter().enumerate() {
                                load[ch] += bytes * vals[j] / vals.iter().sum::<u64>().max(1);
                                nflows[ch] += 1;
                            }
                        } else {
                            ifaces[a].outs[o].bands = vec![(0, rects[a].w)];
                            chosen.clear();
                        }
                    }
                }
                if chosen.is_empty() {
                    // One channel, the nearest: the output row is a channel row, so the stream goes straight.
                    chosen = io::pick(&chans, &mut load, &mut nflows, 1, bytes, near, &avoid, false);
                }
                if *gi > usize::MAX / 2 {
                    restore_ch.insert(usize::MAX - *gi, chosen[0]);
                }
                let bands = ifaces[a].outs[o].bands.clone();
                for (j, &ch) in chosen.iter().enumerate() {
                    if matches!(peer, PeerKind::Wafer(_)) {
                        peer_of[ch] = Some(peer.peer());
                    }
                    let (c0, c1) = bands[j.min(bands.len() - 1)];
                    let w = if bands.len() > 1 {
                        wl(kernel::out_band_values(&stages[a], &tilings[a], o, c0, c1), s.elem_bytes)
                    } else {
                        w_s
                    };
                    let from = out_gateway(&rects[a], j, &ifaces[a].outs[o]);
                    let fl = Flow {
                        name: s.name.clone(),
                        sender: Senders::Pes(unit(from)),
                        start: from,
                        rx0: route::R,
                        pattern: Pattern::ToPort { port: PortId(ch as u32) },
                    };
                    flows.push((
                        fl,
                        FlowUse::PortOut {
                            ch,
                            a,
                            o,
                            band: j,
                            w,
                            repeat,
                            window,
                            iters: (send_first, send_count),
                            peer,
                            gi: *gi,
                        },
                    ));
                }
            }
            (End::Port(_), End::Port(_)) => {}
        }
    }

    // External colors are placeholders until the regions' own routes are known; then every flow
    // takes a real color free along its path and the program is patched.
    let ph = |i: usize| ColorId(PLACEHOLDER + i as u32);
    let port_at = |p: PortId| chans.get(p.0 as usize).map(|c| (c.at, c.side));
    let mut routes: Vec<Route> = Vec::new();
    for (fi, (fl, us)) in flows.iter().enumerate() {
        let color = ph(fi);
        routes.push(Route { color, senders: fl.sender, pattern: fl.pattern, relays: 0 });
        match *us {
            FlowUse::Pair { a, o, b, slot, w, repeat, window, si } => {
                let tensor = Some(stages[b].inputs[slot].tensor);
                ifaces[a].outs[o].dests.push(Dest { color, tensor, wavelets: w, runs: window, band: 0 });
                feed_pos.insert(si, (b, slot, ifaces[b].feeds[slot].len()));
                ifaces[b].feeds[slot].push(Feed {
                    color,
                    wavelets: w,
                    repeat,
                    band: 0,
                    fwd: Vec::new(),
                    direct: false,
                });
            }
            FlowUse::Chain { prev, si, b, slot, w, repeat } => {
                forwards.push((prev, color.0 as usize));
                feed_pos.insert(si, (b, slot, ifaces[b].feeds[slot].len()));
                ifaces[b].feeds[slot].push(Feed {
                    color,
                    wavelets: w,
                    repeat,
                    band: 0,
                    fwd: Vec::new(),
                    direct: false,
                });
            }
            FlowUse::PortIn { ch, b, slot, band, w, repeat, iters, peer, gi, gate, direct } => {
                ifaces[b].feeds[slot].push(Feed { color, wavelets: w, repeat, band, fwd: Vec::new(), direct });
                let pw = port_work.entry(ch).or_default();
                pw.streams.push(fl.name.clone());
                pw.bytes += w * 4 * repeat as u64;
                let mut needs = Vec::new();
                let mut op_needs_link = false;
                if let PeerKind::Wafer(_) = peer {
                    needs.push(Need::Recv { color: ColorId::LINK, wavelets: w });
                    op_needs_link = true;
                    cross.push((gi, PortId(ch as u32), false));
                }
                if let Some(key) = gate {
                    // Saved data returns only after all of it has left (last layer first).
                    if let Some(t) = pw.tasks.iter().position(|t| t.name == format!("save:{key}")) {
                        needs.push(Need::After {
                            task: TaskIdx(t as u32),
                            first: pw.tasks[t].repeat as i64,
                            num: 0,
                            den: 1,
                        });
                    }
                }
                let slot_t = stages[b].inputs[slot].tensor;
                if gate.is_some() {
                    pw.unsupported.push(format!(
                        "stream `{}`: functional mode does not carry values through MemoryX yet",
                        fl.name
                    ));
                    pw.data.push(TaskData::None);
                } else if op_needs_link {
                    // From the previous wafer: what arrives on the link goes on into this wafer.
                    pw.data.push(TaskData::Kernel(Kernel::Relay));
                } else if stages[b].inputs[slot].kind == SlotKind::Weights {
                    // A layer's whole tensor per iteration (every band its own copy): layer l's on the
                    // loop's iteration l.
                    let v = data::view(g, slot_t);
                    let rows = data::view_rows(g, slot_t, &v);
                    let kernel = Kernel::Source { view: v, rows_per_run: rows };
                    let iters = loop_of[b].map_or(0, |lp| loops[lp as usize].maps.len() as u64);
                    pw.data.push(match loop_of[b] {
                        Some(lp) if iters > 0 && (repeat as u64).is_multiple_of(iters) => {
                            TaskData::Looped { kernel, lp, per_iter: repeat as u64 / iters, stride: 1, offset: 0 }
                        }
                        Some(_) => {
                            pw.unsupported.push(format!(
                                "stream `{}`: {repeat} runs do not split evenly into the loop's {iters} iterations",
                                fl.name
                            ));
                            TaskData::None
                        }
                        None => TaskData::Kernel(kernel),
                    });
                } else if let (Work::Relay { rows, width, .. }, PeerKind::MemoryX) = (&stages[b].work, peer) {
                    // Embedding rows MemoryX looks up by the step's ids.
                    let op = g.op(stages[b].main);
                    let (ids, out) = (data::view(g, op.inputs[0]), op.outputs[0].0);
                    let rows_per_run = rows / repeat.max(1) as u64;
                    let kernel = Kernel::Gather { ids, table: slot_t.0, width: *width, rows_per_run, out };
                    pw.data.push(TaskData::Kernel(kernel));
                } else {
                    let (send_first, send_count) = (iters.0 as u64, iters.1 as u64);
                    let v = data::view(g, slot_t);
                    let rows = data::view_rows(g, slot_t, &v);
                    let iters = loop_of[b].map_or(0, |lp| loops[lp as usize].maps.len() as u64);
                    pw.data.push(match loop_of[b] {
                        // Restored into some iterations of the loop only (a gradient from a phase before
                        // the loop into its first iteration): those iterations' tensors, in their order.
                        Some(lp)
                            if peer == PeerKind::MemoryX
                                && send_count < iters
                                && send_count > 0
                                && (repeat as u64).is_multiple_of(send_count) =>
                        {
                            let per_iter = repeat as u64 / send_count;
                            let kernel = Kernel::Source { view: v, rows_per_run: rows / per_iter.max(1) };
                            TaskData::Looped { kernel, lp, per_iter, stride: 1, offset: send_first * per_iter }
                        }
                        // Saved by the forward phase, restored into the backward loop: one iteration's
                        // layer per iteration (the loop map's).
                        Some(lp) if peer == PeerKind::MemoryX && iters > 1 && (repeat as u64).is_multiple_of(iters) => {
                            let per_iter = repeat as u64 / iters;
                            let kernel = Kernel::Source { view: v, rows_per_run: rows / per_iter.max(1) };
                            TaskData::Looped { kernel, lp, per_iter, stride: 1, offset: 0 }
                        }
                        _ => TaskData::Kernel(Kernel::Source { view: v, rows_per_run: rows / repeat.max(1) as u64 }),
                    });
                }
                pw.send_iters.insert(pw.tasks.len(), iters);
                pw.tasks.push(Task {
                    name: format!("send:{}", fl.name),
                    needs,
                    work: mesh::Work {
                        op: mesh::SimdOp::Mov32,
                        elems: 0,
                        paced_by: op_needs_link.then_some(ColorId::LINK),
                    },
                    sends: vec![mesh::Send { color, wavelets: w, streamed: op_needs_link, runs: None }],
                    repeat,
                    flops: 0,
                });
                pw.peer.get_or_insert(peer.peer());
            }
            FlowUse::PortOut { ch, a, o, band, w, repeat, window, iters, peer, gi } => {
                // A slot that carries several of the op's outputs (a norm gradient's dgamma and dbeta)
                // leaves whole: its gateway forwards every tensor it gathers, not a slice of the first.
                let n_out = g.op(stages[a].main).outputs.len();
                let merged = o + 1 == stages[a].outputs.len() && n_out > stages[a].outputs.len();
                let tensor = (!merged).then_some(stages[a].outputs[o].tensor);
                ifaces[a].outs[o].dests.push(Dest { color, tensor, wavelets: w, runs: window, band });
                let pw = port_work.entry(ch).or_default();
                pw.streams.push(fl.name.clone());
                pw.bytes += w * 4 * repeat as u64;
                if let PeerKind::Wafer(_) = peer {
                    // A port to another wafer forwards what reaches it to its peer port and runs no
                    // task for it (the peer's task receives it on `ColorId::LINK`).
                    cross.push((gi, PortId(ch as u32), true));
                    pw.peer.get_or_insert(peer.peer());
                    continue;
                }
                if gi > usize::MAX / 2 || !matches!(peer, PeerKind::Host | PeerKind::MemoryX | PeerKind::SwarmX) {
                    pw.unsupported.push(format!(
                        "stream `{}`: functional mode does not carry values to MemoryX or SwarmX yet",
                        fl.name
                    ));
                    pw.data.push(TaskData::None);
                } else {
                    pw.data.push(TaskData::Kernel(Kernel::Collect));
                    // The op's outputs the slot carries: its own, and those merged into the last slot
                    // (a norm gradient's dgamma and dbeta leave as one stream).
                    let (main, n_out) = (g.op(stages[a].main), stages[a].outputs.len());
                    let t0s: Vec<u32> = match main.outputs.iter().position(|&t| t == stages[a].outputs[o].tensor) {
                        Some(_) => (main.outputs.iter().enumerate())
                            .filter(|&(i, _)| i.min(n_out.saturating_sub(1)) == o)
                            .map(|(_, t)| t.0)
                            .collect(),
                        None => vec![stages[a].outputs[o].tensor.0],
                    };
                    // From a folded loop: the layers' tensors of the iterations it sends on.
                    let ts: Vec<u32> = t0s
                        .iter()
                        .flat_map(|&t0| match loop_of[a] {
                            Some(lp) => (iters.0..iters.0 + iters.1)
                                .filter_map(|i| loops[lp as usize].maps.get(i as usize))
                                .map(|m| m.get(&t0).copied().unwrap_or(t0))
                                .collect(),
                            None => vec![t0],
                        })
                        .collect();
                    for t in ts.into_iter().map(crate::graph::TensorId) {
                        if pw.readouts.iter().any(|r| r.tensor == t.0) {
                            continue;
                        }
                        let v = data::view(g, t);
                        pw.readouts.push(Readout {
                            tensor: t.0,
                            name: g.tensor(t).name.clone(),
                            rect: None,
                            rows: data::view_rows(g, t, &v),
                            cols: v.cols,
                            cover: 0,
                        });
                    }
                }
                pw.tasks.push(Task {
                    name: if gi > usize::MAX / 2 {
                        format!("save:{}", usize::MAX - gi)
                    } else {
                        format!("recv:{}", fl.name)
                    },
                    needs: vec![Need::Recv { color, wavelets: w }],
                    work: mesh::Work { op: mesh::SimdOp::Mov32, elems: 0, paced_by: Some(color) },
                    sends: vec![],
                    repeat,
                    flops: 0,
                });
                pw.peer.get_or_insert(peer.peer());
            }
        }
    }
    // Chained flows: the previous consumer's gateway forwards the stream.
    for (prev, color) in forwards {
        if let Some(&(b, slot, idx)) = feed_pos.get(&prev) {
            ifaces[b].feeds[slot][idx].fwd.push(ColorId(color as u32));
        }
    }
    // Region programs, with placeholder external colors.
    let codes: Vec<kernel::RegionCode> = stages
        .iter()
        .enumerate()
        .map(|(sid, st)| kernel::program(st, &tilings[sid], rects[sid], &ifaces[sid], cut.iters(st.iters)))
        .collect();
    // Where each region uses its internal colors: the bounding box of every internal route.
    let mut footprints: Vec<(Rect, Vec<(u32, Rect)>)> = Vec::new();
    for (sid, code) in codes.iter().enumerate() {
        let mut by_color: BTreeMap<u32, Rect> = BTreeMap::new();
        for r in &code.routes {
            if let Some(b) = route_bbox(r, mesh, &port_at) {
                by_color.entry(r.color.0).and_modify(|x| *x = union(*x, b)).or_insert(b);
            }
        }
        footprints.push((rects[sid], by_color.into_iter().collect()));
    }
    let mut book = ColorBook::new(mesh, hw.fabric.colors, &footprints);
    let mut real: Vec<ColorId> = vec![ColorId(0); flows.len()];
    let mut stream_colors: BTreeMap<String, (Vec<u32>, u64)> = BTreeMap::new();
    let mut paths: Vec<Vec<Hop>> = Vec::with_capacity(flows.len());
    for (fl, _) in &flows {
        let mut path: Vec<Hop> = Vec::new();
        route::walk(fl.pattern, fl.start, fl.rx0, mesh, &port_at, &mut path)
            .map_err(|e| CompileError::Internal(format!("stream `{}`: {e}", fl.name)))?;
        paths.push(path);
    }
    // Longest paths first: they cross the most other flows and regions, so they have the fewest choices.
    let mut order: Vec<usize> = (0..flows.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(paths[i].len()), i));
    let mut relays = vec![0u32; flows.len()];
    let mut segs: Vec<Vec<u32>> = vec![Vec::new(); flows.len()];
    for &i in &order {
        let (c, r, sg) = book.assign_relayed(&flows[i].0.name, &paths[i])?;
        real[i] = c;
        relays[i] = r;
        segs[i] = sg;
    }
    for (i, (fl, _)) in flows.iter().enumerate() {
        let e = stream_colors.entry(fl.name.clone()).or_default();
        e.0.extend(segs[i].iter().copied());
        e.0.dedup();
        e.1 = e.1.max(paths[i].len() as u64);
    }
    let relayed: Vec<usize> = (0..flows.len()).filter(|&i| relays[i] > 0).collect();
    if !relayed.is_empty() {
        notes.push(format!(
            "{} streams found no color free end to end and are relayed through PEs ({} relays, each charged {} \
             cycles): {}",
            relayed.len(),
            relayed.iter().map(|&i| relays[i]).sum::<u32>(),
            hw.fabric.relay_cycles,
            relayed.iter().map(|&i| flows[i].0.name.clone()).take(6).collect::<Vec<_>>().join(", ")
        ));
    }
    let patch = |c: ColorId| -> ColorId {
        if c.0 >= PLACEHOLDER && c != ColorId::LINK {
            real[(c.0 - PLACEHOLDER) as usize]
        } else {
            c
        }
    };
    let patch_tasks = |tasks: &mut Vec<Task>| {
        for t in tasks.iter_mut() {
            for nd in t.needs.iter_mut() {
                if let Need::Recv { color, .. } = nd {
                    *color = patch(*color);
                }
            }
            for sd in t.sends.iter_mut() {
                sd.color = patch(sd.color);
            }
            t.work.paced_by = t.work.paced_by.map(patch);
        }
    };
    for (i, r) in routes.iter_mut().enumerate() {
        r.color = patch(r.color);
        r.relays = relays[i];
    }
    for pw in port_work.values_mut() {
        patch_tasks(&mut pw.tasks);
        if pw.peer == Some(Peer::MemoryX) {
            interleave_layer_streams(&mut pw.tasks, &pw.send_iters);
        }
    }
    let region_colors: Vec<u32> = footprints.iter().map(|f| f.1.len() as u32).collect();
    let mut program = MeshProgram {
        version: PROGRAM_VERSION,
        mesh,
        timing: Timing {
            clock_hz: hw.clock_hz,
            hop_cycles: hw.fabric.hop_cycles,
            ramp_cycles: hw.fabric.ramp_cycles,
            pick_cycles: hw.pe.pick_cycles,
            queue_depth: hw.fabric.queue_depth,
            colors: hw.fabric.colors,
            relay_cycles: hw.fabric.relay_cycles,
            link_wavelets_per_cycle: hw.fabric.link_wavelets_per_cycle,
            sram_bytes: hw.pe.sram_bytes,
            pe: hw.pe,
        },
        regions: Vec::new(),
        templates: Vec::new(),
        tiles: Vec::new(),
        routes: Vec::new(),
        ports: Vec::new(),
        graph_flops: 0,
        wafer_width: None,
        data: None,
    };
    let mut plan_regions = Vec::new();
    let mut pdata = ProgramData { concats: super::data::concats(g), ..ProgramData::default() };
    for ((sid, st), code) in stages.iter().enumerate().zip(codes) {
        let t = &tilings[sid];
        let rid = RegionId(program.regions.len() as u32);
        let base = program.templates.len() as u32;
        // SRAM per PE from the lowered tiles: the largest template, and the mean over the region.
        let area = |r: &Rect| r.w as u64 * r.h as u64;
        let sram_max = code.tiles.iter().map(|(_, ti)| code.templates[*ti].2).max().unwrap_or(0);
        let sram_sum: u64 = code.tiles.iter().map(|(r, ti)| area(r) * code.templates[*ti].2).sum();
        let sram_mean = sram_sum / area(&rects[sid]).max(1);
        let rd = data::region(g, st, t, rects[sid], &ifaces[sid], &code.templates);
        let tasks = match loop_of[sid] {
            // A folded loop's kernels run on each iteration's tensors.
            Some(lp) => {
                let iters = loops[lp as usize].maps.len() as u64;
                let (tasks, bad) = data::looped(&code.templates, rd.tasks, lp, iters);
                pdata.unsupported.extend(bad.map(|b| format!("region `{}`: {b}", st.name)));
                tasks
            }
            None => rd.tasks,
        };
        pdata.tasks.extend(tasks);
        // What a folded region holds at the end, every layer's (an attention region's KV caches).
        let readouts = match loop_of[sid] {
            Some(lp) => rd
                .readouts
                .iter()
                .flat_map(|r| {
                    loops[lp as usize].maps.iter().map(move |m| {
                        let t = m.get(&r.tensor).copied().unwrap_or(r.tensor);
                        Readout { tensor: t, name: g.tensor(crate::graph::TensorId(t)).name.clone(), ..r.clone() }
                    })
                })
                .collect(),
            None => rd.readouts,
        };
        pdata.readouts.extend(readouts);
        for sl in st.inputs.iter().filter(|s| s.kind == SlotKind::Weights) {
            pdata.streamed.insert(sl.tensor.0);
            if let Some(lp) = loop_of[sid] {
                pdata.streamed.extend(loops[lp as usize].maps.iter().filter_map(|m| m.get(&sl.tensor.0)));
            }
        }
        pdata.unsupported.extend(rd.unsupported);
        for (i, (name, mut tasks, sram)) in code.templates.into_iter().enumerate() {
            patch_tasks(&mut tasks);
            let mut fifos = code.fifos.get(&i).cloned().unwrap_or_default();
            for f in fifos.iter_mut() {
                f.color = patch(f.color);
            }
            program.templates.push(Template { name, region: rid, tasks, sram_bytes: sram, fifos });
        }
        for (r, ti) in code.tiles {
            program.tiles.push(Tile { rect: r, template: TemplateId(base + ti as u32) });
        }
        program.routes.extend(code.routes);
        program.regions.push(Region {
            name: st.name.clone(),
            rect: rects[sid],
            ops: st.ops.iter().map(|&o| g.op(o).name.clone()).collect(),
            kind: st.kind_name(g).to_string(),
            algorithm: t.algo.name().to_string(),
            flops: st.flops_iter * cut.iters(st.iters) as u64,
        });
        program.graph_flops += st.flops_iter * cut.iters(st.iters) as u64;
        plan_regions.push(PlanRegion {
            wafer,
            phase,
            name: st.name.clone(),
            kind: st.kind_name(g).to_string(),
            pass: st.pass.name().to_string(),
            ops: st.ops.len() as u64,
            x: rects[sid].x,
            y: rects[sid].y,
            w: rects[sid].w,
            h: rects[sid].h,
            algorithm: t.algo.name().to_string(),
            reason: t.reason.clone(),
            shape: shape_of(st),
            runs: t.runs,
            iters: st.iters,
            sram_max,
            sram_mean,
            colors_internal: region_colors[sid],
            colors_max: book.max_in(rects[sid]),
            flops: st.flops(),
            io_bytes: io_bytes[sid],
        });
    }
    program.routes.extend(routes);
    // Ports: the channels in use, renumbered.
    let used: Vec<usize> = port_work.keys().copied().collect();
    let renum: BTreeMap<usize, u32> = used.iter().enumerate().map(|(i, &c)| (c, i as u32)).collect();
    for r in program.routes.iter_mut() {
        if let Senders::Port(p) = r.senders {
            r.senders = Senders::Port(PortId(renum[&(p.0 as usize)]));
        }
        if let Pattern::ToPort { port } = r.pattern {
            r.pattern = Pattern::ToPort { port: PortId(renum[&(port.0 as usize)]) };
        }
    }
    let cross: Vec<(usize, PortId, bool)> =
        cross.into_iter().map(|(gi, p, o)| (gi, PortId(renum[&(p.0 as usize)]), o)).collect();
    let io_region = RegionId(program.regions.len() as u32);
    if !used.is_empty() {
        program.regions.push(Region {
            name: "io".into(),
            rect: Rect { x: 0, y: 0, w: 0, h: 0 },
            ops: Vec::new(),
            kind: "io".into(),
            algorithm: "ports".into(),
            flops: 0,
        });
    }
    let mut plan_ports = Vec::new();
    for &ch in &used {
        let c = &chans[ch];
        let pw = port_work.remove(&ch).unwrap_or_default();
        let tid = TemplateId(program.templates.len() as u32);
        pdata.unsupported.extend(pw.unsupported);
        for r in pw.readouts {
            if !pdata.readouts.iter().any(|x| x.tensor == r.tensor) {
                pdata.readouts.push(r);
            }
        }
        let mut pd = pw.data;
        pd.resize(pw.tasks.len(), TaskData::None);
        pdata.tasks.push(pd);
        program.templates.push(Template {
            name: format!("port.{}", c.name),
            region: io_region,
            tasks: pw.tasks,
            sram_bytes: 0,
            fifos: vec![],
        });
        let peer = pw.peer.unwrap_or(Peer::Host);
        program.ports.push(Port {
            name: c.name.clone(),
            side: c.side,
            at: c.at,
            wavelets: c.wavelets,
            per_cycles: c.per_cycles,
            latency_cycles: c.latency_cycles,
            peer,
            peer_port: None,
            template: tid,
            planned_bytes: pw.bytes,
        });
        plan_ports.push(PlanPort {
            wafer,
            phase,
            name: c.name.clone(),
            side: io::side_name(c.side).into(),
            x: c.at.x,
            y: c.at.y,
            peer: match peer {
                Peer::Host => "host".into(),
                Peer::MemoryX => "memoryx".into(),
                Peer::SwarmX => "swarmx".into(),
                Peer::Wafer(w) => format!("wafer{w}"),
            },
            bytes_per_s: c.bytes_per_s(hw.clock_hz),
            bytes: pw.bytes,
            streams: pw.streams,
        });
    }
    for (_, s) in &streams {
        let (colors, hops) = stream_colors.get(&s.name).cloned().unwrap_or_default();
        let end = |e: End| match e {
            End::Stage { stage, .. } => stages[stage].name.clone(),
            End::Port(p) => p.name(),
        };
        plan_streams.push(PlanStream {
            wafer,
            phase,
            name: s.name.clone(),
            from: end(s.from),
            to: end(s.to),
            bytes: s.bytes_per_step(),
            colors,
            hops,
        });
    }
    if stages.iter().any(|s| s.lp != Loop::Once) {
        notes.push(format!(
            "weights of the folded layers stream in from MemoryX once per layer, double-buffered: {} over the IO \
             channels per step",
            crate::report::fmt::human(
                streams
                    .iter()
                    .filter(|(_, s)| matches!(s.from, End::Port(PeerKind::MemoryX)))
                    .map(|(_, s)| s.bytes_per_step() as f64)
                    .sum::<f64>(),
                "B"
            )
        ));
    }
    pdata.unsupported.extend(loop_bad);
    pdata.loops = loops;
    program.data = Some(std::sync::Arc::new(pdata));
    Ok(WaferOut {
        program,
        regions: plan_regions,
        streams: plan_streams,
        ports: plan_ports,
        notes,
        bands: placement.bands,
        cross,
    })
}

/// Compute-row bands around channels on rows `ys` (sorted, relative to the compute block's first row)
/// of a block of `rows`: each band from halfway to the previous channel's row to halfway to the next's.
fn row_bands(ys: &[u32], rows: u32) -> Vec<(u32, u32)> {
    let mut bands = Vec::new();
    for (j, &y) in ys.iter().enumerate() {
        let lo = if j == 0 { 0 } else { (ys[j - 1] + y) / 2 + 1 };
        let hi = if j + 1 == ys.len() { rows } else { (y + ys[j + 1]) / 2 + 1 };
        bands.push((lo, hi));
    }
    bands
}

/// At most `n` column bands over `width` columns of a stage's weights, each at least `min_w` columns
/// wide (its gateway, on its last column, clear of the slots' gateways) and each carrying about the same
/// share of the weights: cut where the running sum of the columns' values reaches the next share. A
/// band is never empty (columns past the matrix's hold no weights, and a band of no weights would
/// leave its gateway waiting for a train its port never sends): the last band takes the empty columns.
fn col_bands(st: &Stage, t: &kernel::Tiling, width: u32, n: u32, min_w: u32) -> Vec<(u32, u32)> {
    let v: Vec<u64> = (0..width).map(|x| kernel::weight_band_values(st, t, x, x + 1, false)).collect();
    let total: u64 = v.iter().sum();
    let n = n.clamp(1, (width / min_w.max(1)).max(1)) as u64;
    let mut bands = Vec::new();
    let (mut c0, mut cum) = (0u32, 0u64);
    for x in 0..width {
        cum += v[x as usize];
        let j = bands.len() as u64 + 1;
        let room = width - (x + 1) >= (n - j) as u32 * min_w.max(1);
        if j < n && x + 1 - c0 >= min_w.max(1) && room && cum as u128 * n as u128 >= total as u128 * j as u128 {
            bands.push((c0, x + 1));
            c0 = x + 1;
        }
    }
    bands.push((c0, width));
    // No band without weights: merge an empty one into its western neighbour.
    let sum = |&(a, z): &(u32, u32)| v[a as usize..z as usize].iter().sum::<u64>();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for bd in bands {
        match out.last_mut() {
            Some(last) if sum(&bd) == 0 || sum(last) == 0 => last.1 = bd.1,
            _ => out.push(bd),
        }
    }
    out
}

/// Streams big enough to share the IO channels in proportion: weights in, gradients out.
fn is_big(stages: &[Stage], s: &Stream) -> bool {
    match (s.from, s.to) {
        (End::Port(PeerKind::MemoryX), End::Stage { stage, slot }) => kernel::banded_slot(&stages[stage]) == Some(slot),
        (End::Stage { stage, slot }, End::Port(PeerKind::SwarmX)) => kernel::bandable_output(&stages[stage], slot),
        _ => false,
    }
}

/// Placeholder colors for streams between regions, replaced once routing gives them real colors.
const PLACEHOLDER: u32 = 1 << 24;

/// The bounding box of every router a route from any of its senders passes.
fn route_bbox(
    r: &Route,
    mesh: crate::mesh::MeshDims,
    port_at: &dyn Fn(PortId) -> Option<(Coord, crate::mesh::Dir)>,
) -> Option<Rect> {
    let mut path = Vec::new();
    let starts: Vec<(Coord, u8)> = match r.senders {
        Senders::Pes(x) => {
            vec![(Coord { x: x.x, y: x.y }, route::R), (Coord { x: x.x + x.w - 1, y: x.y + x.h - 1 }, route::R)]
        }
        Senders::Port(p) => {
            let (at, side) = port_at(p)?;
            vec![(at, route::bit(side))]
        }
    };
    let mut b: Option<Rect> = None;
    for (at, rx) in starts {
        path.clear();
        route::walk(r.pattern, at, rx, mesh, port_at, &mut path).ok()?;
        for h in &path {
            let u = unit(h.at);
            b = Some(b.map_or(u, |x| union(x, u)));
        }
    }
    if let Senders::Pes(x) = r.senders {
        b = b.map(|bb| union(bb, x));
    }
    b
}

fn union(a: Rect, b: Rect) -> Rect {
    let x0 = a.x.min(b.x);
    let y0 = a.y.min(b.y);
    let x1 = (a.x + a.w).max(b.x + b.w);
    let y1 = (a.y + a.h).max(b.y + b.h);
    Rect { x: x0, y: y0, w: x1 - x0, h: y1 - y0 }
}

fn unit(c: Coord) -> Rect {
    Rect { x: c.x, y: c.y, w: 1, h: 1 }
}

/// Most column bands a stage's result leaves the wafer in (see the stage-to-port streams in `lower`).
const OUT_BANDS_MAX: u32 = 3;
/// Fewest wavelets per run a result band carries.
const OUT_BAND_MIN: u64 = 4096;

/// Channels for an output's column bands, one each, or fewer when there are not enough: bands whose
/// gateway is nearer the west edge take west channels, the others east ones; on each side, the first band
/// takes the nearest channel at or above the output row and the next the nearest below it (so their
/// trains share no edge column links), then the nearest left.
fn out_band_channels(chans: &[Channel], r: &Rect, o: &OutIface, avoid: &[usize], width: u32) -> Vec<usize> {
    let y = r.y + r.h - 1;
    let mut chosen: Vec<usize> = Vec::new();
    let mut used: Vec<(crate::mesh::Dir, bool)> = Vec::new();
    for b in 0..o.bands.len() {
        let g = out_gateway(r, b, o);
        let side = if g.x <= width - 1 - g.x { crate::mesh::Dir::West } else { crate::mesh::Dir::East };
        let best = (0..chans.len())
            .filter(|i| !avoid.contains(i) && !chosen.contains(i) && chans[*i].side == side)
            .min_by_key(|&i| {
                let c = &chans[i];
                let above = c.at.y <= y;
                (used.contains(&(side, above)), c.at.y.abs_diff(y), i)
            });
        match best {
            Some(i) => {
                used.push((side, chans[i].at.y <= y));
                chosen.push(i);
            }
            None => break,
        }
    }
    chosen
}

/// The output gateway of band `b` of an output.
fn out_gateway(r: &Rect, b: usize, o: &OutIface) -> Coord {
    let c0 = o.bands.get(b).map_or(0, |x| x.0);
    Coord { x: r.x + c0, y: r.y + r.h - 1 }
}

enum FlowUse {
    Pair {
        a: usize,
        o: usize,
        b: usize,
        slot: usize,
        w: u64,
        repeat: u32,
        window: Option<RunRange>,
        si: usize,
    },
    /// Forwarded by the input gateway of stream `prev`'s consumer.
    Chain {
        prev: usize,
        si: usize,
        b: usize,
        slot: usize,
        w: u64,
        repeat: u32,
    },
    PortIn {
        ch: usize,
        /// Loop iterations streamed: (first, count).
        iters: (u32, u32),
        b: usize,
        slot: usize,
        band: usize,
        w: u64,
        repeat: u32,
        peer: PeerKind,
        gi: usize,
        /// For data restored from MemoryX: the stream key of its save.
        gate: Option<usize>,
        /// The port multicasts into the region itself (no input gateway).
        direct: bool,
    },
    PortOut {
        ch: usize,
        a: usize,
        o: usize,
        band: usize,
        w: u64,
        repeat: u32,
        window: Option<RunRange>,
        /// The loop iterations (first, count) the stream sends on, as the program emits them.
        iters: (u32, u32),
        peer: PeerKind,
        gi: usize,
    },
}

/// The work's shape for the plan's table.
fn shape_of(st: &Stage) -> String {
    match st.work {
        Work::Matmul { rows, k, cols, .. } => format!("{rows} x {k} x {cols} (rows x k x cols)"),
        Work::Accum { rows, k, cols, .. } => format!("{k} x {cols} accumulated over {rows} rows"),
        Work::RowReduce { rows, width, .. } => format!("{rows} rows x {width}"),
        Work::Elementwise { rows, width, .. } => format!("{rows} x {width}"),
        Work::Lookup { rows, width, .. } => format!("{rows} rows x {width} looked up"),
        Work::Relay { rows, width, .. } => format!("{rows} rows x {width} from MemoryX"),
        Work::SingleGemv { k, n } => format!("1 x {k} x {n}"),
        Work::SingleGemm { m, n, k } => format!("{m} x {k} x {n}"),
        Work::SingleAdd { n } => format!("{n} elements"),
        Work::AllReduce { elems } => format!("{elems} elements"),
    }
}
