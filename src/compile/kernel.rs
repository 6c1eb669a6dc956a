//! Mesh algorithms: for a stage on a `w x h` region, the algorithm, its tiling over the PEs, the SRAM
//! of every PE class, and the region's program (templates on rectangles, routes on internal colors).
//!
//! Every region has the same frame:
//! - row 0 (when the stage has fabric inputs) holds the input gateways: one PE per input slot relays
//!   the slot's streams into a multicast over the compute block, and for a banded weight stream, one
//!   relay PE above each band of columns;
//! - the last row (when the stage has outputs that move) gathers results: each column's results
//!   converge down to it, then west along it to the output gateway at the band's first column, which
//!   sends them on to the consumers;
//! - the rows between are the compute block, where the algorithm runs.
//!
//! Every PE runs at most one paced relay or one compute chain, so no PE waits on a stream while
//! holding another it must drain (see `mesh::Need` for the paced/non-paced distinction).

use std::collections::BTreeMap;

use crate::hw::{PeSpec, SimdOp};
use crate::mesh::{ColorId, Dir, Fifo, Need, Pattern, Rect, Route, RunRange, Send, Senders, Task, TaskIdx, ACC_BYTES};

use super::stage::{HeldKind, Operand, SlotKind, Stage, Work};

/// Runs a task aims to stay under in one step (programs stay compact: one run per chunk and layer).
pub(crate) const MAX_REPEAT: u32 = 1024;
/// Runs a task may make when smaller chunks are the only way to fit SRAM: 64 chunks of a 2048-token
/// sequence in each of 96 folded layers (gpt3-175b training under weight streaming) is 6,144.
pub(crate) const MAX_REPEAT_HARD: u32 = 8192;
/// Token chunks per iteration the compiler aims for (pipelining between regions).
pub(crate) const TARGET_RUNS: u32 = 32;
/// Most runs of a gemv-tree whose colors alternate by chunk parity: its compute tasks send on the
/// color of each run's parity through one send per run, so the sends of a task stay this few.
pub(crate) const PARITY_MAX_RUNS: u32 = 64;
/// Row bands of a gemv-tree's compute block that get only their own slice of the streamed operand,
/// each on its own multicast color (one more color per band beyond the first).
pub(crate) const TREE_X_BANDS: u64 = 4;

/// The rows of a region: an IO-in row, the compute block, an IO-out row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    pub w: u32,
    pub h: u32,
    pub io_in: bool,
    pub io_out: bool,
}

impl Frame {
    pub fn row0(&self) -> u32 {
        self.io_in as u32
    }
    /// Compute rows.
    pub fn rc(&self) -> u32 {
        self.h - self.io_in as u32 - self.io_out as u32
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Algo {
    /// The streamed operand is multicast to every PE; each PE owns whole-contraction columns of the
    /// stationary operand: no reduction.
    GemvBroadcast,
    /// The contraction is split over the rows: partial sums reduce down every column in a two-level
    /// fan-in tree (WaferLLM's MeshGEMV K-tree with K = 2).
    GemvTree,
    /// Output-stationary: both operands' panels are multicast to every PE, which accumulates its block.
    Summa,
    /// Shift-based: A and B blocks circulate in interleaved rings (constant two-hop shifts).
    Cannon,
    RowReduce,
    Elementwise,
    LookupTree,
    AllReduceTree,
    Local,
}

impl Algo {
    pub fn name(self) -> &'static str {
        match self {
            Algo::GemvBroadcast => "gemv-broadcast",
            Algo::GemvTree => "gemv-tree",
            Algo::Summa => "summa",
            Algo::Cannon => "cannon",
            Algo::RowReduce => "row-reduce",
            Algo::Elementwise => "elementwise",
            Algo::LookupTree => "lookup-tree",
            Algo::AllReduceTree => "allreduce-tree",
            Algo::Local => "local",
        }
    }
}

/// What the kernels need to know of the machine and the compile.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KCtx {
    pub pe: PeSpec,
    pub colors: u32,
    /// Data SRAM per PE (SRAM less the code reserve).
    pub avail: u64,
    /// Cycles per router-to-router hop (placement's latency estimate).
    pub hop_cycles: u64,
}

/// A stage's algorithm and tiling on a region.
#[derive(Clone, Debug)]
pub(crate) struct Tiling {
    pub frame: Frame,
    pub algo: Algo,
    /// Compute runs per iteration.
    pub runs: u32,
    /// Data SRAM bytes per PE of the largest PE class.
    pub sram_max: u64,
    pub reason: String,
    /// Input gateway columns (one per non-banded input slot).
    pub gateways: u32,
    /// Weight tiles streamed in per iteration: 2 double-buffered (the next layer's load overlaps this
    /// layer's compute), 1 when only one fits.
    pub wbuf: u32,
}

/// Why a stage does not fit a region.
#[derive(Clone, Debug)]
pub(crate) struct Misfit {
    pub needed: u64,
    pub class: String,
    /// The region cannot hold the frame at all (too narrow or short).
    pub frame: bool,
    /// The SRAM fits but the algorithm needs this many colors at a router, more than it has (else 0).
    pub colors: u32,
}

pub(crate) fn wl(values: u64, eb: u64) -> u64 {
    (values * eb).div_ceil(4)
}

pub(crate) fn fmac(eb: u64) -> SimdOp {
    if eb >= 4 {
        SimdOp::FmacF32
    } else {
        SimdOp::FmacF16
    }
}
fn arith(eb: u64) -> SimdOp {
    if eb >= 4 {
        SimdOp::ArithF32
    } else {
        SimdOp::ArithF16
    }
}
fn mov(eb: u64) -> SimdOp {
    if eb >= 4 {
        SimdOp::Mov32
    } else {
        SimdOp::Mov16
    }
}

/// `n` split over `parts`: part i gets q + 1 for i < r, else q.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Split {
    pub q: u64,
    pub r: u64,
}

pub(crate) fn split(n: u64, parts: u64) -> Split {
    let parts = parts.max(1);
    Split { q: n / parts, r: n % parts }
}

impl Split {
    pub fn at(&self, i: u64) -> u64 {
        self.q + (i < self.r) as u64
    }
    pub fn max(&self) -> u64 {
        self.q + (self.r > 0) as u64
    }
}

/// A count split over the PEs of an `rows x cols` block in row-major order.
#[derive(Clone, Copy, Debug)]
struct Flat {
    s: Split,
    cols: u64,
}

impl Flat {
    fn new(n: u64, rows: u64, cols: u64) -> Flat {
        Flat { s: split(n, rows * cols), cols: cols.max(1) }
    }
    fn at(&self, r: u64, c: u64) -> u64 {
        self.s.at(r * self.cols + c)
    }
    /// Row class: 2 all big, 1 mixed, 0 all small.
    fn row_kind(&self, r: u64) -> u64 {
        let full = self.s.r / self.cols;
        if r < full {
            2
        } else if r == full && !self.s.r.is_multiple_of(self.cols) {
            1
        } else {
            0
        }
    }
    fn col_kind(&self, c: u64) -> u64 {
        (c < self.s.r % self.cols) as u64
    }
}

/// Two-level fan-in over `n` positions toward position n - 1: groups of `g`, each group's last
/// position is its leader; the last leader is the root.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FanIn {
    pub n: u64,
    pub g: u64,
}

impl FanIn {
    pub fn new(n: u64) -> FanIn {
        let mut g = 1;
        while g * g < n {
            g += 1;
        }
        FanIn { n, g: g.max(1) }
    }
    fn group(&self, i: u64) -> u64 {
        i / self.g
    }
    fn ngroups(&self) -> u64 {
        self.n.div_ceil(self.g)
    }
    fn leader_of(&self, i: u64) -> u64 {
        ((self.group(i) + 1) * self.g).min(self.n) - 1
    }
    fn is_leader(&self, i: u64) -> bool {
        self.leader_of(i) == i
    }
    fn group_size(&self, i: u64) -> u64 {
        let k = self.group(i);
        (((k + 1) * self.g).min(self.n)) - k * self.g
    }
    /// Role key of position i: (0 non-leader | 1 leader | 2 root, group size).
    fn role(&self, i: u64) -> (u64, u64) {
        let role = if i == self.n - 1 {
            2
        } else if self.is_leader(i) {
            1
        } else {
            0
        };
        (role, self.group_size(i))
    }
}

/// Per-stage facts the tiling needs beyond the stage itself.
#[derive(Clone, Debug, Default)]
pub(crate) struct StageIo {
    /// Value counts that every run must divide evenly (slots, outputs, stream slices).
    pub per_iter_values: Vec<(u64, u64)>,
    /// Gathered output slots (their results move to other stages or ports).
    pub gathered: Vec<bool>,
    /// Stored slots' iterations kept at once (1, or all the layers for data saved across loops).
    pub stored_copies: Vec<u64>,
}

fn is_grouped(st: &Stage) -> bool {
    match st.work {
        Work::Matmul { a, rows, k, .. } => st.inputs[a].values != rows * k,
        Work::Accum { x, rows, k, .. } => st.inputs[x].values != rows * k,
        _ => false,
    }
}

/// Candidate runs per iteration: powers of two dividing the streamed rows, with every stream's
/// per-run values a whole number of wavelets; largest first up to the target.
pub(crate) fn runs_candidates(st: &Stage, io: &StageIo) -> Vec<u32> {
    let rows = match st.work {
        Work::Matmul { no_split_k: true, .. } => return vec![1],
        _ if is_grouped(st) => return vec![1],
        // A MoE dispatch or combine moves rows by the routing of every token of the step: it runs once
        // over all of them (its region is made wide enough to hold them), never in token chunks.
        _ if st.routes_rows => return vec![1],
        Work::Matmul { rows, .. } | Work::Accum { rows, .. } => rows,
        Work::RowReduce { rows, .. } | Work::Elementwise { rows, .. } => rows,
        Work::Lookup { rows, .. } | Work::Relay { rows, .. } => rows,
        _ => return vec![1],
    };
    let soft = (MAX_REPEAT / st.iters.max(1)).max(1);
    let cap = (MAX_REPEAT_HARD / st.iters.max(1)).max(1);
    let mut out = Vec::new();
    let mut r = 1u32;
    while r <= cap && (rows % r as u64) == 0 {
        let ok = io.per_iter_values.iter().all(|&(v, eb)| {
            let per = r as u64 * if eb < 4 { 4 / eb } else { 1 };
            v % per == 0 || r == 1
        });
        if ok {
            out.push(r);
        }
        r *= 2;
    }
    if out.is_empty() {
        out.push(1);
    }
    // Preferred first: the largest at or below the target (and the soft cap), then larger ones
    // (smaller chunks, for SRAM).
    let best = out.iter().copied().filter(|&r| r <= TARGET_RUNS.min(soft)).max().unwrap_or(1);
    let mut order = vec![best];
    order.extend(out.iter().copied().filter(|&r| r > best));
    order
}

/// The narrowest width at which a stage's work on one PE row keeps pace with the streams it serves (one
/// wavelet per cycle), on a region of `h` rows; 1 for stages without such a limit.
/// - A row reduction spreads a row's values over the columns: a PE's share of the statistics (at the
///   SIMD rate) should take no longer than the input stream takes to arrive. Few rows per run (batch-1
///   decode: one row on one PE row) otherwise leave one PE computing a whole row's statistics while
///   its stream has long arrived.
/// - A lookup tree selects a token's row down the columns: every PE of a fan-in group streams its
///   share of the row (width / columns values) to the group's leader, and the leaders to the root, so
///   a leader takes in (group - 1) shares per token. With at least that many columns the selection
///   keeps pace with the row streaming out.
pub(crate) fn pace_width(st: &Stage, io: &StageIo, h: u32, k: &KCtx) -> u32 {
    if let Work::Lookup { width, .. } = st.work {
        let fan = FanIn::new(frame_for(st, io, 1, h).rc().max(1) as u64);
        let shares = (fan.g - 1).max(fan.ngroups() - 1).max(1);
        return shares.min(width.max(1)) as u32;
    }
    let Work::RowReduce { main, rows, width, per_elem, out, .. } = st.work else {
        return 1;
    };
    let runs = runs_candidates(st, io).first().copied().unwrap_or(1) as u64;
    let rr = rows.div_ceil(runs);
    let rc = frame_for(st, io, 1, h).rc().max(1) as u64;
    // The statistics pass (the elementwise pass comes after, on the output stream).
    let per_elem = if out.is_some() { per_elem.saturating_sub(1).max(1) } else { per_elem };
    let in_w = wl(rr * st.inputs[main].values.div_ceil(rows.max(1)), st.inputs[main].elem_bytes).max(1);
    let (elems, per) = k.pe.rate(arith(st.dtype_bytes));
    // Cycles of one PE row's statistics over the whole width: ceil(rr / rc) rows x width x per_elem.
    let cycles = (rr.div_ceil(rc) * width * per_elem * per).div_ceil(elems.max(1));
    cycles.div_ceil(in_w).clamp(1, width.max(1)) as u32
}

/// Bytes per PE of `bytes` spread over `pes` PEs.
fn share(bytes: u64, pes: u64) -> u64 {
    bytes.div_ceil(pes.max(1))
}

/// The frame a stage needs: an IO row for inputs when any slot streams in, one for outputs when any
/// output moves.
pub(crate) fn frame_for(st: &Stage, io: &StageIo, w: u32, h: u32) -> Frame {
    let io_in = !st.inputs.is_empty();
    let io_out = io.gathered.iter().any(|&g| g);
    Frame { w, h, io_in, io_out }
}

/// Internal colors of the stage's program on this algorithm.
fn algo_colors(algo: Algo, st: &Stage) -> u32 {
    match algo {
        // The single GEMV's two chained levels alternate two colors each.
        Algo::GemvTree if matches!(st.work, Work::SingleGemv { .. }) => 4,
        Algo::GemvTree if matches!(st.work, Work::Matmul { .. }) => 2 + (TREE_X_BANDS as u32 - 1),
        Algo::GemvTree | Algo::LookupTree => 2,
        Algo::RowReduce => {
            let extra = match st.work {
                Work::RowReduce { colsum, scalar, .. } => (colsum.is_some() || scalar.is_some()) as u32,
                _ => 0,
            };
            3 + extra
        }
        Algo::AllReduceTree => 13,
        Algo::Cannon => 8,
        Algo::Summa | Algo::GemvBroadcast | Algo::Elementwise | Algo::Local => 0,
    }
}

/// Whether a stage's tiling alternates its fan-in and gather colors by chunk parity (two chunks in
/// flight): a gemv-tree matmul of 2 to `PARITY_MAX_RUNS` runs. The program does so only where its
/// streamed operand comes through the input gateway in row bands (`Prog::parity`); the colors are
/// counted for every such tiling.
fn parity_algo(algo: Algo, st: &Stage, rep: u32) -> bool {
    algo == Algo::GemvTree && matches!(st.work, Work::Matmul { .. }) && (2..=PARITY_MAX_RUNS).contains(&rep)
}

/// Keeps the first fitting tiling, or the least bad misfit.
struct Chooser<'a> {
    st: &'a Stage,
    io: &'a StageIo,
    k: &'a KCtx,
    frame: Frame,
    gateways: u32,
    wbuf: u32,
    best: Option<Tiling>,
    worst: Misfit,
}

impl Chooser<'_> {
    fn consider(&mut self, algo: Algo, runs: u32, sram: u64, class: String, reason: String) {
        let gathered = self.io.gathered.iter().filter(|&&g| g).count() as u32;
        // Two gather colors per gathered output, and a credit color when the gather runs more than once;
        // a tree that alternates colors by chunk parity has a second pair per output and a second pair of
        // fan-in colors.
        let rep = runs.saturating_mul(self.st.iters);
        let par = parity_algo(algo, self.st, rep) as u32;
        let per_out = 2 + (rep > 1) as u32 + 2 * par;
        let colors = self.st.inputs.len() as u32 + algo_colors(algo, self.st) + per_out * gathered + 2 * par;
        if sram <= self.k.avail && colors <= self.k.colors {
            if self.best.is_none() {
                self.best = Some(Tiling {
                    frame: self.frame,
                    algo,
                    runs,
                    sram_max: sram,
                    reason,
                    gateways: self.gateways,
                    wbuf: self.wbuf,
                });
            }
        } else if sram < self.worst.needed || (sram <= self.k.avail && self.worst.needed == u64::MAX) {
            let fits = sram <= self.k.avail;
            self.worst = Misfit {
                needed: if fits { 0 } else { sram },
                class: if fits { format!("{}: {class}", algo.name()) } else { class },
                frame: false,
                colors: if fits { colors } else { 0 },
            };
        }
    }
    fn done(&self) -> bool {
        self.best.is_some()
    }
}

/// Chooses the algorithm and tiling of `st` on a `w x h` region; Err when it does not fit.
pub(crate) fn tile(st: &Stage, io: &StageIo, w: u32, h: u32, k: &KCtx) -> Result<Tiling, Misfit> {
    let frame = frame_for(st, io, w, h);
    let gateways = st.inputs.len() as u32;
    let min_h = frame.io_in as u32 + frame.io_out as u32 + 1;
    if h < min_h || w < gateways.max(1) {
        return Err(Misfit {
            needed: 0,
            class: format!("a region of at least {} x {min_h} PEs", gateways.max(1)),
            frame: true,
            colors: 0,
        });
    }
    let rc = frame.rc() as u64;
    let c = w as u64;
    let p = rc * c;
    let eb = st.dtype_bytes;
    let mut ch = Chooser {
        st,
        io,
        k,
        frame,
        gateways,
        wbuf: 1,
        best: None,
        worst: Misfit { needed: u64::MAX, class: String::new(), frame: false, colors: 0 },
    };
    // Stored slots kept on the compute block's PEs.
    let stored = |pes: u64| -> u64 {
        st.inputs
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.kind, SlotKind::Stored { .. }))
            .map(|(i, s)| share(s.values * s.elem_bytes * io.stored_copies.get(i).copied().unwrap_or(1), pes))
            .sum()
    };
    let held_share = |pes: u64, skip: Option<usize>| -> u64 {
        st.held.iter().enumerate().filter(|(i, _)| Some(*i) != skip).map(|(_, h)| share(h.bytes * h.copies, pes)).sum()
    };
    // Live inputs other than the paced one land in SRAM as they arrive. A join waits for its slowest
    // branch, so the early inputs are buffered for a whole iteration (every run in flight).
    let live_other = |_runs: u64, main: Option<usize>, pes: u64| -> u64 {
        st.inputs
            .iter()
            .enumerate()
            .filter(|(i, s)| s.kind == SlotKind::Live && Some(*i) != main)
            .map(|(_, s)| share(s.values * s.elem_bytes, pes))
            .sum()
    };
    // Small weights (norm scales, biases) streamed in whole to every PE.
    let small_weights = |skip: Option<usize>| -> u64 {
        st.inputs
            .iter()
            .enumerate()
            .filter(|(i, s)| s.kind == SlotKind::Weights && Some(*i) != skip)
            .map(|(_, s)| 2 * share(s.values * s.elem_bytes, c))
            .sum()
    };
    let runs_list = runs_candidates(st, io);
    match st.work.clone() {
        Work::Matmul { a, b, fresh, rows, k: kk, cols, no_split_k, .. } => {
            let wslot = match b {
                Operand::Slot(s) if st.inputs[s].kind == SlotKind::Weights => Some(s),
                _ => None,
            };
            let b_held = match b {
                Operand::Held(h) => Some(h),
                _ => None,
            };
            // A stationary operand that is not a weight tile (a KV cache), all copies.
            let b_other = match b {
                Operand::Held(h) if st.held[h].kind != HeldKind::Weight => st.held[h].bytes * st.held[h].copies,
                _ => 0,
            };
            // Columns of the resident weight: a grouped (expert) linear computes the `cols` of the experts
            // that received tokens, but which experts those are is known only at run time, so every
            // expert's columns stay resident (`weight_groups x n`), spread over the region like the rest.
            let wcols = match b_held {
                Some(h) if st.held[h].kind == HeldKind::Weight => (st.held[h].bytes / (kk * eb).max(1)).max(cols),
                _ => cols,
            };
            let resident = |per: u64| {
                if wcols > cols {
                    format!("; every expert's columns stay resident ({} of {wcols} per PE)", per)
                } else {
                    String::new()
                }
            };
            // Double-buffered weight tiles for a loop when they fit, else single.
            let wbufs: &[u32] = if wslot.is_some() && st.iters > 1 { &[2, 1] } else { &[1] };
            'search: for &runs in &runs_list {
                for &wbuf in wbufs {
                    ch.wbuf = wbuf;
                    let rr = rows.div_ceil(runs as u64);
                    let fresh_b = fresh.map_or(0, |f| 2 * share(st.inputs[f].values * eb, p));
                    let common = stored(p)
                        + held_share(p, b_held)
                        + live_other(runs as u64, Some(a), p)
                        + small_weights(wslot)
                        + fresh_b;
                    // Broadcast: every PE owns whole-k columns; no reduction.
                    let s3 = split(cols, p);
                    let tile_b = if b_other > 0 { share(b_other, p) } else { kk * split(wcols, p).max() * eb };
                    // The output block accumulates over k in fp32 until the run sends it.
                    let bcast = wbuf as u64 * tile_b + rr * s3.max() * ACC_BYTES + common;
                    let bcast_ok = no_split_k || s3.q > 0;
                    if bcast_ok && bcast <= k.avail {
                        ch.consider(
                            Algo::GemvBroadcast,
                            runs,
                            bcast,
                            format!("compute PE (tile {} x {}, {} rows per run)", kk, s3.max(), rr),
                            format!(
                                "every PE owns whole-k columns ({} x {}) and gets the streamed rows by multicast: \
                                 results need no reduction{}",
                                kk,
                                s3.max(),
                                resident(split(wcols, p).max())
                            ),
                        );
                        break 'search;
                    }
                    // Tree: k over the rows, columns over the columns, partial sums reduced down columns.
                    let tr = Tree::new(rc);
                    if !no_split_k && rc > 1 && kk >= tr.compute_rows() {
                        let kr = split(kk, tr.compute_rows());
                        let nc = split(cols, c);
                        let tile_t =
                            if b_other > 0 { share(b_other, p) } else { kr.max() * split(wcols, c).max() * eb };
                        let fan = FanIn { n: rc, g: tr.g };
                        // Compute PEs stream their partial sums out as they finish each row (two fp32 rows).
                        let tree = wbuf as u64 * tile_t + 2 * nc.max() * ACC_BYTES + common;
                        let why = if bcast_ok {
                            format!("whole-k columns ({} x {}) do not fit", kk, s3.max())
                        } else {
                            format!("{cols} columns for {p} PEs")
                        };
                        ch.consider(
                            Algo::GemvTree,
                            runs,
                            tree,
                            format!("compute PE (tile {} x {}, {} rows per run)", kr.max(), nc.max(), rr),
                            format!(
                                "{why}: k split over {} rows, partial sums ({rr} x {}) stream down the columns to \
                                 reducers in a two-level tree (groups of {}) and to the root{}",
                                tr.compute_rows(),
                                nc.max(),
                                fan.g,
                                resident(split(wcols, c).max())
                            ),
                        );
                    } else {
                        // Few columns and a short contraction: whole-k columns, some PEs idle.
                        ch.consider(
                            Algo::GemvBroadcast,
                            runs,
                            bcast,
                            format!("compute PE (tile {} x {}, {} rows per run)", kk, s3.max(), rr),
                            format!(
                                "every PE that has columns owns whole-k columns ({kk} x {}); with {cols} columns for \
                                 {p} PEs and k = {kk} too short to split, the rest of the region idles",
                                s3.max()
                            ),
                        );
                    }
                    if ch.done() {
                        break 'search;
                    }
                }
            }
        }
        Work::Accum { x, dy, rows, k: kk, cols, bias_out, .. } => {
            for &runs in &runs_list {
                let rr = rows.div_ceil(runs as u64);
                let kr = split(kk, rc);
                let nc = split(cols, c);
                // The dW block (and, on the grid's first row, db) accumulates in fp32 over the step.
                let acc = (kr.max() * nc.max() + bias_out.map_or(0, |_| nc.max())) * ACC_BYTES;
                let xs = match st.inputs[x].kind {
                    SlotKind::Stored { .. } => rows * kr.max() * eb * io.stored_copies.get(x).copied().unwrap_or(1),
                    _ => 2 * rr * kr.max() * eb,
                };
                let dys = match st.inputs[dy].kind {
                    SlotKind::Stored { .. } => rows * nc.max() * eb * io.stored_copies.get(dy).copied().unwrap_or(1),
                    _ if bias_out.is_some() => rr * nc.max() * eb,
                    _ => 0,
                };
                let sram = acc + xs + dys;
                ch.consider(
                    Algo::Summa,
                    runs,
                    sram,
                    format!("compute PE (block {} x {}, {} rows per run)", kr.max(), nc.max(), rr),
                    format!(
                        "contraction over the {rows} streamed rows: every PE accumulates its output block ({} x {}), \
                         both operands' panels multicast to it",
                        kr.max(),
                        nc.max()
                    ),
                );
                if ch.done() {
                    break;
                }
            }
        }
        Work::RowReduce { rows, width, colsum, .. } => {
            let ce = c.min(width).max(1);
            for &runs in &runs_list {
                let rr = rows.div_ceil(runs as u64);
                let tr = split(rr, rc);
                let wc = split(width, ce);
                let slice = tr.max() * wc.max() * eb;
                let cs = colsum.map_or(0, |o| 4 * wc.max() * st.outputs[o].values.div_ceil(width.max(1)));
                // The paced input kept until the elementwise pass, the output, the statistics.
                let sram = 2 * slice
                    + live_other(runs as u64, None, rc * ce)
                    + tr.max() * 8
                    + cs
                    + stored(rc * ce)
                    + held_share(rc, None).min(8 * wc.max() * eb)
                    + small_weights(None).min(4 * wc.max() * eb);
                let fan = FanIn::new(ce);
                ch.consider(
                    Algo::RowReduce,
                    runs,
                    sram,
                    format!("compute PE ({} rows x {} columns per run)", tr.max(), wc.max()),
                    format!(
                        "rows over {rc} PE rows, each row's {width} values over {ce} PEs; partial statistics reduce \
                         west in fan-in groups of {} and the result comes back by multicast",
                        fan.g
                    ),
                );
                if ch.done() {
                    break;
                }
            }
        }
        Work::Elementwise { main, rows, width, accumulate, .. } => {
            for &runs in &runs_list {
                let outs: u64 = st.outputs.iter().map(|o| share(o.values * o.elem_bytes / runs as u64, p)).sum();
                let acc = if accumulate { st.outputs.iter().map(|o| share(o.values * ACC_BYTES, p)).sum() } else { 0 };
                let main_buf =
                    main.map_or(0, |m| share(st.inputs[m].values * st.inputs[m].elem_bytes / runs as u64, p));
                let sram = main_buf
                    + live_other(runs as u64, main, p)
                    + outs
                    + acc
                    + stored(p)
                    + held_share(p, None)
                    + small_weights(None);
                ch.consider(
                    Algo::Elementwise,
                    runs,
                    sram,
                    format!("compute PE ({} elements per run)", (rows * width / runs as u64).div_ceil(p)),
                    format!("{} elements per run spread over {p} PEs", rows * width / runs as u64),
                );
                if ch.done() {
                    break;
                }
            }
        }
        Work::Relay { rows, width, .. } => {
            for &runs in &runs_list {
                let v = rows * width / runs as u64;
                ch.consider(
                    Algo::Elementwise,
                    runs,
                    2 * share(v * eb, p),
                    "compute PE".into(),
                    "rows looked up in MemoryX stream in and on (a relay)".into(),
                );
                if ch.done() {
                    break;
                }
            }
        }
        Work::Lookup { rows, width, .. } => {
            for &runs in &runs_list {
                let rr = rows.div_ceil(runs as u64);
                let wc = split(width, c);
                // The table is tiled as the program reads it: PE (r, c) holds vocabulary rows
                // `split(vocab, rc)` r and columns `split(width, c)` c, so the largest tile is the
                // larger share of both splits (more than an even share when they do not divide).
                let row_bytes = (width * eb).max(1);
                let table: u64 = st
                    .held
                    .iter()
                    .map(|h| split(h.bytes.div_ceil(row_bytes), rc).max() * wc.max() * eb * h.copies)
                    .sum();
                let sram = table + 2 * rr * wc.max() * eb;
                let fan = FanIn::new(rc);
                ch.consider(
                    Algo::LookupTree,
                    runs,
                    sram,
                    format!("compute PE (table share, {rr} rows per run)"),
                    format!(
                        "the table split over {rc} rows x {c} columns; each token's row is selected down the columns \
                         (fan-in groups of {})",
                        fan.g
                    ),
                );
                if ch.done() {
                    break;
                }
            }
        }
        Work::SingleGemv { k: kk, n } => {
            // Rows beyond k and columns beyond n would have nothing to do: they stay idle.
            let (rc, c) = (rc.min(kk), c.min(n));
            let kr = split(kk, rc);
            let nc = split(n, c);
            // The tile, x's slice, an arriving partial, and the fp32 partial sum.
            let sram = (kr.max() * nc.max() + kr.max() + nc.max()) * eb + nc.max() * ACC_BYTES;
            let fan = FanIn::new(rc);
            ch.consider(
                Algo::GemvTree,
                1,
                sram,
                format!("compute PE (tile {} x {})", kr.max(), nc.max()),
                format!(
                    "x pre-placed on every PE of its row; k split over {rc} rows, n over {c} columns; partial sums \
                     reduce down the columns in a two-level tree of chains (MeshGEMV, K = 2): groups of {} rows, \
                     then the groups' leaders",
                    fan.g
                ),
            );
        }
        Work::SingleGemm { m, n, k: kk } => {
            // A square grid no larger than any dimension: every block has work.
            let q = rc.min(c).min(m).min(n).min(kk);
            let (mi, nj, kb) = (split(m, q), split(n, q), kk.div_ceil(q));
            // A and B blocks double-buffered for the shifts, C accumulating in fp32.
            let sram = (mi.max() * kb * 2 + kb * nj.max() * 2) * eb + mi.max() * nj.max() * ACC_BYTES;
            ch.consider(
                Algo::Cannon,
                1,
                sram,
                format!("compute PE (blocks {} x {} x {})", mi.max(), kb, nj.max()),
                format!("square {q} x {q} grid: A and B blocks shift through interleaved rings (at most two hops per step), C stays put"),
            );
        }
        Work::SingleAdd { n } => {
            ch.consider(
                Algo::Local,
                1,
                3 * share(n * eb, p),
                "compute PE".into(),
                "operands pre-placed: each PE adds its slice".into(),
            );
        }
        Work::AllReduce { elems } => {
            ch.consider(
                Algo::AllReduceTree,
                1,
                2 * elems * eb,
                "compute PE (the whole buffer)".into(),
                "every PE holds the buffer: rows reduce toward the centre column and it toward the centre PE, \
                 from both sides; the sum is multicast back"
                    .into(),
            );
        }
    }
    match ch.best {
        Some(t) => Ok(t),
        None => Err(ch.worst),
    }
}

// ---------------------------------------------------------------------------------------------
// Programs
// ---------------------------------------------------------------------------------------------

/// One stream feeding an input slot (or one band of a banded weight slot).
#[derive(Clone, Debug)]
pub(crate) struct Feed {
    pub color: ColorId,
    /// Wavelets per sender run.
    pub wavelets: u64,
    pub repeat: u32,
    /// For a banded weight slot: the band.
    pub band: usize,
    /// Colors on which the gateway forwards the same stream to the next consumer (a daisy chain).
    pub fwd: Vec<ColorId>,
    /// The port multicasts straight into the compute block on the feed's color (no gateway relay).
    pub direct: bool,
}

/// One destination of an output slot.
#[derive(Clone, Debug)]
pub(crate) struct Dest {
    pub color: ColorId,
    /// The graph tensor the destination takes (a slice of the output for a view), for the data table.
    pub tensor: Option<crate::graph::TensorId>,
    pub wavelets: u64,
    pub runs: Option<RunRange>,
    pub band: usize,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct OutIface {
    pub gathered: bool,
    /// Column bands [c0, c1) of the output's gather (one band unless it leaves through several ports).
    pub bands: Vec<(u32, u32)>,
    pub dests: Vec<Dest>,
}

/// A region's connections to the outside, filled in by routing.
#[derive(Clone, Debug, Default)]
pub(crate) struct Iface {
    pub feeds: Vec<Vec<Feed>>,
    /// Bands of the banded weight slot: column ranges, or (with `wband_rows`) compute-row ranges.
    pub wbands: Vec<(u32, u32)>,
    pub wband_rows: bool,
    pub wslot: Option<usize>,
    pub outs: Vec<OutIface>,
}

/// A region's program, in absolute coordinates, with templates local to the region.
#[derive(Clone, Debug, Default)]
pub(crate) struct RegionCode {
    pub templates: Vec<(String, Vec<Task>, u64)>,
    /// Receive FIFOs of the templates that have them, by template index.
    pub fifos: BTreeMap<usize, Vec<Fifo>>,
    pub tiles: Vec<(Rect, usize)>,
    pub routes: Vec<Route>,
}

fn send(color: ColorId, wavelets: u64, streamed: bool) -> Send {
    Send { color, wavelets, streamed, runs: None }
}

#[allow(clippy::too_many_arguments)]
fn task(
    name: &str,
    needs: Vec<Need>,
    op: SimdOp,
    elems: u64,
    paced: Option<ColorId>,
    sends: Vec<Send>,
    repeat: u32,
    flops: u64,
) -> Task {
    Task { name: name.to_string(), needs, work: crate::mesh::Work { op, elems, paced_by: paced }, sends, repeat, flops }
}

fn done(t: usize, times: u32) -> Need {
    Need::Done { task: TaskIdx(t as u32), times }
}

fn after(t: usize, first: i64, num: u64, den: u64) -> Need {
    Need::After { task: TaskIdx(t as u32), first, num, den }
}

fn recv(c: ColorId, w: u64) -> Need {
    Need::Recv { color: c, wavelets: w }
}

/// Run-length encodes kinds: (start, end, kind).
fn rle<K: Clone + PartialEq>(kinds: &[K]) -> Vec<(u32, u32, K)> {
    let mut out: Vec<(u32, u32, K)> = Vec::new();
    for (i, k) in kinds.iter().enumerate() {
        match out.last_mut() {
            Some(last) if last.2 == *k => last.1 = i as u32 + 1,
            _ => out.push((i as u32, i as u32 + 1, k.clone())),
        }
    }
    out
}

/// Builds a region's program: PE classes by (row kind, column kind), tiles as products of runs.
pub(crate) struct Prog<'a> {
    pub st: &'a Stage,
    pub t: &'a Tiling,
    pub rect: Rect,
    pub iface: &'a Iface,
    pub iters: u32,
    pub code: RegionCode,
    template_of: BTreeMap<(Vec<u64>, Vec<u64>), Option<usize>>,
    /// Tasks of the output row's PEs (every output's relays and gateways), by column.
    out_row: BTreeMap<u32, Vec<Task>>,
    /// A slot delivered by row bands, each band only its slice (gemv-tree's streamed operand).
    xsplit: Option<XSplit>,
}

/// A streamed slot whose gateway sends each band of compute-block rows only the slice it uses.
#[derive(Clone, Debug)]
struct XSplit {
    slot: usize,
    /// (first row, end row, color, wavelets per run) of each band, rows of the compute block.
    bands: Vec<(u32, u32, ColorId, u64)>,
}

impl XSplit {
    fn band_of(&self, r: u32) -> usize {
        self.bands.iter().position(|b| r >= b.0 && r < b.1).unwrap_or(0)
    }
}

/// Tasks of one PE, built in order; indices are the task list positions.
#[derive(Default)]
struct Pe {
    tasks: Vec<Task>,
    sram: u64,
    fifos: Vec<Fifo>,
}

impl Pe {
    fn push(&mut self, t: Task) -> usize {
        self.tasks.push(t);
        self.tasks.len() - 1
    }
}

impl<'a> Prog<'a> {
    /// `iters`: the iterations to emit (the stage's, or fewer for a cut loop, `lower::LoopCut`).
    pub fn new(st: &'a Stage, t: &'a Tiling, rect: Rect, iface: &'a Iface, iters: u32) -> Prog<'a> {
        Prog {
            st,
            t,
            rect,
            iface,
            iters,
            code: RegionCode::default(),
            template_of: BTreeMap::new(),
            out_row: BTreeMap::new(),
            xsplit: None,
        }
    }

    /// Emits the output row: one template per distinct task list, tiles over runs of equal columns.
    fn finish(&mut self) {
        if self.out_row.is_empty() {
            return;
        }
        let hy = self.f().h - 1;
        let cols: Vec<(u32, Vec<Task>)> = std::mem::take(&mut self.out_row).into_iter().collect();
        let mut i = 0;
        while i < cols.len() {
            let mut j = i + 1;
            while j < cols.len() && cols[j].0 == cols[j - 1].0 + 1 && cols[j].1 == cols[i].1 {
                j += 1;
            }
            self.code.templates.push((format!("{}.out", self.st.name), cols[i].1.clone(), 0));
            let t = self.code.templates.len() - 1;
            self.code.tiles.push((self.rect_abs(hy, cols[i].0, 1, cols[j - 1].0 - cols[i].0 + 1), t));
            i = j;
        }
    }

    fn f(&self) -> Frame {
        self.t.frame
    }
    fn eb(&self) -> u64 {
        self.st.dtype_bytes
    }
    /// Multicast color of input slot s.
    fn mc(&self, s: usize) -> ColorId {
        ColorId(s as u32)
    }
    /// The color compute PEs receive slot s on: the slot's multicast, or the port's own color when a
    /// port multicasts straight into the compute block.
    fn rc(&self, s: usize) -> ColorId {
        match self.iface.feeds.get(s).map(|f| f.as_slice()) {
            Some([f]) if f.direct => f.color,
            _ => self.mc(s),
        }
    }
    fn algo_base(&self) -> u32 {
        self.st.inputs.len() as u32
    }
    fn ac(&self, i: u32) -> ColorId {
        ColorId(self.algo_base() + i)
    }
    /// Gather colors (down the column, west along the out row) of output o.
    fn gc(&self, o: usize) -> (ColorId, ColorId) {
        let base = self.algo_base() + algo_colors(self.t.algo, self.st);
        let idx = self.iface.outs[..o].iter().filter(|x| x.gathered).count() as u32;
        (ColorId(base + 2 * idx), ColorId(base + 2 * idx + 1))
    }
    /// Credit color of output o's gather (after every gathered output's two gather colors).
    fn kc(&self, o: usize) -> ColorId {
        let base = self.algo_base() + algo_colors(self.t.algo, self.st);
        let n = self.iface.outs.iter().filter(|x| x.gathered).count() as u32;
        let idx = self.iface.outs[..o].iter().filter(|x| x.gathered).count() as u32;
        ColorId(base + 2 * n + idx)
    }
    /// Second gather colors (odd and even chunks alternate) of output o, after every credit color.
    fn gc_b(&self, o: usize) -> (ColorId, ColorId) {
        let base = self.algo_base() + algo_colors(self.t.algo, self.st);
        let n = self.iface.outs.iter().filter(|x| x.gathered).count() as u32;
        let idx = self.iface.outs[..o].iter().filter(|x| x.gathered).count() as u32;
        (ColorId(base + 3 * n + 2 * idx), ColorId(base + 3 * n + 2 * idx + 1))
    }
    /// Second fan-in colors of a tree (to the leaders, to the root) for even chunks, after the gathers'.
    fn tc_b(&self) -> (ColorId, ColorId) {
        let base = self.algo_base() + algo_colors(self.t.algo, self.st);
        let n = self.iface.outs.iter().filter(|x| x.gathered).count() as u32;
        (ColorId(base + 5 * n), ColorId(base + 5 * n + 1))
    }
    /// Whether this tree alternates its colors by chunk parity: counted for the tiling, its operand
    /// relayed by the input gateway in row bands (so the gateway can hold chunk n + 2 back until the
    /// output has taken chunk n), and every gathered output in one band.
    fn parity(&self) -> bool {
        parity_algo(self.t.algo, self.st, self.repeat(self.t.runs))
            && self.xsplit.is_some()
            && self.iface.outs.iter().all(|o| !o.gathered || o.bands.len() == 1)
    }
    fn repeat(&self, runs_per_iter: u32) -> u32 {
        runs_per_iter * self.iters
    }
    fn rect_abs(&self, y: u32, x: u32, h: u32, w: u32) -> Rect {
        Rect { x: self.rect.x + x, y: self.rect.y + y, w, h }
    }
    fn route(&mut self, color: ColorId, senders: Rect, pattern: Pattern) {
        self.code.routes.push(Route { color, senders: Senders::Pes(senders), pattern, relays: 0 });
    }

    /// Adds tiles for the region rows `ys` (absolute row offsets within the region) with row kinds and
    /// column kinds; `make` returns a PE's tasks (None: no tile).
    fn grid<F>(&mut self, y0: u32, row_kinds: &[Vec<u64>], col_kinds: &[Vec<u64>], tag: &str, mut make: F)
    where
        F: FnMut(&Self, &[u64], &[u64]) -> Option<(String, Pe)>,
    {
        let rows = rle(row_kinds);
        let cols = rle(col_kinds);
        for (ra, rb, rk) in &rows {
            for (ca, cb, ck) in &cols {
                let key = ([vec![tag.len() as u64], rk.clone()].concat(), ck.clone());
                let key = (key.0.into_iter().chain(tag.bytes().map(|b| b as u64)).collect(), key.1);
                let tid = match self.template_of.get(&key) {
                    Some(t) => *t,
                    None => {
                        let made = make(self, rk, ck);
                        let t = made.map(|(name, pe)| {
                            self.code.templates.push((name, pe.tasks, pe.sram));
                            let t = self.code.templates.len() - 1;
                            if !pe.fifos.is_empty() {
                                self.code.fifos.insert(t, pe.fifos);
                            }
                            t
                        });
                        self.template_of.insert(key, t);
                        t
                    }
                };
                if let Some(t) = tid {
                    let r = self.rect_abs(y0 + ra, *ca, rb - ra, cb - ca);
                    self.code.tiles.push((r, t));
                }
            }
        }
    }

    /// Per-run wavelets a compute PE receives on slot s's multicast (its own granularity).
    fn slot_w(&self, s: usize, runs: u32) -> u64 {
        let sl = &self.st.inputs[s];
        wl(sl.values / runs.max(1) as u64, sl.elem_bytes)
    }

    /// The input row: gateways relaying each slot's feeds into its multicast; band relays.
    fn in_row(&mut self) {
        if !self.f().io_in {
            return;
        }
        let f = self.f();
        let rc = f.rc();
        for s in 0..self.st.inputs.len() {
            let banded = self.iface.wslot == Some(s) && self.iface.wbands.len() > 1;
            if banded {
                continue;
            }
            let col = s as u32;
            let xs = self.xsplit.clone().filter(|x| x.slot == s);
            let mut pe = Pe::default();
            for (i, feed) in self.iface.feeds[s].iter().enumerate().filter(|(_, f)| !f.direct) {
                let sl = &self.st.inputs[s];
                let to_block: Vec<Send> = match &xs {
                    Some(x) => x.bands.iter().map(|b| send(b.2, b.3, true)).collect(),
                    None => vec![send(self.mc(s), feed.wavelets, true)],
                };
                pe.push(task(
                    &format!("in{s}.{i}"),
                    vec![recv(feed.color, feed.wavelets)],
                    mov(sl.elem_bytes),
                    feed.wavelets * 4 / sl.elem_bytes.max(1),
                    Some(feed.color),
                    to_block.into_iter().chain(feed.fwd.iter().map(|&c| send(c, feed.wavelets, true))).collect(),
                    feed.repeat,
                    0,
                ));
            }
            if pe.tasks.is_empty() {
                continue;
            }
            self.code.templates.push((format!("{}.in{s}", self.st.name), pe.tasks, 0));
            let t = self.code.templates.len() - 1;
            self.code.tiles.push((self.rect_abs(0, col, 1, 1), t));
            let r = self.rect_abs(0, col, 1, 1);
            match xs {
                Some(x) => {
                    for (r0, r1, color, _) in x.bands {
                        self.route(
                            color,
                            r,
                            Pattern::Rect { dx: -(col as i32), dy: 1 + r0 as i32, w: f.w, h: r1 - r0 },
                        );
                    }
                }
                None => self.route(self.mc(s), r, Pattern::Rect { dx: -(col as i32), dy: 1, w: f.w, h: rc }),
            }
        }
        if let Some(ws) = self.iface.wslot {
            if self.iface.wbands.len() > 1 {
                for (j, &(c0, c1)) in self.iface.wbands.clone().iter().enumerate() {
                    let col = c1 - 1;
                    let mut pe = Pe::default();
                    for feed in self.iface.feeds[ws].iter().filter(|fd| fd.band == j && !fd.direct) {
                        let eb = self.st.inputs[ws].elem_bytes;
                        pe.push(task(
                            &format!("w{ws}.band{j}"),
                            vec![recv(feed.color, feed.wavelets)],
                            mov(eb),
                            feed.wavelets * 4 / eb.max(1),
                            Some(feed.color),
                            vec![send(self.mc(ws), feed.wavelets, true)],
                            feed.repeat,
                            0,
                        ));
                    }
                    if pe.tasks.is_empty() {
                        continue;
                    }
                    self.code.templates.push((format!("{}.wband{j}", self.st.name), pe.tasks, 0));
                    let t = self.code.templates.len() - 1;
                    self.code.tiles.push((self.rect_abs(0, col, 1, 1), t));
                    let r = self.rect_abs(0, col, 1, 1);
                    self.route(self.mc(ws), r, Pattern::Rect { dx: c0 as i32 - col as i32, dy: 1, w: c1 - c0, h: rc });
                }
            }
        }
    }

    /// The color and per-iteration wavelets a compute PE of weight band `band` receives slot s on: its
    /// band's port (direct) or the slot's multicast.
    fn weight_feed(&self, s: usize, band: usize) -> (ColorId, u64) {
        let banded = self.iface.wslot == Some(s) && self.iface.wbands.len() > 1;
        let b = if banded { band } else { 0 };
        match self.iface.feeds[s].iter().find(|f| f.band == b) {
            Some(f) if f.direct => (f.color, f.wavelets),
            Some(f) if banded => (self.mc(s), f.wavelets),
            _ => (self.mc(s), self.slot_w(s, 1)),
        }
    }

    /// Weight band of compute row r (row bands), else 0.
    fn wband_r(&self, r: u32) -> usize {
        if !self.iface.wband_rows {
            return 0;
        }
        self.iface.wbands.iter().position(|&(a, b)| r >= a && r < b).unwrap_or(0)
    }

    /// Weight band of column c (column bands), else 0.
    fn wband_c(&self, c: u32) -> usize {
        if self.iface.wband_rows {
            return 0;
        }
        self.iface.wbands.iter().position(|&(a, b)| c >= a && c < b).unwrap_or(0)
    }

    /// Input tasks common to every working compute PE, before its compute chain: weight loads, stores,
    /// refreshes. Returns (task indices of weight loads, stores) and the needs the first compute task
    /// must add, given the index the first compute task will have.
    /// The tasks and needs of the inputs other than `main`. `fifo_runs`: the runs of each other live
    /// input that the tiling's SRAM holds (a join's early input waits there for the late one; the
    /// PE's program declares the FIFO so that the fabric does not hold those runs back).
    fn inputs_pre(
        &self,
        pe: &mut Pe,
        main: Option<usize>,
        runs: u32,
        band: usize,
        tile_values: u64,
        fifo_runs: u32,
    ) -> PreInputs {
        let st = self.st;
        let mut pre = PreInputs::default();
        for (s, sl) in st.inputs.iter().enumerate() {
            if Some(s) == main {
                continue;
            }
            match sl.kind {
                SlotKind::Weights => {
                    let (color, w) = self.weight_feed(s, band);
                    let i = pe.push(task(
                        &format!("wload{s}"),
                        vec![recv(color, w)],
                        mov(sl.elem_bytes),
                        tile_values,
                        None,
                        vec![],
                        self.iters,
                        0,
                    ));
                    pre.wloads.push(i);
                }
                SlotKind::Stored { all } => {
                    let iters_fed = self.fed_iters(s);
                    let w = self.slot_w(s, runs);
                    let rep = iters_fed * runs;
                    let i = pe.push(task(
                        &format!("store{s}"),
                        vec![recv(self.rc(s), w)],
                        mov(sl.elem_bytes),
                        w * 4 / sl.elem_bytes,
                        None,
                        vec![],
                        rep,
                        0,
                    ));
                    pre.stores.push((i, all, rep));
                }
                SlotKind::Refresh => {
                    let w = self.slot_w(s, 1);
                    pe.push(task(
                        &format!("refresh{s}"),
                        vec![recv(self.rc(s), w)],
                        mov(sl.elem_bytes),
                        tile_values,
                        None,
                        vec![],
                        1,
                        0,
                    ));
                }
                SlotKind::Live => {
                    pre.live.push(s);
                    if fifo_runs > 1 {
                        pe.fifos.push(Fifo { color: self.rc(s), runs: fifo_runs });
                    }
                }
            }
        }
        pre
    }

    /// Iterations of the stage for which slot s receives data (all, or fewer for data saved ahead).
    fn fed_iters(&self, s: usize) -> u32 {
        // Feeds count sender runs; convert to iterations via the per-iteration wavelets.
        let sl = &self.st.inputs[s];
        let per_iter = wl(sl.values, sl.elem_bytes).max(1);
        let total: u64 = self.iface.feeds[s].iter().map(|f| f.wavelets * f.repeat as u64).sum();
        (total / per_iter).max(1) as u32
    }

    /// The needs the first compute task of a run adds for the pre-inputs: live non-paced receives,
    /// weight loads (one per iteration), stores.
    fn pre_needs(&self, pre: &PreInputs, runs: u32) -> Vec<Need> {
        let mut needs = Vec::new();
        for &s in &pre.live {
            needs.push(recv(self.rc(s), self.slot_w(s, runs)));
        }
        for &w in &pre.wloads {
            needs.push(after(w, 1, 1, runs as u64));
        }
        for &(i, all, rep) in &pre.stores {
            if all {
                needs.push(after(i, rep as i64, 0, 1));
            } else {
                needs.push(done(i, 1));
            }
        }
        needs
    }

    /// Gates the weight loads of `pre` on the compute chain's last task (double buffering) and returns
    /// the chain's start gate on its own end (the next run waits for the previous to finish).
    fn gate_pre(&self, pe: &mut Pe, pre: &PreInputs, last: usize, runs: u32) {
        // The load of iteration n waits until the compute has finished iteration n - wbuf.
        let ahead = (self.t.wbuf.max(1) as i64 - 1) * runs as i64;
        for &w in &pre.wloads {
            pe.tasks[w].needs.push(after(last, -ahead, runs as u64, 1));
        }
    }

    /// A drain PE: consumes every multicast delivered to the compute block without work.
    fn drain(&self, band: usize, runs: u32) -> Pe {
        self.drain_row(band, runs, None)
    }

    /// The slot, color and per-run wavelets the rows of row band `xb` receive the split slot on.
    fn xfeed(&self, xb: usize) -> Option<(usize, ColorId, u64)> {
        self.xsplit.as_ref().map(|x| {
            let b = &x.bands[xb];
            (x.slot, b.2, b.3)
        })
    }

    /// A drain PE of the rows of row band `xb` of a split slot (None: rows that get every slot whole).
    fn drain_row(&self, band: usize, runs: u32, xb: Option<usize>) -> Pe {
        let st = self.st;
        let xf = xb.and_then(|b| self.xfeed(b));
        let mut pe = Pe::default();
        for (s, sl) in st.inputs.iter().enumerate() {
            let mut color = self.rc(s);
            let (mut w, rep) = match sl.kind {
                SlotKind::Weights => {
                    let (c, w) = self.weight_feed(s, band);
                    color = c;
                    (w, self.iters)
                }
                SlotKind::Refresh => (self.slot_w(s, 1), 1),
                SlotKind::Stored { .. } => (self.slot_w(s, runs), self.fed_iters(s) * runs),
                SlotKind::Live => (self.slot_w(s, runs), self.repeat(runs)),
            };
            if let Some((_, c, xw)) = xf.filter(|x| x.0 == s) {
                (color, w) = (c, xw);
            }
            if w == 0 {
                continue;
            }
            // Not paced: the PE never waits on a stream it only drains.
            pe.push(task(&format!("drain{s}"), vec![recv(color, w)], mov(sl.elem_bytes), 0, None, vec![], rep, 0));
        }
        pe
    }

    /// The output row and the gather routes for output o: `vals(r, c)` is what compute PE (r, c) sends
    /// per output run, `out_runs` the output's runs per iteration, `rows` the compute rows that send.
    fn gather(&mut self, o: usize, out_runs: u32, rows: &[u32], vals: &dyn Fn(u32, u32) -> u64) {
        let oi = self.iface.outs[o].clone();
        if !oi.gathered {
            return;
        }
        let f = self.f();
        let eb = self.st.outputs[o].elem_bytes;
        let rep = self.repeat(out_runs);
        // Colors by chunk parity: odd runs on the first, even runs on the second (the same when the
        // gather does not alternate).
        let par = self.parity() && rep == self.repeat(self.t.runs);
        let (g1, g0) = self.gc(o);
        let (g1b, g0b) = if par { self.gc_b(o) } else { (g1, g0) };
        let hy = f.h - 1;
        // Column-to-row routes: every sending row, per band: the band's first column steps one east
        // then down (so the gateway only receives on g0); the others go straight down.
        for &r in rows {
            let y = f.row0() + r;
            for &(c0, c1) in &oi.bands {
                for g in if par { vec![g1, g1b] } else { vec![g1] } {
                    if c1 - c0 > 1 {
                        let r0 = self.rect_abs(y, c0, 1, 1);
                        self.route(g, r0, Pattern::To { dx: 1, dy: (hy - y) as i32 });
                        let rr = self.rect_abs(y, c0 + 1, 1, c1 - c0 - 1);
                        self.route(g, rr, Pattern::Line { dir: Dir::South, hops: hy - y, multicast: false });
                    } else {
                        let rr = self.rect_abs(y, c0, 1, 1);
                        self.route(g, rr, Pattern::Line { dir: Dir::South, hops: hy - y, multicast: false });
                    }
                }
            }
        }
        let col_w = |c: u32| -> u64 { rows.iter().map(|&r| wl(vals(r, c), eb)).sum() };
        // Runs of the odd-chunk and even-chunk tasks of an alternating pair.
        let (ra, rb) = if par { (rep.div_ceil(2), rep / 2) } else { (rep, 0) };
        for (b, &(c0, c1)) in oi.bands.iter().enumerate() {
            // Relays c0+1 .. c1 - 1: their column (and c0's, at c0 + 1) west to c0.
            for c in (c0 + 1)..c1 {
                let w = col_w(c) + if c == c0 + 1 { col_w(c0) } else { 0 };
                if w == 0 {
                    continue;
                }
                let relay = |gi: ColorId, go: ColorId, runs: u32| {
                    task(
                        &format!("gather{o}"),
                        vec![recv(gi, w)],
                        mov(eb),
                        w * 4 / eb,
                        Some(gi),
                        vec![send(go, w, true)],
                        runs,
                        0,
                    )
                };
                let tasks = self.out_row.entry(c).or_default();
                alternate(tasks, relay(g1, g0, ra), par.then(|| relay(g1b, g0b, rb)));
                let r = self.rect_abs(hy, c, 1, 1);
                for g in if par { vec![g0, g0b] } else { vec![g0] } {
                    self.route(g, r, Pattern::Line { dir: Dir::West, hops: c - c0, multicast: false });
                }
            }
            // The band's gateway.
            let multi = c1 - c0 > 1;
            let w_in = if multi { (c0..c1).map(col_w).sum::<u64>() } else { col_w(c0) };
            let out = |color_in: ColorId, half: Option<bool>| {
                let sends: Vec<Send> = oi
                    .dests
                    .iter()
                    .filter(|d| d.band == b)
                    .filter_map(|d| {
                        let runs = match (d.runs, half) {
                            (Some(r), Some(odd)) => Some(parity_runs(r, odd)?),
                            (r, _) => r,
                        };
                        Some(Send { color: d.color, wavelets: d.wavelets, streamed: true, runs })
                    })
                    .collect();
                let runs = match half {
                    Some(true) => ra,
                    Some(false) => rb,
                    None => rep,
                };
                task(
                    &format!("out{o}"),
                    vec![recv(color_in, w_in)],
                    mov(eb),
                    w_in * 4 / eb,
                    Some(color_in),
                    sends,
                    runs,
                    0,
                )
            };
            let (ia, ib) = if multi { (g0, g0b) } else { (g1, g1b) };
            // Per-chunk ordering. A router queue is FIFO across the senders of a color, so where several
            // PEs send to one (the gather's relays and gateway, fan-in leaders, row combines) a fast
            // sender's run n + 1 could arrive before a slow one's run n and be counted into run n. The
            // gateway sends one credit per run once its run n has taken every wavelet of run n (which
            // needs every send of run n in the band), and no sending task of the band starts its run
            // n + w before that credit (w = 1, or 2 where colors alternate by chunk parity, so that
            // chunks n and n + 1 never share a queue): a run's trains are all claimed before any train
            // of the next run on its colors is sent. Where every sending task of the band waits, run by
            // run, for an input that one gateway relays, the credit goes to that input gateway, which
            // relays chunk n + w only after it (one train per run); else it is multicast over the
            // band's compute block.
            let window = if par { 2 } else { 1 };
            let rc = f.rc();
            let credits = rep > window && rc * (c1 - c0) > 1;
            let kc = self.kc(o);
            let credit = |t: usize, runs: u32| {
                task(
                    &format!("credit{o}"),
                    vec![after(t, 1, 1, 1)],
                    mov(eb),
                    0,
                    None,
                    vec![send(kc, 1, false)],
                    runs,
                    0,
                )
            };
            let gw = self.out_row.entry(c0).or_default();
            let first = gw.len();
            if !par {
                gw.push(out(ia, None));
                if credits {
                    gw.push(credit(first, rep - 1));
                }
            } else {
                // Credits first: a finished run's credit goes out before the gateway's next run. Odd
                // chunks' credits come from the first task of the pair, even chunks' from the second.
                let n = if credits { rep - window } else { 0 };
                let (na, nb) = (n.div_ceil(2), n / 2);
                let outs = first + (na > 0) as usize + (nb > 0) as usize;
                if na > 0 {
                    gw.push(credit(outs, na));
                }
                if nb > 0 {
                    gw.push(credit(outs + 1, nb));
                }
                alternate(gw, out(ia, Some(true)), Some(out(ib, Some(false))));
            }
            if credits {
                let area = self.rect_abs(f.row0(), c0, rc, c1 - c0);
                let gate = if par { self.input_gate(area, rep) } else { None };
                match gate {
                    Some((s, tpl)) => {
                        let to = Pattern::To { dx: s as i32 - c0 as i32, dy: -(hy as i32) };
                        self.route(kc, self.rect_abs(hy, c0, 1, 1), to);
                        let tasks = &mut self.code.templates[tpl].1;
                        let k = tasks.len();
                        for tk in tasks.iter_mut().filter(|t| !t.name.starts_with("credit")) {
                            tk.needs.push(after(k, 1 - window as i64, 1, 1));
                        }
                        let runs = rep - window;
                        tasks.push(task(&format!("credit{o}"), vec![recv(kc, 1)], mov(4), 0, None, vec![], runs, 0));
                    }
                    None => {
                        let dy = f.row0() as i32 - hy as i32;
                        self.route(kc, self.rect_abs(hy, c0, 1, 1), Pattern::Rect { dx: 0, dy, w: c1 - c0, h: rc });
                        self.credit_senders(area, kc, rep, window, o);
                    }
                }
            }
        }
    }

    /// The input gateway a gather's credit can hold back instead of every sender of `area`: a slot
    /// relayed by one gateway task of `rep` runs (chunk n in run n) such that every task of `area`
    /// that sends waits in its run n for chunk n of that slot: it receives the gateway's multicast
    /// (or a color sent only inside the compute block, by such tasks), or it follows, run for run, a
    /// task that does. Then no train of chunk n + w leaves a PE of `area` before the gateway relays
    /// chunk n + w, so holding that relay back until the output has taken chunk n orders the chunks
    /// with one credit train per run instead of one delivered to every PE. Returns the slot and its
    /// gateway's template (slots without forwards first); None when none qualifies.
    fn input_gate(&self, area: Rect, rep: u32) -> Option<(usize, usize)> {
        if !self.f().io_in {
            return None;
        }
        // Every input's colors: the slots' multicasts and the row bands of a split slot.
        let mut inputs: Vec<ColorId> = (0..self.st.inputs.len()).map(|s| self.mc(s)).collect();
        inputs.extend(self.xsplit.iter().flat_map(|x| x.bands.iter().map(|b| b.2)));
        let mut internal: Vec<ColorId> = (0..algo_colors(self.t.algo, self.st)).map(|i| self.ac(i)).collect();
        if self.parity() {
            let (t1b, t2b) = self.tc_b();
            internal.extend([t1b, t2b]);
        }
        let mut cands: Vec<(usize, &Feed)> = Vec::new();
        for s in 0..self.st.inputs.len() {
            let banded = self.iface.wslot == Some(s) && self.iface.wbands.len() > 1;
            if let [feed] = self.iface.feeds[s].as_slice() {
                if !banded && !feed.direct && feed.repeat == rep {
                    cands.push((s, feed));
                }
            }
        }
        cands.sort_by_key(|(s, feed)| (!feed.fwd.is_empty(), *s));
        let tiles: Vec<usize> = self
            .code
            .tiles
            .iter()
            .filter(|(r, _)| r.x < area.x + area.w && area.x < r.x + r.w && r.y < area.y + area.h && area.y < r.y + r.h)
            .map(|&(_, t)| t)
            .collect();
        'cand: for (s, feed) in cands {
            // The colors the gateway multicasts chunk n on, with their wavelets per run.
            let gated: Vec<(ColorId, u64)> = match self.xsplit.as_ref().filter(|x| x.slot == s) {
                Some(x) => x.bands.iter().map(|b| (b.2, b.3)).collect(),
                None => vec![(self.mc(s), feed.wavelets)],
            };
            let here = self.rect_abs(0, s as u32, 1, 1);
            let Some(&(_, tpl)) = self.code.tiles.iter().find(|(r, _)| *r == here) else {
                continue;
            };
            if self.code.templates[tpl].1.iter().any(|t| t.repeat != rep && !t.name.starts_with("credit")) {
                continue;
            }
            for &t in &tiles {
                let tasks = &self.code.templates[t].1;
                let mut memo = vec![None; tasks.len()];
                for k in 0..tasks.len() {
                    if !tasks[k].sends.is_empty()
                        && !follows_chunk(tasks, k, rep, &gated, &inputs, &internal, &mut memo)
                    {
                        continue 'cand;
                    }
                }
            }
            return Some((s, tpl));
        }
        None
    }

    /// Gives every PE of `area` a task taking the gather's credit (`rep - window` runs), and makes each
    /// of its sending tasks of `rep` runs wait, from its run `window + 1` on, for the credit of the run
    /// `window` before. Tiles that straddle the area are split; templates are cloned once.
    fn credit_senders(&mut self, area: Rect, kc: ColorId, rep: u32, window: u32, o: usize) {
        let mut cloned: BTreeMap<usize, usize> = BTreeMap::new();
        let tiles = std::mem::take(&mut self.code.tiles);
        for (r, t) in tiles {
            let (x0, x1) = (r.x.max(area.x), (r.x + r.w).min(area.x + area.w));
            let (y0, y1) = (r.y.max(area.y), (r.y + r.h).min(area.y + area.h));
            if x0 >= x1 || y0 >= y1 {
                self.code.tiles.push((r, t));
                continue;
            }
            // The parts outside the area: above, below, then left and right of it within its rows.
            let outside = [
                Rect { x: r.x, y: r.y, w: r.w, h: y0 - r.y },
                Rect { x: r.x, y: y1, w: r.w, h: r.y + r.h - y1 },
                Rect { x: r.x, y: y0, w: x0 - r.x, h: y1 - y0 },
                Rect { x: x1, y: y0, w: r.x + r.w - x1, h: y1 - y0 },
            ];
            for piece in outside.into_iter().filter(|p| p.w > 0 && p.h > 0) {
                self.code.tiles.push((piece, t));
            }
            let nt = match cloned.get(&t) {
                Some(&nt) => nt,
                None => {
                    let (name, mut tasks, sram) = self.code.templates[t].clone();
                    let k = tasks.len();
                    for tk in tasks.iter_mut() {
                        if tk.repeat == rep && !tk.sends.is_empty() {
                            tk.needs.push(after(k, 1 - window as i64, 1, 1));
                        }
                    }
                    let runs = rep - window;
                    tasks.push(task(&format!("credit{o}"), vec![recv(kc, 1)], mov(4), 0, None, vec![], runs, 0));
                    self.code.templates.push((name, tasks, sram));
                    let nt = self.code.templates.len() - 1;
                    if let Some(f) = self.code.fifos.get(&t).cloned() {
                        self.code.fifos.insert(nt, f);
                    }
                    cloned.insert(t, nt);
                    nt
                }
            };
            self.code.tiles.push((Rect { x: x0, y: y0, w: x1 - x0, h: y1 - y0 }, nt));
        }
    }
}

/// Pushes task `a` and, when given, its partner `b` (odd and even chunks on their own colors), which
/// take turns: b's run m after a's run m, a's run m + 1 after b's run m, so a PE handles chunks in order.
fn alternate(tasks: &mut Vec<Task>, mut a: Task, b: Option<Task>) {
    let ia = tasks.len();
    if let Some(mut b) = b {
        a.needs.push(after(ia + 1, 0, 1, 1));
        b.needs.push(after(ia, 1, 1, 1));
        tasks.push(a);
        tasks.push(b);
    } else {
        tasks.push(a);
    }
}

/// The runs of the odd-chunk (`odd`) or even-chunk task of an alternating pair that fall in the chunks
/// `r`; None when none does.
fn parity_runs(r: RunRange, odd: bool) -> Option<RunRange> {
    // Chunk c is run (c + 1) / 2 of the odd task (c odd) and run c / 2 of the even task (c even).
    let (first, last) =
        if odd { ((r.first + 1).div_ceil(2), r.last.div_ceil(2)) } else { (r.first.div_ceil(2), r.last / 2) };
    (first <= last).then_some(RunRange { first, last })
}

/// Whether run n of task k of a PE waits for chunk n of a gated input (`Prog::input_gate`): it has
/// `rep` runs and receives a gated color (the chunk's wavelets per run) or an `internal` color (one
/// only the block's tasks send, which holds if they all follow the chunk), or needs, for its run n, at
/// least n runs of a task that follows the chunk. A color of another input never counts.
fn follows_chunk(
    tasks: &[Task],
    k: usize,
    rep: u32,
    gated: &[(ColorId, u64)],
    inputs: &[ColorId],
    internal: &[ColorId],
    memo: &mut [Option<bool>],
) -> bool {
    if let Some(v) = memo[k] {
        return v;
    }
    // Cycles among needs (a chain waiting on its own last task) do not count: false while visiting.
    memo[k] = Some(false);
    let t = &tasks[k];
    let v = t.needs.iter().any(|n| match *n {
        Need::Recv { color, wavelets } => {
            (t.repeat == rep && gated.contains(&(color, wavelets)))
                || (internal.contains(&color) && !inputs.contains(&color))
        }
        Need::Done { task, times } => {
            t.repeat == rep && times >= 1 && follows_chunk(tasks, task.0 as usize, rep, gated, inputs, internal, memo)
        }
        Need::After { task, first, num, den } => {
            t.repeat == rep
                && first >= 1
                && num >= den
                && follows_chunk(tasks, task.0 as usize, rep, gated, inputs, internal, memo)
        }
    });
    memo[k] = Some(v);
    v
}

#[derive(Default)]
struct PreInputs {
    wloads: Vec<usize>,
    stores: Vec<(usize, bool, u32)>,
    live: Vec<usize>,
}

/// Builds the program of a stage on its region.
pub(crate) fn program(st: &Stage, t: &Tiling, rect: Rect, iface: &Iface, iters: u32) -> RegionCode {
    let mut p = Prog::new(st, t, rect, iface, iters);
    if t.algo == Algo::GemvTree {
        p.xsplit = tree_xsplit(&p);
    }
    p.in_row();
    match st.work.clone() {
        Work::Matmul { .. } => match t.algo {
            Algo::GemvTree => prog_tree(&mut p),
            _ => prog_bcast(&mut p),
        },
        Work::Accum { .. } => prog_summa(&mut p),
        Work::RowReduce { .. } => prog_rowreduce(&mut p),
        Work::Elementwise { .. } | Work::Relay { .. } => prog_elementwise(&mut p),
        Work::Lookup { .. } => prog_lookup(&mut p),
        Work::SingleGemv { .. } => prog_single_gemv(&mut p),
        Work::SingleGemm { .. } => prog_cannon(&mut p),
        Work::SingleAdd { .. } => prog_local(&mut p),
        Work::AllReduce { .. } => prog_allreduce(&mut p),
    }
    p.finish();
    p.code
}

/// Values of output o per run sent by every working compute PE: the output's per-run values split
/// like the work.
fn out_rows(p: &Prog, all: bool) -> Vec<u32> {
    if all {
        (0..p.f().rc()).collect()
    } else {
        vec![p.f().rc() - 1]
    }
}

fn prog_bcast(p: &mut Prog) {
    let st = p.st;
    let Work::Matmul { a, rows, k, cols, bias, out, .. } = st.work.clone() else {
        return;
    };
    let f = p.f();
    let (rc, c) = (f.rc() as u64, f.w as u64);
    let runs = p.t.runs;
    let rr = rows / runs as u64;
    let eb = p.eb();
    let s3 = Flat::new(cols, rc, c);
    let wa = p.slot_w(a, runs);
    let rep = p.repeat(runs);
    let row_kinds: Vec<Vec<u64>> = (0..rc).map(|r| vec![s3.row_kind(r), p.wband_r(r as u32) as u64]).collect();
    let col_kinds: Vec<Vec<u64>> = (0..c).map(|cc| vec![s3.col_kind(cc), p.wband_c(cc as u32) as u64]).collect();
    let (g1, _) = p.gc(out);
    p.grid(f.row0(), &row_kinds, &col_kinds, "mm", |p, rk, ck| {
        let n_p = match rk[0] {
            2 => s3.s.q + 1,
            0 => s3.s.q,
            _ => s3.s.q + ck[0],
        };
        let band = (rk[1] + ck[1]) as usize;
        if n_p == 0 {
            return Some((format!("{}.idle", st.name), p.drain(band, runs)));
        }
        let mut pe = Pe::default();
        let pre = p.inputs_pre(&mut pe, Some(a), runs, band, k * n_p, runs);
        let mut needs = vec![recv(p.rc(a), wa)];
        needs.extend(p.pre_needs(&pre, runs));
        let w_out = wl(rr * n_p, eb);
        let mm = pe.push(task(
            "mm",
            needs,
            fmac(eb),
            rr * k * n_p,
            Some(p.rc(a)),
            if bias { vec![] } else { vec![send(g1, w_out, true)] },
            rep,
            2 * rr * k * n_p,
        ));
        let last = if bias {
            pe.push(task(
                "bias",
                vec![done(mm, 1)],
                arith(eb),
                rr * n_p,
                None,
                vec![send(g1, w_out, false)],
                rep,
                rr * n_p,
            ))
        } else {
            mm
        };
        if last != mm {
            pe.tasks[mm].needs.push(after(last, 0, 1, 1));
        }
        p.gate_pre(&mut pe, &pre, last, runs);
        pe.sram = p.t.sram_max;
        Some((format!("{}.mm", st.name), pe))
    });
    let vals = move |r: u32, cc: u32| rr * s3.at(r as u64, cc as u64);
    let rows_all = out_rows(p, true);
    p.gather(out, runs, &rows_all, &vals);
}

/// The gemv-tree's rows: compute rows stream partial sums to their group's leader, leaders (pure
/// reducers) stream group sums to the root (the last row), which adds them (and the bias) and sends the
/// result on. Short columns skip the groups: every compute row sends straight to the root.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tree {
    pub rc: u64,
    pub g: u64,
}

impl Tree {
    pub fn new(rc: u64) -> Tree {
        let n = rc.saturating_sub(1);
        let g = if n <= 3 {
            1
        } else {
            let mut g = 2;
            while g * g < n {
                g += 1;
            }
            g
        };
        Tree { rc, g }
    }
    fn groups(&self) -> bool {
        self.g > 1
    }
    /// Rows of the group holding row r (r < rc - 1).
    fn group(&self, r: u64) -> (u64, u64) {
        let start = (r / self.g) * self.g;
        (start, (start + self.g).min(self.rc - 1))
    }
    /// 0 compute, 1 leader, 2 root.
    pub fn role(&self, r: u64) -> u64 {
        if r + 1 == self.rc {
            return 2;
        }
        let (a, b) = self.group(r);
        if self.groups() && r + 1 == b && b - a >= 2 {
            1
        } else {
            0
        }
    }
    /// Where a compute row sends: Some(leader) or None for the root.
    fn target(&self, r: u64) -> Option<u64> {
        if !self.groups() {
            return None;
        }
        let (a, b) = self.group(r);
        (b - a >= 2).then_some(b - 1)
    }
    /// Compute rows before r (its index among compute rows).
    fn compute_index(&self, r: u64) -> u64 {
        (0..r).filter(|&x| self.role(x) == 0).count() as u64
    }
    pub fn compute_rows(&self) -> u64 {
        (0..self.rc).filter(|&x| self.role(x) == 0).count() as u64
    }
    /// Streams a leader or the root adds per run.
    fn sources(&self, r: u64) -> u64 {
        match self.role(r) {
            1 => (0..r).filter(|&x| self.role(x) == 0 && self.target(x) == Some(r)).count() as u64,
            2 => {
                (0..r).filter(|&x| self.role(x) == 1 || (self.role(x) == 0 && self.target(x).is_none())).count() as u64
            }
            _ => 0,
        }
    }
}

/// The gemv-tree's row bands for the streamed operand: compute rows need only their k-slice, so the
/// gateway sends each band of rows (a quarter of the compute rows, with the reducers among them) its
/// slice on its own color instead of multicasting the whole operand to every PE. Only for a slot fed
/// through the gateway by one stream chunked like the compute (else the whole operand, as before).
fn tree_xsplit(p: &Prog) -> Option<XSplit> {
    let Work::Matmul { a, rows, k, .. } = p.st.work.clone() else {
        return None;
    };
    let f = p.f();
    let runs = p.t.runs;
    let banded = p.iface.wslot == Some(a) && p.iface.wbands.len() > 1;
    let feeds = p.iface.feeds.get(a)?;
    let [feed] = feeds.as_slice() else {
        return None;
    };
    if !f.io_in || banded || feed.direct || feed.wavelets != p.slot_w(a, runs) || feed.repeat != p.repeat(runs) {
        return None;
    }
    let rc = f.rc() as u64;
    let tree = Tree::new(rc);
    let ncomp = tree.compute_rows();
    let nb = TREE_X_BANDS.min(ncomp);
    if nb < 2 {
        return None;
    }
    let kr = split(k, ncomp);
    let rr = rows / runs as u64;
    let eb = p.st.inputs[a].elem_bytes;
    // Band j holds the compute rows with compute index in [j*ncomp/nb, (j+1)*ncomp/nb).
    let first_row =
        |ci: u64| -> u64 { (0..rc).find(|&r| tree.role(r) == 0 && tree.compute_index(r) == ci).unwrap_or(rc) };
    let mut bands = Vec::new();
    for j in 0..nb {
        let (c0, c1) = (j * ncomp / nb, (j + 1) * ncomp / nb);
        let r0 = if j == 0 { 0 } else { first_row(c0) };
        let r1 = if j + 1 == nb { rc } else { first_row(c1) };
        let kb: u64 = (c0..c1).map(|ci| kr.at(ci)).sum();
        let color = if j == 0 { p.mc(a) } else { p.ac(1 + j as u32) };
        bands.push((r0 as u32, r1 as u32, color, wl(rr * kb, eb)));
    }
    Some(XSplit { slot: a, bands })
}

fn prog_tree(p: &mut Prog) {
    let st = p.st;
    let Work::Matmul { a, rows, k, cols, bias, out, .. } = st.work.clone() else {
        return;
    };
    let f = p.f();
    let (rc, c) = (f.rc() as u64, f.w as u64);
    let runs = p.t.runs;
    let rr = rows / runs as u64;
    let eb = p.eb();
    let tree = Tree::new(rc);
    let kr = split(k, tree.compute_rows());
    let nc = split(cols, c);
    let wa = p.slot_w(a, runs);
    let rep = p.repeat(runs);
    let (t1, t2) = (p.ac(0), p.ac(1));
    let (g1, _) = p.gc(out);
    // Colors by chunk parity: odd runs on the first, even runs on the second (`Prog::parity`).
    let par = p.parity();
    let ((t1b, t2b), (g1b, _)) = if par { (p.tc_b(), p.gc_b(out)) } else { ((t1, t2), (g1, g1)) };
    let row_kinds: Vec<Vec<u64>> = (0..rc)
        .map(|r| {
            let role = tree.role(r);
            let big = role == 0 && tree.compute_index(r) < kr.r;
            let xb = p.xsplit.as_ref().map_or(0, |x| x.band_of(r as u32)) as u64;
            vec![role, tree.sources(r), big as u64, tree.target(r).is_some() as u64, p.wband_r(r as u32) as u64, xb]
        })
        .collect();
    let col_kinds: Vec<Vec<u64>> =
        (0..c).map(|cc| vec![(cc < nc.r) as u64, (nc.at(cc) == 0) as u64, p.wband_c(cc as u32) as u64]).collect();
    p.grid(f.row0(), &row_kinds, &col_kinds, "tree", |p, rk, ck| {
        let (role, sources) = (rk[0], rk[1]);
        let n_c = nc.q + ck[0];
        let band = (rk[4] + ck[2]) as usize;
        let xb = p.xsplit.is_some().then_some(rk[5] as usize);
        if n_c == 0 || (role == 0 && kr.q + rk[2] == 0) {
            return Some((format!("{}.idle", st.name), p.drain_row(band, runs, xb)));
        }
        let w_p = wl(rr * n_c, ACC_BYTES); // partial sums travel in fp32
        if role > 0 {
            // A reducer: drains the multicasts it does not use, adds the partial sums as they arrive.
            let mut pe = p.drain_row(band, runs, xb);
            let bias_flops = if role == 2 && bias { rr * n_c } else { 0 };
            // The last reducer's sums are finished: they leave in the storage dtype.
            let w_out = if role == 2 { wl(rr * n_c, eb) } else { w_p };
            let red = |color_in: ColorId, color_out: ColorId, runs: u32| {
                task(
                    if role == 1 { "red1" } else { "red2" },
                    vec![recv(color_in, sources * w_p)],
                    arith(eb),
                    (sources.saturating_sub(1) * rr * n_c + bias_flops).max(1),
                    Some(color_in),
                    vec![send(color_out, w_out, true)],
                    runs,
                    bias_flops,
                )
            };
            let ((a_in, a_out), (b_in, b_out)) =
                if role == 1 { ((t1, t2), (t1b, t2b)) } else { ((t2, g1), (t2b, g1b)) };
            if par {
                alternate(&mut pe.tasks, red(a_in, a_out, rep.div_ceil(2)), Some(red(b_in, b_out, rep / 2)));
            } else {
                pe.push(red(a_in, a_out, rep));
            }
            // One fp32 accumulator row and one arriving row: partial sums stream through row by row.
            pe.sram = n_c * (ACC_BYTES + eb);
            return Some((format!("{}.tree{role}", st.name), pe));
        }
        let k_r = kr.q + rk[2];
        let mut pe = Pe::default();
        let pre = p.inputs_pre(&mut pe, Some(a), runs, band, k_r * n_c, runs);
        // The streamed operand: the row band's slice when split, else the whole of it.
        let (xc, xw) = xb.and_then(|b| p.xfeed(b)).map_or((p.rc(a), wa), |(_, c, w)| (c, w));
        let mut needs = vec![recv(xc, xw)];
        needs.extend(p.pre_needs(&pre, runs));
        let (to, to_b) = if role == 0 && rk[3] == 1 { (t1, t1b) } else { (t2, t2b) };
        // Alternating colors: one send per run, on the color of the run's parity.
        let sends = if par {
            (1..=rep)
                .map(|r| Send {
                    color: if r % 2 == 1 { to } else { to_b },
                    wavelets: w_p,
                    streamed: true,
                    runs: Some(RunRange { first: r, last: r }),
                })
                .collect()
        } else {
            vec![send(to, w_p, true)]
        };
        let mm = pe.push(task("mm", needs, fmac(eb), rr * k_r * n_c, Some(xc), sends, rep, 2 * rr * k_r * n_c));
        p.gate_pre(&mut pe, &pre, mm, runs);
        pe.sram = p.t.sram_max;
        Some((format!("{}.tree0", st.name), pe))
    });
    // Routes: compute rows to their leader (or the root), leaders to the root.
    let active_cols = if nc.q > 0 { c as u32 } else { nc.r as u32 };
    for r in 0..rc {
        let y = f.row0() + r as u32;
        let rect = p.rect_abs(y, 0, 1, active_cols.max(1));
        let ((ca, cb), hops) = match (tree.role(r), tree.target(r)) {
            (0, Some(l)) => ((t1, t1b), l - r),
            (0, None) | (1, _) => ((t2, t2b), rc - 1 - r),
            _ => continue,
        };
        let line = Pattern::Line { dir: Dir::South, hops: hops as u32, multicast: false };
        p.route(ca, rect, line);
        if par {
            p.route(cb, rect, line);
        }
    }
    let vals = move |_r: u32, cc: u32| rr * nc.at(cc as u64);
    let rows_b = out_rows(p, false);
    p.gather(out, runs, &rows_b, &vals);
}

fn prog_summa(p: &mut Prog) {
    let st = p.st;
    let Work::Accum { x, dy, rows, k, cols, out, bias_out } = st.work.clone() else {
        return;
    };
    let f = p.f();
    let (rc, c) = (f.rc() as u64, f.w as u64);
    let runs = p.t.runs;
    let rr = rows / runs as u64;
    let eb = p.eb();
    let kr = split(k, rc);
    let nc = split(cols, c);
    let rep = p.repeat(runs);
    let (g1, _) = p.gc(out);
    let g1b = bias_out.map(|b| p.gc(b).0);
    let row_kinds: Vec<Vec<u64>> =
        (0..rc).map(|r| vec![(r < kr.r) as u64, (r == 0) as u64, (kr.at(r) == 0) as u64]).collect();
    let col_kinds: Vec<Vec<u64>> = (0..c).map(|cc| vec![(cc < nc.r) as u64, (nc.at(cc) == 0) as u64]).collect();
    // The main (paced) operand is dy unless dy is stored and x is not.
    let main = if st.inputs[dy].kind == SlotKind::Live || st.inputs[x].kind != SlotKind::Live { dy } else { x };
    p.grid(f.row0(), &row_kinds, &col_kinds, "summa", |p, rk, ck| {
        let k_r = kr.q + rk[0];
        let n_c = nc.q + ck[0];
        if k_r == 0 || n_c == 0 {
            return Some((format!("{}.idle", st.name), p.drain(0, runs)));
        }
        let first_row = rk[1] == 1;
        let mut pe = Pe::default();
        let pre = p.inputs_pre(&mut pe, Some(main), runs, 0, k_r * n_c, 2);
        let mut needs = vec![recv(p.rc(main), p.slot_w(main, runs))];
        needs.extend(p.pre_needs(&pre, runs));
        let acc =
            pe.push(task("acc", needs, fmac(eb), rr * k_r * n_c, Some(p.rc(main)), vec![], rep, 2 * rr * k_r * n_c));
        let mut last = acc;
        if let (true, Some(_)) = (first_row, bias_out) {
            last = pe.push(task("dbias", vec![done(acc, 1)], arith(eb), rr * n_c, None, vec![], rep, rr * n_c));
        }
        let mut sends = vec![send(g1, wl(k_r * n_c, eb), false)];
        if let (true, Some(gb)) = (first_row, g1b) {
            sends.push(send(gb, wl(n_c, eb), false));
        }
        let emit = pe.push(task("emit", vec![done(last, runs)], mov(eb), k_r * n_c, None, sends, p.iters, 0));
        pe.tasks[acc].needs.push(after(emit, 0, 1, runs as u64));
        if last != acc {
            pe.tasks[acc].needs.push(after(last, 0, 1, 1));
        }
        p.gate_pre(&mut pe, &pre, last, runs);
        pe.sram = p.t.sram_max;
        Some((format!("{}.acc", st.name), pe))
    });
    let vals = move |r: u32, cc: u32| kr.at(r as u64) * nc.at(cc as u64);
    let rows_all: Vec<u32> = (0..rc as u32).filter(|&r| kr.at(r as u64) > 0).collect();
    p.gather(out, 1, &rows_all, &vals);
    if let Some(b) = bias_out {
        let valsb = move |_r: u32, cc: u32| nc.at(cc as u64);
        p.gather(b, 1, &[0], &valsb);
    }
}

fn prog_rowreduce(p: &mut Prog) {
    let st = p.st;
    let Work::RowReduce { main, rows, width, per_elem, out, colsum, scalar } = st.work.clone() else {
        return;
    };
    let f = p.f();
    let (rc, c) = (f.rc() as u64, f.w as u64);
    let runs = p.t.runs;
    let rr = rows / runs as u64;
    let eb = p.eb();
    let tr = split(rr, rc);
    let wc = split(width, c);
    // Columns holding values: a row narrower than the region (an attention row over one key) leaves
    // the columns past `width` idle, and they take no part in the fan-in (as the tiling assumed).
    let ce = c.min(width).max(1);
    let fan = FanIn::new(ce);
    let rep = p.repeat(runs);
    let (r1, r2, rb) = (p.ac(0), p.ac(1), p.ac(2));
    let rcol = p.ac(3);
    // Work per element: the reduction pass (stats) and the elementwise pass (apply).
    let (c_apply, c_stats) = if out.is_some() { (1, per_elem - 1) } else { (0, per_elem) };
    let active_rows = rc.min(rr);
    let cs_per_col = colsum.map_or(0, |o| st.outputs[o].values / width.max(1));
    // Column positions mirrored so that the fan-in converges west to column 0 (idle columns: none).
    let pos = |cc: u64| ce.saturating_sub(1 + cc);
    let row_kinds: Vec<Vec<u64>> = (0..rc)
        .map(|r| {
            vec![
                (r < tr.r) as u64,
                (tr.at(r) == 0) as u64,
                (r == 0) as u64,
                (r == active_rows.saturating_sub(1)) as u64,
            ]
        })
        .collect();
    let col_kinds: Vec<Vec<u64>> = (0..c)
        .map(|cc| {
            let (role, gs) = fan.role(pos(cc));
            vec![(cc < wc.r) as u64, (wc.at(cc) == 0) as u64, role, gs]
        })
        .collect();
    let outs_g1 = out.map(|o| p.gc(o).0);
    let cs_g1 = colsum.map(|o| p.gc(o).0);
    let sc_g1 = scalar.map(|o| p.gc(o).0);
    p.grid(f.row0(), &row_kinds, &col_kinds, "rr", |p, rk, ck| {
        let t_r = tr.q + rk[0];
        let w_c = wc.q + ck[0];
        let first_row = rk[2] == 1;
        if t_r == 0 || w_c == 0 {
            return Some((format!("{}.idle", st.name), p.drain(0, runs)));
        }
        let (role, gs) = (ck[2], ck[3]);
        let w_st = 2 * t_r; // (a, b) statistics per row, fp32
        let mut pe = Pe::default();
        let pre = p.inputs_pre(&mut pe, Some(main), runs, 0, w_c, runs);
        let mut needs = vec![recv(p.rc(main), p.slot_w(main, runs))];
        needs.extend(p.pre_needs(&pre, runs));
        let c1 = ce > 1;
        let stats_sends = match role {
            0 => vec![send(r1, w_st, false)],
            1 if gs == 1 => vec![send(r2, w_st, false)],
            _ => vec![],
        };
        let stats = pe.push(task(
            "stats",
            needs,
            arith(eb),
            (t_r * w_c * c_stats).max(t_r * w_c),
            Some(p.rc(main)),
            stats_sends,
            rep,
            t_r * w_c * c_stats,
        ));
        let mut last = stats;
        if role >= 1 && gs > 1 {
            let sends = if role == 1 { vec![send(r2, w_st, false)] } else { vec![] };
            last = pe.push(task(
                "red1",
                vec![recv(r1, (gs - 1) * w_st), done(last, 1)],
                SimdOp::ArithF32,
                (gs - 1) * w_st,
                Some(r1),
                sends,
                rep,
                0,
            ));
        }
        if role == 2 && fan.ngroups() > 1 {
            last = pe.push(task(
                "red2",
                vec![recv(r2, (fan.ngroups() - 1) * w_st), done(last, 1)],
                SimdOp::ArithF32,
                (fan.ngroups() - 1) * w_st,
                Some(r2),
                vec![],
                rep,
                0,
            ));
        }
        let root = role == 2;
        if root && c1 && out.is_some() {
            // The statistics back to the row.
            pe.tasks[last].sends.push(send(rb, w_st, false));
        }
        let mut apply = None;
        if let Some(o) = out {
            let mut needs = vec![done(last, 1)];
            if !root {
                needs = vec![recv(rb, w_st), done(stats, 1)];
            }
            let w_out = wl(t_r * w_c * st.outputs[o].values / (rows * width).max(1), eb);
            let a = pe.push(task(
                "apply",
                needs,
                arith(eb),
                (t_r * w_c * c_apply).max(1),
                None,
                outs_g1.map(|g| vec![send(g, w_out, false)]).unwrap_or_default(),
                rep,
                t_r * w_c * c_apply,
            ));
            apply = Some(a);
            last = a;
        }
        // Column sums (dgamma, dbeta) or the scalar loss, once per iteration.
        let per_iter_src = last;
        if colsum.is_some() || (scalar.is_some() && root) {
            let vals = if colsum.is_some() { w_c * cs_per_col } else { 1 };
            let w = wl(vals, 4);
            if first_row {
                let mut needs = vec![done(per_iter_src, runs)];
                if active_rows > 1 {
                    needs.push(recv(rcol, (active_rows - 1) * w));
                }
                let g = if colsum.is_some() { cs_g1 } else { sc_g1 };
                let col = pe.push(task(
                    "colsum",
                    needs,
                    SimdOp::ArithF32,
                    (active_rows.max(1)) * vals,
                    if active_rows > 1 { Some(rcol) } else { None },
                    g.map(|g| vec![send(g, wl(vals, eb), false)]).unwrap_or_default(),
                    p.iters,
                    0,
                ));
                pe.tasks[stats].needs.push(after(col, 0, 1, runs as u64));
            } else {
                let col = pe.push(task(
                    "colsum",
                    vec![done(per_iter_src, runs)],
                    SimdOp::Mov32,
                    vals,
                    None,
                    vec![send(rcol, w, false)],
                    p.iters,
                    0,
                ));
                pe.tasks[stats].needs.push(after(col, 0, 1, runs as u64));
            }
        }
        if let Some(a) = apply {
            pe.tasks[stats].needs.push(after(a, 0, 1, 1));
        } else if last != stats {
            pe.tasks[stats].needs.push(after(last, 0, 1, 1));
        }
        p.gate_pre(&mut pe, &pre, last, runs);
        pe.sram = p.t.sram_max;
        Some((format!("{}.rr{role}", st.name), pe))
    });
    // Row reduction routes (per column, converging west), the broadcast back, the column sums.
    for cc in 0..ce {
        let (role, _) = fan.role(pos(cc));
        let rect = p.rect_abs(f.row0(), cc as u32, active_rows.max(1) as u32, 1);
        let lead = ce - 1 - fan.leader_of(pos(cc));
        if role == 0 {
            p.route(r1, rect, Pattern::Line { dir: Dir::West, hops: (cc - lead) as u32, multicast: false });
        } else if role == 1 {
            p.route(r2, rect, Pattern::Line { dir: Dir::West, hops: cc as u32, multicast: false });
        }
    }
    if ce > 1 && out.is_some() {
        let rect = p.rect_abs(f.row0(), 0, active_rows.max(1) as u32, 1);
        p.route(rb, rect, Pattern::Line { dir: Dir::East, hops: (ce - 1) as u32, multicast: true });
    }
    if colsum.is_some() || scalar.is_some() {
        let cols = if colsum.is_some() { ce as u32 } else { 1 };
        for r in 1..active_rows as u32 {
            let rect = p.rect_abs(f.row0() + r, 0, 1, cols);
            p.route(rcol, rect, Pattern::Line { dir: Dir::North, hops: r, multicast: false });
        }
    }
    if let Some(o) = out {
        let ov = st.outputs[o].values;
        let vals = move |r: u32, cc: u32| tr.at(r as u64) * wc.at(cc as u64) * ov / (rows * width).max(1);
        let rws: Vec<u32> = (0..active_rows as u32).collect();
        p.gather(o, runs, &rws, &vals);
    }
    if let Some(o) = colsum {
        let vals = move |_r: u32, cc: u32| wc.at(cc as u64) * cs_per_col;
        p.gather(o, 1, &[0], &vals);
    }
    if let Some(o) = scalar {
        let vals = move |_r: u32, cc: u32| (cc == 0) as u64;
        p.gather(o, 1, &[0], &vals);
    }
}

fn prog_elementwise(p: &mut Prog) {
    let st = p.st;
    let (main, rows, width, per_elem, accumulate) = match st.work.clone() {
        Work::Elementwise { main, rows, width, per_elem, accumulate } => (main, rows, width, per_elem, accumulate),
        Work::Relay { main, rows, width } => (Some(main), rows, width, 0, false),
        _ => return,
    };
    let f = p.f();
    let (rc, c) = (f.rc() as u64, f.w as u64);
    let runs = p.t.runs;
    let eb = p.eb();
    let rep = p.repeat(runs);
    let e = Flat::new(rows * width / runs as u64, rc, c);
    let out_runs = if accumulate { 1 } else { runs };
    let outs: Vec<Flat> = st.outputs.iter().map(|o| Flat::new(o.values / out_runs as u64, rc, c)).collect();
    let row_kinds: Vec<Vec<u64>> =
        (0..rc).map(|r| std::iter::once(e.row_kind(r)).chain(outs.iter().map(|o| o.row_kind(r))).collect()).collect();
    let col_kinds: Vec<Vec<u64>> =
        (0..c).map(|cc| std::iter::once(e.col_kind(cc)).chain(outs.iter().map(|o| o.col_kind(cc))).collect()).collect();
    let gathered: Vec<Option<ColorId>> =
        (0..st.outputs.len()).map(|o| p.iface.outs.get(o).filter(|x| x.gathered).map(|_| p.gc(o).0)).collect();
    let pick = |fl: &Flat, rk: u64, ck: u64| match rk {
        2 => fl.s.q + 1,
        0 => fl.s.q,
        _ => fl.s.q + ck,
    };
    p.grid(f.row0(), &row_kinds, &col_kinds, "ew", |p, rk, ck| {
        let n = pick(&e, rk[0], ck[0]);
        let shares: Vec<u64> = outs.iter().enumerate().map(|(i, o)| pick(o, rk[i + 1], ck[i + 1])).collect();
        if n == 0 && shares.iter().all(|&s| s == 0) {
            return Some((format!("{}.idle", st.name), p.drain(0, runs)));
        }
        let mut pe = Pe::default();
        let pre = p.inputs_pre(&mut pe, main, runs, 0, n, runs);
        let mut needs = Vec::new();
        if let Some(m) = main {
            needs.push(recv(p.rc(m), p.slot_w(m, runs)));
        }
        needs.extend(p.pre_needs(&pre, runs));
        let sends: Vec<Send> = if accumulate {
            vec![]
        } else {
            shares
                .iter()
                .enumerate()
                .filter_map(|(o, &v)| {
                    gathered[o].filter(|_| v > 0).map(|g| send(g, wl(v, st.outputs[o].elem_bytes), false))
                })
                .collect()
        };
        let op = if per_elem == 0 { mov(eb) } else { arith(eb) };
        let ew = pe.push(task(
            "ew",
            needs,
            op,
            (n * per_elem.max(1)).max(1),
            main.map(|m| p.rc(m)),
            sends,
            rep,
            n * per_elem,
        ));
        if accumulate {
            let sends: Vec<Send> = shares
                .iter()
                .enumerate()
                .filter_map(|(o, &v)| {
                    gathered[o].filter(|_| v > 0).map(|g| send(g, wl(v, st.outputs[o].elem_bytes), false))
                })
                .collect();
            let emit = pe.push(task(
                "emit",
                vec![done(ew, runs)],
                mov(eb),
                shares.iter().sum::<u64>(),
                None,
                sends,
                p.iters,
                0,
            ));
            pe.tasks[ew].needs.push(after(emit, 0, 1, runs as u64));
        }
        p.gate_pre(&mut pe, &pre, ew, runs);
        pe.sram = p.t.sram_max;
        Some((format!("{}.ew", st.name), pe))
    });
    for (o, fl) in outs.iter().enumerate() {
        let fl = *fl;
        let vals = move |r: u32, cc: u32| fl.at(r as u64, cc as u64);
        let rws: Vec<u32> = (0..rc as u32).filter(|&r| (0..c).any(|cc| fl.at(r as u64, cc) > 0)).collect();
        p.gather(o, out_runs, &rws, &vals);
    }
}

fn prog_lookup(p: &mut Prog) {
    let st = p.st;
    let Work::Lookup { ids, rows, width, out } = st.work.clone() else {
        return;
    };
    let f = p.f();
    let (rc, c) = (f.rc() as u64, f.w as u64);
    let runs = p.t.runs;
    let rr = rows / runs as u64;
    let eb = p.eb();
    let wc = split(width, c);
    let fan = FanIn::new(rc);
    let rep = p.repeat(runs);
    let (t1, t2) = (p.ac(0), p.ac(1));
    let (g1, _) = p.gc(out);
    let wi = p.slot_w(ids, runs);
    let row_kinds: Vec<Vec<u64>> = (0..rc)
        .map(|r| {
            let (role, gs) = fan.role(r);
            vec![role, gs]
        })
        .collect();
    let col_kinds: Vec<Vec<u64>> = (0..c).map(|cc| vec![(cc < wc.r) as u64, (wc.at(cc) == 0) as u64]).collect();
    p.grid(f.row0(), &row_kinds, &col_kinds, "look", |p, rk, ck| {
        let (role, gs) = (rk[0], rk[1]);
        let w_c = wc.q + ck[0];
        if w_c == 0 {
            return Some((format!("{}.idle", st.name), p.drain(0, runs)));
        }
        let w_p = wl(rr * w_c, eb);
        let mut pe = Pe::default();
        let pre = p.inputs_pre(&mut pe, Some(ids), runs, 0, 0, 1);
        let mut needs = vec![recv(p.rc(ids), wi)];
        needs.extend(p.pre_needs(&pre, runs));
        let sends = match role {
            0 => vec![send(t1, w_p, false)],
            1 if gs == 1 => vec![send(t2, w_p, false)],
            2 if gs == 1 && fan.ngroups() == 1 => vec![send(g1, w_p, false)],
            _ => vec![],
        };
        let look = pe.push(task("look", needs, mov(eb), rr * w_c, Some(p.rc(ids)), sends, rep, 0));
        let mut last = look;
        if role >= 1 && gs > 1 {
            let sends = match role {
                1 => vec![send(t2, w_p, false)],
                _ if fan.ngroups() == 1 => vec![send(g1, w_p, false)],
                _ => vec![],
            };
            last = pe.push(task(
                "sel1",
                vec![recv(t1, (gs - 1) * w_p), done(last, 1)],
                mov(eb),
                (gs - 1) * rr * w_c,
                Some(t1),
                sends,
                rep,
                0,
            ));
        }
        if role == 2 && fan.ngroups() > 1 {
            last = pe.push(task(
                "sel2",
                vec![recv(t2, (fan.ngroups() - 1) * w_p), done(last, 1)],
                mov(eb),
                (fan.ngroups() - 1) * rr * w_c,
                Some(t2),
                vec![send(g1, w_p, false)],
                rep,
                0,
            ));
        }
        if last != look {
            pe.tasks[look].needs.push(after(last, 0, 1, 1));
        }
        pe.sram = p.t.sram_max;
        Some((format!("{}.look{role}", st.name), pe))
    });
    let active_cols = if wc.q > 0 { c as u32 } else { wc.r as u32 };
    for r in 0..rc {
        let (role, _) = fan.role(r);
        let rect = p.rect_abs(f.row0() + r as u32, 0, 1, active_cols.max(1));
        if role == 0 {
            p.route(t1, rect, Pattern::Line { dir: Dir::South, hops: (fan.leader_of(r) - r) as u32, multicast: false });
        } else if role == 1 {
            p.route(t2, rect, Pattern::Line { dir: Dir::South, hops: (rc - 1 - r) as u32, multicast: false });
        }
    }
    let vals = move |_r: u32, cc: u32| rr * wc.at(cc as u64);
    let rows_b = out_rows(p, false);
    p.gather(out, runs, &rows_b, &vals);
}

fn prog_single_gemv(p: &mut Prog) {
    let st = p.st;
    let Work::SingleGemv { k, n } = st.work.clone() else {
        return;
    };
    let f = p.f();
    // Only the rows and columns that get a share of k and n take part (as the tiling chose).
    let (rc, c) = ((f.rc() as u64).min(k), (f.w as u64).min(n));
    let eb = p.eb();
    let kr = split(k, rc);
    let nc = split(n, c);
    // MeshGEMV's two-level tree (K = 2): in each group of about sqrt(rows) rows the partial sums
    // flow down a chain, each row adding its own and passing the running sum on (level 1); the
    // groups' last rows (leaders) chain the group sums down to the root, the last row (level 2).
    // Every link carries one partial row at a time; chains alternate two colors so that each
    // router keeps one rule per color (a row receives on one color and sends on the other).
    let fan = FanIn::new(rc);
    let base = p.algo_base();
    let l1 = |r: u64| ColorId(base + ((r - fan.group(r) * fan.g) % 2) as u32);
    let l2 = |grp: u64| ColorId(base + 2 + (grp % 2) as u32);
    // Row kinds: (first of its group, leader, group index parity, has a previous group, last group,
    // parity of the row in its group, remainder row of k).
    let row_kinds: Vec<Vec<u64>> = (0..rc)
        .map(|r| {
            let grp = fan.group(r);
            vec![
                (r == grp * fan.g) as u64,
                fan.is_leader(r) as u64,
                grp % 2,
                (grp > 0) as u64,
                (grp + 1 == fan.ngroups()) as u64,
                (r - grp * fan.g) % 2,
                (r < kr.r) as u64,
            ]
        })
        .collect();
    let col_kinds: Vec<Vec<u64>> = (0..c).map(|cc| vec![(cc < nc.r) as u64]).collect();
    p.grid(f.row0(), &row_kinds, &col_kinds, "gemv", |p, rk, ck| {
        let (first, leader, gpar, prev_group, last_group, rpar) =
            (rk[0] == 1, rk[1] == 1, rk[2], rk[3] == 1, rk[4] == 1, rk[5]);
        let k_r = kr.q + rk[6];
        let n_c = nc.q + ck[0];
        if k_r == 0 || n_c == 0 {
            return None;
        }
        let w_p = wl(n_c, ACC_BYTES); // partial sums travel in fp32
        let own = p.ac(rpar as u32);
        let incoming = p.ac(1 - rpar as u32);
        let mut pe = Pe::default();
        // x is pre-placed on every PE of its row (WaferLLM's replicated vector layout).
        let mm_sends = if first && !leader { vec![send(own, w_p, false)] } else { vec![] };
        let mm = pe.push(task("mm", vec![], fmac(eb), k_r * n_c, None, mm_sends, 1, 2 * k_r * n_c));
        let mut last = mm;
        if !first {
            // Level 1: add the running sum from the row above, pass it on (or keep it: leader).
            let sends = if leader { vec![] } else { vec![send(own, w_p, true)] };
            last = pe.push(task(
                "chain",
                vec![recv(incoming, w_p), done(mm, 1)],
                arith(eb),
                n_c,
                Some(incoming),
                sends,
                1,
                0,
            ));
        }
        if leader {
            // Level 2: add the previous leaders' sum and pass it to the next leader; the root keeps it.
            let sends = if last_group { vec![] } else { vec![send(p.ac(2 + gpar as u32), w_p, true)] };
            if prev_group {
                let inc = p.ac(2 + (1 - gpar) as u32);
                pe.push(task("tree", vec![recv(inc, w_p), done(last, 1)], arith(eb), n_c, Some(inc), sends, 1, 0));
            } else if !sends.is_empty() {
                pe.push(task("tree", vec![done(last, 1)], mov(eb), n_c, None, sends, 1, 0));
            }
        }
        pe.sram = p.t.sram_max;
        let role = if leader { "leader" } else { "row" };
        Some((format!("{}.gemv.{role}", st.name), pe))
    });
    let active_cols = if nc.q > 0 { c as u32 } else { nc.r as u32 };
    for r in 0..rc {
        let rect = p.rect_abs(f.row0() + r as u32, 0, 1, active_cols.max(1));
        if !fan.is_leader(r) {
            p.route(l1(r), rect, Pattern::Line { dir: Dir::South, hops: 1, multicast: false });
        } else if r + 1 < rc {
            let next = fan.leader_of(r + 1);
            p.route(
                l2(fan.group(r)),
                rect,
                Pattern::Line { dir: Dir::South, hops: (next - r) as u32, multicast: false },
            );
        }
    }
}

/// Interleaved ring over `q` positions: evens ascending, then odds descending; each position sends
/// to its successor, at most two hops away.
fn ring_succ(q: u64, pos: u64) -> u64 {
    let mut order: Vec<u64> = (0..q).filter(|x| x % 2 == 0).collect();
    order.extend((0..q).filter(|x| x % 2 == 1).rev());
    let i = order.iter().position(|&x| x == pos).unwrap_or(0);
    order[(i + 1) % order.len()]
}

/// Colors for the ring flows on a line of `q` routers, so that every router keeps one rule per color:
/// flows (from, to) colored greedily in position order. Returns the color index of each position's flow.
fn ring_colors(q: u64) -> Vec<u32> {
    // rule[color][router] = (rx, tx) as bit sets: 1 = toward lower, 2 = toward higher, 4 = ramp.
    let mut rules: Vec<Vec<(u8, u8)>> = Vec::new();
    let mut out = vec![0u32; q as usize];
    for from in 0..q {
        let to = ring_succ(q, from);
        if to == from {
            continue;
        }
        let step: i64 = if to > from { 1 } else { -1 };
        let (fwd, back) = if step > 0 { (2u8, 1u8) } else { (1u8, 2u8) };
        let mut path = Vec::new();
        let mut x = from as i64;
        path.push((x as usize, 4u8, fwd));
        loop {
            x += step;
            if x as u64 == to {
                path.push((x as usize, back, 4u8));
                break;
            }
            path.push((x as usize, back, fwd));
        }
        let mut color = 0usize;
        loop {
            if color == rules.len() {
                rules.push(vec![(0, 0); q as usize]);
            }
            let ok = path.iter().all(|&(r, _, tx)| {
                let (_, t) = rules[color][r];
                t == 0 || t == tx
            });
            if ok {
                for &(r, rx, tx) in &path {
                    rules[color][r].0 |= rx;
                    rules[color][r].1 = tx;
                }
                out[from as usize] = color as u32;
                break;
            }
            color += 1;
        }
    }
    out
}

fn prog_cannon(p: &mut Prog) {
    let st = p.st;
    let Work::SingleGemm { m, n, k } = st.work.clone() else {
        return;
    };
    let f = p.f();
    let q = (f.rc() as u64).min(f.w as u64).min(m).min(n).min(k);
    let eb = p.eb();
    let mi = split(m, q);
    let nj = split(n, q);
    let kb = k.div_ceil(q);
    let kq = k / q;
    let ring = ring_colors(q);
    let nring = ring.iter().copied().max().unwrap_or(0) + 1;
    // Row ring (A, along x) colors: base..base+nring; column ring (B, along y): the next nring.
    let base = p.algo_base();
    let ca = |pos: u64| ColorId(base + ring[pos as usize]);
    let cb = |pos: u64| ColorId(base + nring + ring[pos as usize]);
    let pred = |pos: u64| (0..q).find(|&x| ring_succ(q, x) == pos).unwrap_or(pos);
    let row_kinds: Vec<Vec<u64>> =
        (0..q).map(|i| vec![(i < mi.r) as u64, ring[i as usize] as u64, ring[pred(i) as usize] as u64]).collect();
    let col_kinds: Vec<Vec<u64>> =
        (0..q).map(|j| vec![(j < nj.r) as u64, ring[j as usize] as u64, ring[pred(j) as usize] as u64]).collect();
    p.grid(f.row0(), &row_kinds, &col_kinds, "cannon", |p, rk, ck| {
        let m_i = mi.q + rk[0];
        let n_j = nj.q + ck[0];
        let wa = wl(m_i * kb, eb);
        let wb = wl(kb * n_j, eb);
        // Row i's A ring runs along the row (color by column position), B's along the column (by row).
        let a_out = ColorId(base + ck[1] as u32);
        let a_in = ColorId(base + ck[2] as u32);
        let b_out = ColorId(base + nring + rk[1] as u32);
        let b_in = ColorId(base + nring + rk[2] as u32);
        let mut pe = Pe::default();
        if q == 1 {
            pe.push(task("own", vec![], fmac(eb), m_i * k * n_j, None, vec![], 1, 2 * m_i * k * n_j));
            return Some((format!("{}.cannon", st.name), pe));
        }
        let own_k = k - (q - 1) * kq;
        let own = pe.push(task(
            "own",
            vec![],
            fmac(eb),
            m_i * own_k * n_j,
            None,
            vec![send(a_out, wa, true), send(b_out, wb, true)],
            1,
            2 * m_i * own_k * n_j,
        ));
        let store = pe.push(task("store_a", vec![recv(a_in, wa)], mov(eb), m_i * kb, None, vec![], (q - 1) as u32, 0));
        let window = (q > 2).then_some(RunRange { first: 1, last: (q - 2) as u32 });
        let fwd = |c: ColorId, w: u64| Send { color: c, wavelets: w, streamed: true, runs: window };
        let mut sends = vec![];
        if window.is_some() {
            sends = vec![fwd(a_out, wa), fwd(b_out, wb)];
        }
        let step = pe.push(task(
            "step",
            vec![recv(b_in, wb), done(store, 1), done(own, 0)],
            fmac(eb),
            m_i * kq * n_j,
            Some(b_in),
            sends,
            (q - 1) as u32,
            2 * m_i * kq * n_j,
        ));
        pe.tasks[store].needs.push(after(step, 0, 1, 1));
        pe.tasks[step].needs.retain(|nd| !matches!(nd, Need::Done { times: 0, .. }));
        pe.sram = p.t.sram_max;
        let _ = (ca, cb);
        Some((format!("{}.cannon", st.name), pe))
    });
    if q > 1 {
        for pos in 0..q {
            let to = ring_succ(q, pos);
            let hops = (to as i64 - pos as i64).unsigned_abs() as u32;
            // A along the row: senders are column `pos`; B along the column: senders are row `pos`.
            let (dx_dir, dy_dir) = if to > pos { (Dir::East, Dir::South) } else { (Dir::West, Dir::North) };
            let col = p.rect_abs(f.row0(), pos as u32, q as u32, 1);
            p.route(ca(pos), col, Pattern::Line { dir: dx_dir, hops, multicast: false });
            let row = p.rect_abs(f.row0() + pos as u32, 0, 1, q as u32);
            p.route(cb(pos), row, Pattern::Line { dir: dy_dir, hops, multicast: false });
        }
    }
}

fn prog_local(p: &mut Prog) {
    let st = p.st;
    let Work::SingleAdd { n } = st.work.clone() else {
        return;
    };
    let f = p.f();
    let (rc, c) = (f.rc() as u64, f.w as u64);
    let e = Flat::new(n, rc, c);
    let eb = p.eb();
    let row_kinds: Vec<Vec<u64>> = (0..rc).map(|r| vec![e.row_kind(r)]).collect();
    let col_kinds: Vec<Vec<u64>> = (0..c).map(|cc| vec![e.col_kind(cc)]).collect();
    p.grid(f.row0(), &row_kinds, &col_kinds, "local", |p, rk, ck| {
        let v = match rk[0] {
            2 => e.s.q + 1,
            0 => e.s.q,
            _ => e.s.q + ck[0],
        };
        if v == 0 {
            return None;
        }
        let mut pe = Pe::default();
        pe.push(task("add", vec![], arith(eb), v, None, vec![], 1, v));
        pe.sram = p.t.sram_max;
        Some((format!("{}.add", st.name), pe))
    });
}

/// One side of a line reduced toward its centre PE: `n` PEs at distances 1..=n from the centre.
/// Every `g`-th PE (distance a multiple of g) leads a group: the members beyond it, up to the next
/// leader, send their buffers straight to it (one multi-hop train each, no PE on the way), and the
/// leaders either chain toward the centre (`chained`: each adds the sum from the leader beyond it as
/// it arrives and streams the running sum on, so a long vector pipelines along the chain) or send
/// their group sums straight to the centre (short vectors, where per-PE stages cost more than the
/// serialized trains).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Half {
    n: u64,
    g: u64,
    chained: bool,
}

impl Half {
    /// Picks the group size and mode with the smallest estimate (an estimate only; the timing comes
    /// from the engine): a chain stage costs about `stage` cycles beyond its hops, and trains that meet
    /// on one link or ramp go one after another.
    fn plan(n: u64, w: u64, stage: u64) -> Half {
        let mut best = (u64::MAX, Half { n, g: 1, chained: true });
        for g in 1..=n.max(1) {
            let leaders = n / g;
            let fan = (g - 1).min(n) * w;
            let chained = fan + g + leaders * (g + stage) + w;
            let direct = n + fan + 2 * leaders * w + 2 * stage;
            for (est, c) in [(chained, true), (direct, false)] {
                if est < best.0 {
                    best = (est, Half { n, g, chained: c });
                }
            }
        }
        best.1
    }
    /// Members sending straight to the leader (or centre) at distance d.
    fn fan(&self, d: u64) -> u64 {
        (self.g - 1).min(self.n.saturating_sub(d))
    }
    fn leaders(&self) -> u64 {
        self.n / self.g
    }
    /// Task kind of the PE at distance d >= 1: [0] member, [1, fan, chain input, parity] leader.
    fn kind(&self, d: u64) -> Vec<u64> {
        if !d.is_multiple_of(self.g) {
            return vec![0];
        }
        let k = d / self.g;
        vec![1, self.fan(d), (self.chained && (k + 1) * self.g <= self.n) as u64, k % 2]
    }
    /// Inputs (color offset within the side's colors, wavelets) of the PE at distance d (0: the centre).
    /// Side colors: 0 members' trains, 1 + parity the leaders' chain (or 1: leaders straight to the centre).
    fn inputs(&self, d: u64, w: u64) -> Vec<(u32, u64)> {
        let mut v = Vec::new();
        if !d.is_multiple_of(self.g) {
            return v;
        }
        let fan = self.fan(d);
        if fan > 0 {
            v.push((0, fan * w));
        }
        let k = d / self.g;
        if self.chained {
            if (k + 1) * self.g <= self.n {
                v.push((1 + ((k + 1) % 2) as u32, w));
            }
        } else if d == 0 && self.leaders() > 0 {
            v.push((1, self.leaders() * w));
        }
        v
    }
    /// (color offset, hops) the PE at distance d >= 1 sends its sum on.
    fn output(&self, d: u64) -> (u32, u64) {
        if !d.is_multiple_of(self.g) {
            (0, d % self.g)
        } else if self.chained {
            (1 + ((d / self.g) % 2) as u32, self.g)
        } else {
            (1, d)
        }
    }
}

/// Appends the tasks that add `inputs` (color, wavelets) to the buffer after task `last`, each paced by
/// its color, and sends the sum on `out`: streamed by the last add when that add takes one buffer (so
/// the next stage starts on the first wavelets), else once the adds are done; with no inputs, streamed by
/// task `last` (the load).
fn add_inputs(pe: &mut Pe, mut last: usize, inputs: &[(ColorId, u64)], elems: u64, w: u64, eb: u64, out: ColorId) {
    for (i, &(col, wv)) in inputs.iter().enumerate() {
        let final_one = i + 1 == inputs.len();
        let sends = if final_one { vec![send(out, w, wv == w)] } else { vec![] };
        let n = wv.div_ceil(w.max(1));
        last = pe.push(task("add", vec![recv(col, wv), done(last, 1)], arith(eb), n * elems, Some(col), sends, 1, 0));
    }
    if inputs.is_empty() {
        // Nothing to add: the load moves the buffer straight into the fabric.
        pe.tasks[last].sends.push(send(out, w, true));
    }
}

fn prog_allreduce(p: &mut Prog) {
    let st = p.st;
    let Work::AllReduce { elems } = st.work.clone() else {
        return;
    };
    let f = p.f();
    let (rc, c) = (f.rc() as u64, f.w as u64);
    let eb = p.eb();
    let w = wl(elems, eb);
    // Meet in the middle: every row reduces toward the centre column from both sides, the centre column
    // toward the centre PE from both sides, and the centre multicasts the sum back to the region,
    // streamed as its last add produces it. Each phase covers half a dimension, so the whole takes
    // about one diameter of hops plus the per-stage costs.
    // A chain stage beyond its hops: a ramp down, a task pick, an add and a ramp up (WSE-2: 1 + 2 + 1 + 1 cycles
    // and a little slack); only the choice of group size depends on it.
    let stage = 6;
    // The meeting point: the middle for short vectors. A long vector's two chains both pass the meeting PE's
    // one ramp, one after the other, so the side whose chain is shorter by about w / stage PEs delivers
    // its buffer while the other's head is still on the way.
    let meet = |len: u64| ((len - 1) - (w / stage).min(len - 1)) / 2;
    let (mx, my) = (meet(c), meet(rc));
    let west = Half::plan(mx, w, stage);
    let east = Half::plan(c - 1 - mx, w, stage);
    let north = Half::plan(my, w, stage);
    let south = Half::plan(rc - 1 - my, w, stage);
    // Colors: row phase 0..3 west side (members, chain pair), 3..6 east side; column phase 6..12; 12 the
    // broadcast.
    let base = p.algo_base();
    let col = move |side: u32, off: u32| ColorId(base + 3 * side + off);
    let bc = col(4, 0);
    // Role of a position along a dimension: (side, distance) with side 0 before the centre, 1 after, 2 the
    // centre.
    let side_of = |i: u64, m: u64| {
        if i < m {
            (0u32, m - i)
        } else if i > m {
            (1u32, i - m)
        } else {
            (2u32, 0)
        }
    };
    let kind_of = |i: u64, m: u64, a: &Half, b: &Half| -> Vec<u64> {
        match side_of(i, m) {
            (0, d) => [vec![0], a.kind(d)].concat(),
            (1, d) => [vec![1], b.kind(d)].concat(),
            _ => vec![2],
        }
    };
    // Inputs of a position (color, wavelets): the members' trains, then the chain (or the leaders' trains).
    type Ins = Vec<(ColorId, u64)>;
    let ins = |i: u64, m: u64, a: &Half, b: &Half, base: u32| -> (Ins, Ins) {
        let mut v: Vec<(u32, u32, u64)> = Vec::new();
        match side_of(i, m) {
            (0, d) => v.extend(a.inputs(d, w).into_iter().map(|(o, wv)| (0, o, wv))),
            (1, d) => v.extend(b.inputs(d, w).into_iter().map(|(o, wv)| (1, o, wv))),
            _ => {
                v.extend(a.inputs(0, w).into_iter().map(|(o, wv)| (0, o, wv)));
                v.extend(b.inputs(0, w).into_iter().map(|(o, wv)| (1, o, wv)));
            }
        }
        let conv = |t: &(u32, u32, u64)| (col(base + t.0, t.1), t.2);
        (v.iter().filter(|t| t.1 == 0).map(conv).collect(), v.iter().filter(|t| t.1 != 0).map(conv).collect())
    };
    let row_kinds: Vec<Vec<u64>> = (0..rc).map(|y| kind_of(y, my, &north, &south)).collect();
    let col_kinds: Vec<Vec<u64>> = (0..c).map(|x| kind_of(x, mx, &west, &east)).collect();
    let load = |pe: &mut Pe| pe.push(task("load", vec![], mov(eb), elems, None, vec![], 1, 0));
    let sum = |pe: &mut Pe| pe.push(task("sum", vec![recv(bc, w)], mov(eb), elems, Some(bc), vec![], 1, 0));
    // Off the centre column: the row phase only.
    let one_row = vec![vec![0u64]; rc as usize];
    p.grid(f.row0(), &one_row, &col_kinds, "ar", |p, _, ck| {
        let x = (0..c).find(|&x| col_kinds[x as usize] == ck)?;
        if x == mx {
            return None;
        }
        let mut pe = Pe::default();
        let last = load(&mut pe);
        let side = side_of(x, mx).0;
        let out = col(side, if side == 0 { west.output(mx - x).0 } else { east.output(x - mx).0 });
        let (fans, chains) = ins(x, mx, &west, &east, 0);
        add_inputs(&mut pe, last, &[fans, chains].concat(), elems, w, eb, out);
        sum(&mut pe);
        pe.sram = p.t.sram_max;
        Some((format!("{}.ar.row", st.name), pe))
    });
    // The centre column: both row chains, then the column phase.
    let centre_only: Vec<Vec<u64>> = (0..c).map(|x| vec![(x == mx) as u64]).collect();
    p.grid(f.row0(), &row_kinds, &centre_only, "arc", |p, rk, ck| {
        if ck[0] == 0 {
            return None;
        }
        let y = (0..rc).find(|&y| row_kinds[y as usize] == rk)?;
        let mut pe = Pe::default();
        let (rf, rch) = ins(mx, mx, &west, &east, 0);
        let (cf, cch) = ins(y, my, &north, &south, 2);
        let out = match side_of(y, my) {
            (0, d) => col(2, north.output(d).0),
            (1, d) => col(3, south.output(d).0),
            _ => bc,
        };
        // Members' trains first (they arrive early), the chains last: the last add streams the sum on.
        let last = load(&mut pe);
        add_inputs(&mut pe, last, &[rf, cf, rch, cch].concat(), elems, w, eb, out);
        sum(&mut pe);
        pe.sram = p.t.sram_max;
        let role = if out == bc { "centre" } else { "col" };
        Some((format!("{}.ar.{role}", st.name), pe))
    });
    let out_of = |i: u64, m: u64, a: &Half, b: &Half, base: u32, dirs: (Dir, Dir)| {
        let (side, d) = side_of(i, m);
        let (half, dir) = match side {
            0 => (a, dirs.0),
            1 => (b, dirs.1),
            _ => return None,
        };
        let (o, hops) = half.output(d);
        Some((col(base + side, o), Pattern::Line { dir, hops: hops as u32, multicast: false }))
    };
    for x in 0..c {
        if let Some((color, pat)) = out_of(x, mx, &west, &east, 0, (Dir::East, Dir::West)) {
            let rect = p.rect_abs(f.row0(), x as u32, rc as u32, 1);
            p.route(color, rect, pat);
        }
    }
    for y in 0..rc {
        if let Some((color, pat)) = out_of(y, my, &north, &south, 2, (Dir::South, Dir::North)) {
            let rect = p.rect_abs(f.row0() + y as u32, mx as u32, 1, 1);
            p.route(color, rect, pat);
        }
    }
    let root = p.rect_abs(f.row0() + my as u32, mx as u32, 1, 1);
    p.route(bc, root, Pattern::Rect { dx: -(mx as i32), dy: -(my as i32), w: c as u32, h: rc as u32 });
}

/// Runs per iteration of output o (1 for outputs emitted once per iteration).
pub(crate) fn out_runs(st: &Stage, t: &Tiling, o: usize) -> u32 {
    if per_run_output(st, o) {
        t.runs
    } else {
        1
    }
}

/// True when output o leaves once per compute run (else once per iteration).
pub(crate) fn per_run_output(st: &Stage, o: usize) -> bool {
    match st.work {
        Work::Accum { .. } => false,
        Work::RowReduce { colsum, scalar, .. } => Some(o) != colsum && Some(o) != scalar,
        Work::Elementwise { accumulate, .. } => !accumulate,
        _ => true,
    }
}

/// Values per iteration of the banded weight slot in band [a, b): columns, or compute rows (`rows`).
pub(crate) fn weight_band_values(st: &Stage, t: &Tiling, a: u32, b: u32, rows: bool) -> u64 {
    let f = t.frame;
    let (rc, c) = (f.rc() as u64, f.w as u64);
    let (r_range, c_range) = if rows { ((a as u64, b as u64), (0, c)) } else { ((0, rc), (a as u64, b as u64)) };
    match (&st.work, t.algo) {
        (Work::Matmul { k, cols, .. }, Algo::GemvTree) => {
            let tree = Tree::new(rc);
            let kr = split(*k, tree.compute_rows());
            let nc = split(*cols, c);
            // The band's compute rows, counted from the first's index (one pass: `compute_index` per row
            // would walk every row above it, quadratic in the rows for each of the region's columns).
            let mut i = tree.compute_index(r_range.0);
            let mut krs = 0;
            for r in r_range.0..r_range.1 {
                if tree.role(r) == 0 {
                    krs += kr.at(i);
                    i += 1;
                }
            }
            krs * (c_range.0..c_range.1).map(|x| nc.at(x)).sum::<u64>()
        }
        (Work::Matmul { k, cols, .. }, Algo::GemvBroadcast) => {
            let s3 = Flat::new(*cols, rc, c);
            k * (r_range.0..r_range.1).map(|r| (c_range.0..c_range.1).map(|x| s3.at(r, x)).sum::<u64>()).sum::<u64>()
        }
        _ => match st.work {
            Work::Matmul { b: Operand::Slot(s), .. } => st.inputs[s].values,
            _ => 0,
        },
    }
}

/// Values per output run of output o produced in columns [c0, c1).
pub(crate) fn out_band_values(st: &Stage, t: &Tiling, o: usize, c0: u32, c1: u32) -> u64 {
    let f = t.frame;
    match st.work {
        Work::Accum { k, cols, out, .. } if o == out => {
            let nc = split(cols, f.w as u64);
            k * (c0..c1).map(|x| nc.at(x as u64)).sum::<u64>()
        }
        Work::Matmul { rows, cols, out, .. } if o == out && t.algo == Algo::GemvBroadcast => {
            // What `prog_bcast` gathers: every compute row's PEs of the band.
            let rr = rows / t.runs.max(1) as u64;
            let s3 = Flat::new(cols, f.rc() as u64, f.w as u64);
            rr * (0..f.rc() as u64).map(|r| (c0..c1).map(|x| s3.at(r, x as u64)).sum::<u64>()).sum::<u64>()
        }
        Work::Matmul { rows, cols, out, .. } if o == out && t.algo == Algo::GemvTree => {
            // What `prog_tree` gathers: the root row's columns of the band.
            let rr = rows / t.runs.max(1) as u64;
            let nc = split(cols, f.w as u64);
            rr * (c0..c1).map(|x| nc.at(x as u64)).sum::<u64>()
        }
        _ => st.outputs[o].values / out_runs(st, t, o) as u64,
    }
}

/// Whether output o, streamed to a port, may leave in column bands each through its own channel:
/// `out_band_values` knows what each band of its gather carries.
pub(crate) fn port_bandable_output(st: &Stage, t: &Tiling, o: usize) -> bool {
    match st.work {
        Work::Matmul { out, .. } => out == o && matches!(t.algo, Algo::GemvBroadcast | Algo::GemvTree),
        _ => false,
    }
}

/// The slot that takes weights in bands (the stationary matrix), if any.
pub(crate) fn banded_slot(st: &Stage) -> Option<usize> {
    match st.work {
        Work::Matmul { b: Operand::Slot(s), .. } if st.inputs[s].kind == SlotKind::Weights => Some(s),
        _ => None,
    }
}

/// Whether output o may leave in column bands (through several ports).
pub(crate) fn bandable_output(st: &Stage, o: usize) -> bool {
    matches!(st.work, Work::Accum { out, .. } if out == o)
}
