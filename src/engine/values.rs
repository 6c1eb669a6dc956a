//! Values through the engine (functional runs): every PE's SRAM holds real values, every task computes
//! real values when the engine starts it, and every train carries its sender's values.
//!
//! What a task computes is the program's data side table (`mesh::data`): a kernel that reads the
//! payloads of the trains the task claimed (in need order) and its PE's SRAM, and says what each of
//! its sends carries. Payloads are fragments tagged with the slice of the graph tensor they hold (the
//! addresses a real program knows statically), so a wrong route or a missing reduction shows up as an
//! error naming the PE, the task and the slice, or as a wrong number, never as a silent success.
//!
//! Architecture invariant: this module observes the engine and never steers it: no timing, ordering
//! or wavelet count depends on a value, so a run's timing is identical with and without values.
//! Partial sums that meet at a PE are added in the order of their senders' ids (never arrival order),
//! so values do not depend on timing or on the thread count.
//!
//! Rounding model: arithmetic in fp32 (sums over k in increasing order within a PE, partial sums added
//! in sender order); values stored in SRAM and finished values sent in wavelets are rounded to the
//! storage dtype (fp16/bf16: nearest even) when the program's dtype is narrower than fp32. Partial sums
//! (`Frag::cover` > 0: a MeshGEMV's chains and reducers, row statistics, column sums) are accumulators
//! and travel in fp32, one value per 32-bit wavelet, as the compiler counts them (`mesh::ACC_BYTES`):
//! rounding them at every hop made a sum's error grow with the length of its reduction chain (a MoE
//! router's logits, a norm's dgamma over 128 tokens), past what the training bound allows.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::mesh::data::{AttnShape, EwOp, Grid, Kernel, ProgramData, RowOp, Share, TaskData, View};
use crate::mesh::{Coord, Task, ACC_BYTES};

/// Statistics travel as fragments of this pseudo-tensor: per row (count, a, b).
const STATS: u32 = u32::MAX;

/// An attention gradient per query head (`Kernel::AttnKvGrad`, before `Kernel::HeadSum` sums the heads
/// of each KV head) travels as fragments of its output tensor's id with this bit set, laid out
/// `[kv, batch * heads * head_dim]`.
const PER_HEAD: u32 = 1 << 31;

/// An expert linear's weight gradient with fewer slots than experts (`Kernel::WgradAcc` with
/// `Grouped::slots < experts`, before `Kernel::ExpertSum` sums each expert's slots) travels as fragments
/// of its output tensor's id with this bit set, laid out as the weight with slots for experts.
const PER_SLOT: u32 = 1 << 30;

/// A partial run's mark that a train carries no values (a refused region sent it, or a task that
/// claimed the mark): a fragment of this pseudo-tensor with no values.
const NO_VALUES: u32 = u32::MAX - 1;

/// A MoE layer's slot map (each slot's expert, -1 for a slot no token was routed to) travels as a
/// fragment of this pseudo-tensor, `[1, slots]`: the dispatch makes it, and it rides with every send
/// of every task that claimed it (the dispatched rows, the expert linears' outputs) until the combine.
/// The timing program counts it as the compiler lays it out (`compile::stage::count_slot_maps`: one
/// wavelet per dispatched row carrying its slot's expert id); here it rides as one fragment per payload.
const ROUTING: u32 = u32::MAX - 2;

/// A block of a graph tensor viewed as rows of `view_cols`: rows r0..r1, columns c0..c1, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Frag {
    pub tensor: u32,
    pub view_cols: u64,
    pub r0: u64,
    pub r1: u64,
    pub c0: u64,
    pub c1: u64,
    /// Terms summed into every value so far (a partial sum); 0 for a finished value.
    pub cover: u64,
    /// Global id of the agent that made it (partial sums are added in this order).
    pub src: u32,
    pub vals: Arc<[f32]>,
}

impl Frag {
    /// A finished fragment (not a partial sum) of `tensor` (viewed `view_cols` wide): rows `r0..r1`
    /// and columns `c0..c1`, made by agent `src`.
    fn finished(
        tensor: u32,
        view_cols: u64,
        (r0, r1): (u64, u64),
        (c0, c1): (u64, u64),
        src: u32,
        vals: impl Into<Arc<[f32]>>,
    ) -> Frag {
        Frag { tensor, view_cols, r0, r1, c0, c1, cover: 0, src, vals: vals.into() }
    }

    fn slice(&self) -> String {
        format!("t{}[{}..{}, {}..{}]", self.tensor, self.r0, self.r1, self.c0, self.c1)
    }
    fn same_slice(&self, o: &Frag) -> bool {
        (self.tensor, self.view_cols, self.r0, self.r1, self.c0, self.c1)
            == (o.tensor, o.view_cols, o.r0, o.r1, o.c0, o.c1)
    }
}

/// What one train carries.
pub type Payload = Arc<[Frag]>;

/// What a functional run's agents hold at the end: a PE's (with its coordinate) or a port's (None).
pub type Results = Vec<(Option<Coord>, Frag)>;

/// The coordinate a partial run gives the finished values its output gateways passed on (every
/// region's outputs, a development aid to check intermediate tensors): no PE has it.
pub const TAP: Coord = Coord { x: u32::MAX, y: u32::MAX };

/// Storage rounding of values kept in SRAM and sent in wavelets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    Fp32,
    Fp16,
    Bf16,
}

impl Storage {
    pub fn round(self, x: f32) -> f32 {
        match self {
            Storage::Fp32 => x,
            Storage::Fp16 => half::f16::from_f32(x).to_f32(),
            Storage::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }
    pub fn bytes(self) -> u64 {
        match self {
            Storage::Fp32 => 4,
            Storage::Fp16 | Storage::Bf16 => 2,
        }
    }
}

/// Numerics the graph does not carry (from the model's config), as the reference uses them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Numerics {
    pub norm_eps: f64,
    /// Rotary: pairs (2i, 2i+1) (GPT-J) instead of (i, i + rot/2).
    pub rotary_interleaved: bool,
    /// GELU with the tanh approximation (else erf).
    pub gelu_tanh: bool,
    pub sliding_window: Option<u64>,
}

/// Everything a functional run starts from.
#[derive(Debug)]
pub struct Setup {
    pub data: Arc<ProgramData>,
    /// Values the wafer holds before the run (weights, pre-placed operands, KV caches) and the host's
    /// inputs (token ids as floats), by graph tensor id, row-major.
    pub tensors: BTreeMap<u32, Arc<[f32]>>,
    pub storage: Storage,
    /// Integer tensors (token ids, positions, token types): carried exactly, never rounded to the
    /// storage dtype (a wafer sends ids as integers; fp16 would turn id 7592 into 7592 but 30001 into
    /// 30000, bf16 every id above 256).
    pub ints: std::collections::BTreeSet<u32>,
    pub numerics: Numerics,
    /// Rotary frequencies per rotated width (`Numerics::inv_freq` of the reference's numerics).
    pub inv_freq: BTreeMap<u64, Vec<f64>>,
    /// Adam's hyperparameters (learning rate, betas, epsilon) and the step number, as the reference's.
    pub adam: (f64, f64, f64, f64, u64),
    /// A partial run: the program's refused regions (`TaskData::Refused`) run without values, and so
    /// does every task downstream of them; only the results computed in full are read back.
    pub partial: bool,
    /// Tensors whose finished values the output gateways keep as tapped results in any run (a MoE
    /// top-k's probabilities: the wafer's routing, which the check compares with the reference's).
    pub taps: std::collections::BTreeSet<u32>,
}

impl Setup {
    /// Whether an output gateway keeps the finished values of `tensor` it passes on as a tapped result:
    /// every tensor in a partial run, the `taps` in any run.
    fn keeps(&self, tensor: u32) -> bool {
        self.partial || self.taps.contains(&tensor)
    }
}

/// One PE's (or port's) values.
#[derive(Debug, Default)]
struct Pe {
    /// The result the PE's last kernel left (an accumulator, a lookup, an elementwise share).
    acc: Vec<Frag>,
    /// Row statistics of the current run.
    stats: Option<Frag>,
    /// A cross-entropy root's loss so far: the sum of its rows' losses and how many rows.
    loss: (f32, u64),
    /// A norm backward's column sums over the PE's rows so far (dgamma, dbeta: partial sums).
    cols: Vec<Frag>,
    /// Operands kept for later tasks (stored operands, the row a reduction applies to).
    store: Vec<Frag>,
    /// A port's collected results.
    kept: Vec<Frag>,
    /// An attention PE's part of the updated KV cache (its keys or values, resident and fresh).
    cache: Vec<Frag>,
    /// Weights streamed in (`Kernel::Load`), whole tensors, by layer.
    weights: Vec<Frag>,
    /// A partial run: the finished values this output gateway passed on.
    tapped: Vec<Frag>,
    /// What each send of the running task carries.
    out: Vec<Option<Payload>>,
    /// The slot map of the MoE layer whose dispatched rows this PE's running task claimed.
    route: Option<Frag>,
    /// Resident tiles loaded (once, as the program's initial SRAM image) and their bytes.
    resident: bool,
    sram: u64,
}

/// The values of one partition's agents (local indices as in `sim::Part`).
#[derive(Debug)]
pub struct PartValues {
    setup: Arc<Setup>,
    pes: Vec<Pe>,
    /// `WAFER_VALUES_DEBUG` set: every kernel prints what it claimed (stderr).
    debug: bool,
}

/// Where a task is: for error messages and kernels.
#[derive(Clone, Copy)]
pub struct At<'a> {
    pub id: u32,
    pub coord: Coord,
    pub template: usize,
    pub k: usize,
    /// The run starting (1-based).
    pub run: u64,
    pub task: &'a Task,
    pub sram_bytes: u64,
}

impl At<'_> {
    fn name(&self) -> String {
        format!("PE ({},{}) task `{}` run {}", self.coord.x, self.coord.y, self.task.name, self.run)
    }
    fn pos(&self, g: &Grid) -> Result<(u64, u64), String> {
        g.pos(self.coord).ok_or_else(|| format!("{}: outside its kernel's grid", self.name()))
    }
}

fn flat_index(g: &Grid, r: u64, c: u64) -> (u64, u64) {
    (r * g.cols as u64 + c, g.rows as u64 * g.cols as u64)
}

impl PartValues {
    pub fn new(setup: Arc<Setup>, agents: usize) -> PartValues {
        let debug = std::env::var_os("WAFER_VALUES_DEBUG").is_some();
        PartValues { setup, pes: (0..agents).map(|_| Pe::default()).collect(), debug }
    }

    /// Runs task `at.k`'s kernel on the payloads it claimed (one list per `Recv` need, in need order).
    pub fn start(&mut self, local: usize, at: &At, claimed: Vec<Vec<Payload>>) -> Result<(), String> {
        let data = Arc::clone(&self.setup.data);
        let td = data.tasks.get(at.template).and_then(|t| t.get(at.k)).unwrap_or(&TaskData::None);
        let n_sends = at.task.sends.len();
        let claimed: Vec<Frag> = claimed.into_iter().flatten().flat_map(|p| p.to_vec()).collect();
        // A MoE slot map rides with the rows it came with: kept for the task's kernel, passed on with
        // each of its sends (but for the combine, where the dispatched rows end).
        let (routing, claimed): (Vec<Frag>, Vec<Frag>) = claimed.into_iter().partition(|f| f.tensor == ROUTING);
        if let Some(r) = routing.first() {
            self.pes[local].route = Some(r.clone());
        }
        let ends_routing = match td {
            TaskData::Kernel(k) | TaskData::Looped { kernel: k, .. } => {
                matches!(k, Kernel::MoeCombine { .. } | Kernel::MoeDispatchGrad { .. } | Kernel::ExpertSum { .. })
            }
            _ => false,
        };
        if self.debug {
            let mut got: Vec<String> =
                claimed.iter().map(|f| format!("t{}[{}..{},{}..{}]", f.tensor, f.r0, f.r1, f.c0, f.c1)).collect();
            got.sort();
            eprintln!("{} claimed {}", at.name(), got.join(" "));
        }
        // A partial run: nothing to compute from where a refused region's mark arrived (or was kept).
        let marked = |frags: &[Frag]| frags.iter().any(|f| f.tensor == NO_VALUES);
        if self.setup.partial && (matches!(td, TaskData::Refused) || marked(&claimed) || marked(&self.pes[local].store))
        {
            let mark = Frag::finished(NO_VALUES, 0, (0, 0), (0, 0), at.id, Vec::new());
            let pe = &mut self.pes[local];
            pe.acc.clear();
            pe.stats = None;
            if !marked(&pe.store) {
                pe.store.push(mark.clone());
            }
            pe.out = vec![Some(Payload::from(vec![mark])); n_sends];
            return Ok(());
        }
        let outs = match td {
            TaskData::None | TaskData::Refused => vec![None; n_sends],
            TaskData::Kernel(kernel) => self.kernel(local, at, kernel, claimed)?,
            &TaskData::Looped { ref kernel, lp, per_iter, stride, offset } => {
                // The chunk this run is: its iteration's tensors, runs counted within the iteration.
                let maps = data.loops.get(lp as usize).map_or(&[][..], |l| l.maps.as_slice());
                let chunk = (at.run - 1) * stride + offset;
                let Some(m) = maps.get((chunk / per_iter.max(1)) as usize) else {
                    return Err(format!(
                        "{}: chunk {chunk} is past the loop's {} iterations of {per_iter}",
                        at.name(),
                        maps.len()
                    ));
                };
                let kernel = kernel.map_tensors(|t| m.get(&t).copied().unwrap_or(t));
                let inner = At { run: chunk % per_iter.max(1) + 1, ..*at };
                self.kernel(local, &inner, &kernel, claimed)?
            }
        };
        let outs = match routing.first() {
            Some(r) if !ends_routing => outs
                .into_iter()
                .map(|p| p.map(|p| p.iter().cloned().chain(std::iter::once(r.clone())).collect::<Vec<_>>().into()))
                .collect(),
            _ => outs,
        };
        self.pes[local].out = outs;
        Ok(())
    }

    /// What send `i` of the task that agent `local` runs carries.
    pub fn payload(&self, local: usize, i: usize) -> Option<Payload> {
        self.pes[local].out.get(i).cloned().flatten()
    }

    /// What the given agents (local index, coordinate; None for a port) hold at the end: a PE's
    /// accumulator and its part of an updated KV cache where it lies in a readout rectangle,
    /// everything a port collected.
    pub fn results(&self, agents: impl Iterator<Item = (usize, Option<Coord>)>) -> Results {
        let rects: Vec<_> = self.setup.data.readouts.iter().filter_map(|r| r.rect).collect();
        let mut out = Vec::new();
        for (l, c) in agents {
            let Some(pe) = self.pes.get(l) else { continue };
            out.extend(pe.tapped.iter().map(|f| (Some(TAP), f.clone())));
            match c {
                Some(c) if rects.iter().any(|r| r.contains(c)) => {
                    out.extend(pe.acc.iter().chain(&pe.cache).map(|f| (Some(c), f.clone())))
                }
                Some(_) => {}
                None => out.extend(pe.kept.iter().map(|f| (None, f.clone()))),
            }
        }
        out
    }

    fn tensor(&self, t: u32, at: &At) -> Result<Arc<[f32]>, String> {
        self.setup.tensors.get(&t).cloned().ok_or_else(|| format!("{}: no values for tensor t{t}", at.name()))
    }

    /// A weight a kernel reads: resident (the step's initial SRAM image), or streamed in, whole, and
    /// loaded by this PE (`Kernel::Load`) for the layer its iteration runs.
    fn weight(&self, local: usize, t: u32, at: &At) -> Result<Arc<[f32]>, String> {
        if !self.setup.data.streamed.contains(&t) {
            return self.tensor(t, at);
        }
        let whole = |f: &&Frag| f.tensor == t && f.r0 == 0 && f.c0 == 0 && f.c1 == f.view_cols && f.cover == 0;
        match self.pes[local].weights.iter().find(whole) {
            Some(f) => Ok(Arc::clone(&f.vals)),
            None => {
                let got: Vec<String> = self.pes[local].weights.iter().map(|f| f.slice()).take(6).collect();
                Err(format!(
                    "{}: weight t{t} has not streamed in whole (it loaded {}): a missing or misrouted MemoryX stream, \
                     or another layer's weights in its place",
                    at.name(),
                    if got.is_empty() { "nothing".to_string() } else { got.join(" ") }
                ))
            }
        }
    }

    /// Loads a PE's resident tiles once (`values` of them): its SRAM image at the start of the step,
    /// checked against the PE's SRAM.
    fn resident(&mut self, local: usize, at: &At, values: u64) -> Result<(), String> {
        self.resident_bytes(local, at, values * self.setup.storage.bytes())
    }

    /// `resident` in bytes, for a PE whose SRAM image mixes the storage dtype with fp32 accumulators.
    fn resident_bytes(&mut self, local: usize, at: &At, bytes: u64) -> Result<(), String> {
        let pe = &mut self.pes[local];
        if pe.resident {
            return Ok(());
        }
        pe.resident = true;
        pe.sram += bytes;
        if pe.sram > at.sram_bytes {
            return Err(format!(
                "{}: its tiles and buffers take {} bytes, more than the PE's {} bytes of SRAM",
                at.name(),
                pe.sram,
                at.sram_bytes
            ));
        }
        Ok(())
    }

    /// The slot map (each slot's expert, -1: none) of the dispatched rows the running task claimed.
    fn slot_map(&self, local: usize, at: &At, slots: u64) -> Result<Vec<f32>, String> {
        match &self.pes[local].route {
            Some(f) if f.vals.len() as u64 == slots => Ok(f.vals.to_vec()),
            Some(f) => Err(format!("{}: a slot map of {} slots, expected {slots}", at.name(), f.vals.len())),
            None => Err(format!("{}: no MoE slot map came with the dispatched rows", at.name())),
        }
    }

    /// Keeps a partial sum as the PE's accumulator and gives what its sends carry: columns
    /// `n0..n0 + nl` of `out` (viewed `view_cols` wide), rows `rows`, summed over `cover` terms of k.
    #[allow(clippy::too_many_arguments)]
    fn keep_partial(
        &mut self,
        local: usize,
        at: &At,
        out: u32,
        view_cols: u64,
        rows: (u64, u64),
        (n0, nl): (u64, u64),
        cover: u64,
        acc: Vec<f32>,
    ) -> Payload {
        let f = Frag {
            tensor: out,
            view_cols,
            r0: rows.0,
            r1: rows.1,
            c0: n0,
            c1: n0 + nl,
            cover,
            src: at.id,
            vals: acc.into(),
        };
        self.pes[local].acc = vec![f];
        self.rounded(&self.pes[local].acc)
    }

    /// What a gateway that finished one whole block `f` (a head or expert sum) sends: the block rounded
    /// to the storage dtype, on each send the part its view takes (all of it without a view); a partial
    /// run keeps the block as a tapped result.
    fn send_views(&mut self, local: usize, f: Frag, views: &[Option<View>], n_sends: usize) -> Vec<Option<Payload>> {
        let f = self.rounded(std::slice::from_ref(&f))[0].clone();
        if self.setup.keeps(f.tensor) {
            self.pes[local].tapped.push(f.clone());
        }
        (0..n_sends)
            .map(|i| {
                let sel: Vec<Frag> = match views.get(i).copied().flatten() {
                    None => vec![f.clone()],
                    Some(v) => crop(&f, &v).into_iter().collect(),
                };
                Some(Payload::from(sel))
            })
            .collect()
    }

    fn rounded(&self, frags: &[Frag]) -> Payload {
        let st = self.setup.storage;
        frags
            .iter()
            .map(|f| match self.setup.ints.contains(&f.tensor) || f.tensor == ROUTING || f.cover > 0 {
                true => f.clone(),
                false => Frag { vals: f.vals.iter().map(|&v| st.round(v)).collect(), ..f.clone() },
            })
            .collect::<Vec<_>>()
            .into()
    }

    /// Rows `rows` of the view `v`, from the fragments `frags` (and what the PE stored): every value
    /// must be there, finished.
    fn read(&self, local: usize, at: &At, frags: &[Frag], v: &View, rows: (u64, u64)) -> Result<Vec<f32>, String> {
        let w = v.width as usize;
        let n = (rows.1 - rows.0) as usize * w;
        if let Some(parts) = self.setup.data.concats.get(&v.base) {
            // A concatenation: its columns come from its parts.
            let mut buf = vec![0f32; n];
            let mut off = 0u64;
            for p in parts {
                let (lo, hi) = (v.c0.max(off), (v.c0 + v.width).min(off + p.width));
                if lo < hi {
                    let part =
                        self.read(local, at, frags, &View { c0: p.c0 + lo - off, width: hi - lo, ..*p }, rows)?;
                    let pw = (hi - lo) as usize;
                    for r in 0..(rows.1 - rows.0) as usize {
                        let dst = r * w + (lo - v.c0) as usize;
                        buf[dst..dst + pw].copy_from_slice(&part[r * pw..(r + 1) * pw]);
                    }
                }
                off += p.width;
            }
            return Ok(buf);
        }
        let mut buf = vec![0f32; n];
        let mut have = vec![false; n];
        for f in frags.iter().chain(&self.pes[local].store).filter(|f| f.tensor == v.base) {
            if f.view_cols != v.cols
                && f.cover == 0
                && (f.view_cols.is_multiple_of(v.cols) || v.cols.is_multiple_of(f.view_cols))
            {
                // The same row-major tensor in rows of another length (a grouped linear's `[capacity,
                // slots * n]` and the dispatched rows' `[slots * capacity, n]`): element by element.
                let fw = f.c1 - f.c0;
                for (i, &x) in f.vals.iter().enumerate() {
                    let flat = (f.r0 + i as u64 / fw) * f.view_cols + f.c0 + i as u64 % fw;
                    let (r, c) = (flat / v.cols, flat % v.cols);
                    if r >= rows.0 && r < rows.1 && c >= v.c0 && c < v.c0 + v.width {
                        let j = (r - rows.0) as usize * w + (c - v.c0) as usize;
                        buf[j] = x;
                        have[j] = true;
                    }
                }
                continue;
            }
            if f.view_cols != v.cols {
                return Err(format!(
                    "{}: received {} in rows of {}, expected {}",
                    at.name(),
                    f.slice(),
                    f.view_cols,
                    v.cols
                ));
            }
            if f.cover != 0 {
                return Err(format!("{}: received {}, an unfinished partial sum", at.name(), f.slice()));
            }
            if f.r1 <= rows.0 || f.r0 >= rows.1 || f.c1 <= v.c0 || f.c0 >= v.c0 + v.width {
                continue;
            }
            let fw = (f.c1 - f.c0) as usize;
            for r in f.r0.max(rows.0)..f.r1.min(rows.1) {
                for c in f.c0.max(v.c0)..f.c1.min(v.c0 + v.width) {
                    let i = (r - rows.0) as usize * w + (c - v.c0) as usize;
                    buf[i] = f.vals[(r - f.r0) as usize * fw + (c - f.c0) as usize];
                    have[i] = true;
                }
            }
        }
        if let Some(i) = have.iter().position(|h| !h) {
            let mut got: Vec<(u64, u64, u64, u64)> = frags
                .iter()
                .chain(&self.pes[local].store)
                .filter(|f| f.tensor == v.base)
                .map(|f| (f.r0, f.r1, f.c0, f.c1))
                .collect();
            got.sort();
            got.dedup();
            let shown: Vec<String> =
                got.iter().take(6).map(|g| format!("[{}..{}, {}..{}]", g.0, g.1, g.2, g.3)).collect();
            return Err(format!(
                "{}: element ({}, {}) of t{} (columns {}..{} of t{}) is not among the values it claimed ({}{}): a \
                 wrong or missing route, or wavelets of another run taken in its place",
                at.name(),
                rows.0 + (i / w.max(1)) as u64,
                i % w.max(1),
                v.base,
                v.c0,
                v.c0 + v.width,
                v.base,
                shown.join(" "),
                if got.len() > 6 { " ..." } else { "" }
            ));
        }
        Ok(buf)
    }

    fn run_rows(at: &At, rows_per_run: u64) -> (u64, u64) {
        ((at.run - 1) * rows_per_run, at.run * rows_per_run)
    }

    fn kernel(
        &mut self,
        local: usize,
        at: &At,
        kernel: &Kernel,
        claimed: Vec<Frag>,
    ) -> Result<Vec<Option<Payload>>, String> {
        let st = self.setup.storage;
        let n_sends = at.task.sends.len();
        let all = |p: Payload| vec![Some(p); n_sends];
        match kernel {
            &Kernel::GemvPartial { grid, x, w, w_out_in, k, n, out } => {
                let (r, c) = at.pos(&grid)?;
                let (k0, kl) = Share { n: k, parts: grid.rows as u64 }.range(r);
                let (n0, nl) = Share { n, parts: grid.cols as u64 }.range(c);
                let (xv, wv) = (self.tensor(x, at)?, self.tensor(w, at)?);
                if xv.len() as u64 != k || wv.len() as u64 != k * n {
                    return Err(format!(
                        "{}: operands of {} and {} values for a {k}x{n} GEMV",
                        at.name(),
                        xv.len(),
                        wv.len()
                    ));
                }
                // x's slice, the tile and an arriving partial in the storage dtype; the partial sum in fp32.
                self.resident_bytes(local, at, (kl + kl * nl + nl) * st.bytes() + nl * ACC_BYTES)?;
                let mut acc = vec![0f32; nl as usize];
                for (j, a) in acc.iter_mut().enumerate() {
                    let col = n0 + j as u64;
                    for kk in k0..k0 + kl {
                        let wi = if w_out_in { col * k + kk } else { kk * n + col };
                        *a += st.round(xv[kk as usize]) * st.round(wv[wi as usize]);
                    }
                }
                Ok(all(self.keep_partial(local, at, out, n, (0, 1), (n0, nl), kl, acc)))
            }
            &Kernel::Accumulate { total } => {
                let mut parts = claimed;
                parts.sort_by_key(|f| f.src);
                let pe = &mut self.pes[local];
                let [acc] = pe.acc.as_mut_slice() else {
                    return Err(format!("{}: adds partial sums but holds no accumulator", at.name()));
                };
                let mut vals = acc.vals.to_vec();
                add_partials(acc, &mut vals, &parts, at, "accumulates")?;
                acc.vals = vals.into();
                if let Some(t) = total {
                    complete(acc, t, at)?;
                }
                Ok(all(self.rounded(&self.pes[local].acc)))
            }
            Kernel::Relay => Ok(all(in_order(claimed).into())),
            Kernel::LocalAdd { grid, inputs, n, out } => {
                let (r, c) = at.pos(grid)?;
                let (idx, parts) = flat_index(grid, r, c);
                let (lo, len) = Share { n: *n, parts }.range(idx);
                let ins: Vec<Arc<[f32]>> = inputs.iter().map(|&t| self.tensor(t, at)).collect::<Result<_, _>>()?;
                if ins.iter().any(|v| (v.len() as u64) < lo + len) {
                    return Err(format!("{}: an operand shorter than its share", at.name()));
                }
                self.resident(local, at, (inputs.len() as u64 + 1) * len)?;
                let vals: Vec<f32> = (lo..lo + len)
                    .map(|i| ins.iter().map(|v| st.round(v[i as usize])).fold(0f32, |a, b| a + b))
                    .collect();
                self.pes[local].acc = flat_frags(*out, *n, lo, &vals, at.id);
                Ok(all(self.rounded(&self.pes[local].acc)))
            }
            &Kernel::TreePartial { grid, tree, a, w, w_out_in, k, n, rows_per_run, out, grouped: Some(gr) } => {
                let (r, c) = at.pos(&grid)?;
                let (k0, kl) = Share { n: k, parts: tree.compute_rows() }.range(tree.compute_index(r));
                let (n0, nl) = Share { n: gr.slots * n, parts: grid.cols as u64 }.range(c);
                let rows = Self::run_rows(at, rows_per_run);
                let map = self.slot_map(local, at, gr.slots)?;
                // The PE's contraction slice of every slot, side by side.
                let mut x = vec![0f32; (rows_per_run * gr.slots * kl) as usize];
                for g in 0..gr.slots {
                    let xs = View { c0: g * k + k0, width: kl, ..a };
                    let part = self.read(local, at, &claimed, &xs, rows)?;
                    for i in 0..rows_per_run as usize {
                        let dst = i * (gr.slots * kl) as usize + (g * kl) as usize;
                        x[dst..dst + kl as usize].copy_from_slice(&part[i * kl as usize..(i + 1) * kl as usize]);
                    }
                }
                let wv = self.weight(local, w, at)?;
                self.resident_bytes(local, at, kl * nl * st.bytes() + 2 * nl * rows_per_run * ACC_BYTES)?;
                let acc = grouped_matmul(&x, &wv, &map, rows_per_run, (k0, kl), (n0, nl), (k, n), w_out_in, st);
                Ok(all(self.keep_partial(local, at, out, gr.slots * n, rows, (n0, nl), kl, acc)))
            }
            &Kernel::TreePartial { grid, tree, a, w, w_out_in, k, n, rows_per_run, out, grouped: None } => {
                let (r, c) = at.pos(&grid)?;
                let (k0, kl) = Share { n: k, parts: tree.compute_rows() }.range(tree.compute_index(r));
                let (n0, nl) = Share { n, parts: grid.cols as u64 }.range(c);
                let rows = Self::run_rows(at, rows_per_run);
                let xs = View { c0: a.c0 + k0, width: kl, ..a };
                let x = self.read(local, at, &claimed, &xs, rows)?;
                let wv = self.weight(local, w, at)?;
                if wv.len() as u64 != k * n || a.width != k {
                    return Err(format!("{}: a weight of {} values for a {k}x{n} matmul", at.name(), wv.len()));
                }
                self.resident_bytes(local, at, kl * nl * st.bytes() + 2 * nl * rows_per_run * ACC_BYTES)?;
                let acc = block_matmul(&x, &wv, rows_per_run, (k0, kl), (n0, nl), (k, n), w_out_in, st);
                Ok(all(self.keep_partial(local, at, out, n, rows, (n0, nl), kl, acc)))
            }
            &Kernel::Reduce { total, bias } => {
                let mut parts = claimed;
                parts.sort_by_key(|f| f.src);
                let Some(first) = parts.first() else {
                    return Err(format!("{}: reduces, but its trains carried no partial sums", at.name()));
                };
                let mut acc = Frag { cover: 0, src: at.id, ..first.clone() };
                let mut vals = vec![0f32; first.vals.len()];
                add_partials(&mut acc, &mut vals, &parts, at, "reduces")?;
                if let Some(t) = total {
                    complete(&mut acc, t, at)?;
                    if let Some(b) = bias {
                        let bv = self.weight(local, b, at)?;
                        let w = (acc.c1 - acc.c0).max(1) as usize;
                        for (i, v) in vals.iter_mut().enumerate() {
                            *v += st.round(bv[acc.c0 as usize + i % w]);
                        }
                    }
                }
                acc.vals = vals.into();
                self.pes[local].acc = vec![acc];
                Ok(all(self.rounded(&self.pes[local].acc)))
            }
            Kernel::Route { views } => {
                if self.setup.partial || !self.setup.taps.is_empty() {
                    let setup = &self.setup;
                    let done = claimed.iter().filter(|f| f.cover == 0 && f.tensor < NO_VALUES && setup.keeps(f.tensor));
                    self.pes[local].tapped.extend(done.cloned());
                }
                let mut outs = Vec::with_capacity(n_sends);
                for i in 0..n_sends {
                    let sel: Vec<Frag> = match views.get(i).copied().flatten() {
                        None => claimed.clone(),
                        Some(v) => claimed.iter().filter_map(|f| crop(f, &v)).collect(),
                    };
                    let sel = in_order(sel);
                    outs.push(Some(Payload::from(sel)));
                }
                Ok(outs)
            }
            Kernel::Store => {
                self.pes[local].store.extend(claimed);
                Ok(vec![None; n_sends])
            }
            Kernel::Collect => {
                self.pes[local].kept.extend(claimed);
                Ok(vec![None; n_sends])
            }
            Kernel::Load => {
                // Kept whole: the rows a gateway forwarded one by one joined again into blocks.
                let pe = &mut self.pes[local];
                pe.weights.extend(claimed);
                pe.weights = coalesce(std::mem::take(&mut pe.weights));
                Ok(vec![None; n_sends])
            }
            &Kernel::Gather { ids, table, width, rows_per_run, out } => {
                let (r0, r1) = Self::run_rows(at, rows_per_run);
                let (idv, tv) = (self.tensor(ids.base, at)?, self.tensor(table, at)?);
                let mut vals = Vec::with_capacity(((r1 - r0) * width) as usize);
                for r in r0..r1 {
                    let i = (r * ids.cols + ids.c0) as usize;
                    let id =
                        *idv.get(i).ok_or_else(|| format!("{}: the host's ids have no row {r}", at.name()))? as u64;
                    let row = tv
                        .get((id * width) as usize..((id + 1) * width) as usize)
                        .ok_or_else(|| format!("{}: id {id} is outside the table t{table}", at.name()))?;
                    vals.extend(row.iter().map(|&v| st.round(v)));
                }
                let f = Frag::finished(out, width, (r0, r1), (0, width), at.id, vals);
                Ok(all(Payload::from(vec![f])))
            }
            &Kernel::Source { view, rows_per_run } => {
                let t = self.tensor(view.base, at)?;
                let (r0, r1) = Self::run_rows(at, rows_per_run);
                let cols = view.cols as usize;
                let mut vals = Vec::with_capacity((r1 - r0) as usize * view.width as usize);
                for r in r0..r1 {
                    let base = r as usize * cols + view.c0 as usize;
                    let row = t
                        .get(base..base + view.width as usize)
                        .ok_or_else(|| format!("{}: the host's t{} has no row {r}", at.name(), view.base))?;
                    let int = self.setup.ints.contains(&view.base);
                    vals.extend(row.iter().map(|&v| if int { v } else { st.round(v) }));
                }
                let f = Frag::finished(view.base, view.cols, (r0, r1), (view.c0, view.c0 + view.width), at.id, vals);
                Ok(all(Payload::from(vec![f])))
            }
            &Kernel::Linear { grid, a, w, w_out_in, k, n, rows_per_run, out, grouped: Some(gr) } => {
                let (r, c) = at.pos(&grid)?;
                let (idx, parts) = flat_index(&grid, r, c);
                let (n0, nl) = Share { n: gr.slots * n, parts }.range(idx);
                let rows = Self::run_rows(at, rows_per_run);
                let map = self.slot_map(local, at, gr.slots)?;
                let x = self.read(local, at, &claimed, &a, rows)?;
                let wv = self.weight(local, w, at)?;
                if !(wv.len() as u64).is_multiple_of((k * n).max(1)) {
                    return Err(format!("{}: a weight of {} values for {k}x{n} experts", at.name(), wv.len()));
                }
                let tile = wv.len() as u64 / parts.max(1);
                self.resident_bytes(local, at, tile * st.bytes() + 2 * nl * rows_per_run * ACC_BYTES)?;
                let acc = grouped_matmul(&x, &wv, &map, rows_per_run, (0, k), (n0, nl), (k, n), w_out_in, st);
                let f = Frag::finished(out, gr.slots * n, (rows.0, rows.1), (n0, n0 + nl), at.id, acc);
                self.pes[local].acc = vec![f];
                Ok(all(self.rounded(&self.pes[local].acc)))
            }
            &Kernel::Linear { grid, a, w, w_out_in, k, n, rows_per_run, out, grouped: None } => {
                let (r, c) = at.pos(&grid)?;
                let (idx, parts) = flat_index(&grid, r, c);
                let (n0, nl) = Share { n, parts }.range(idx);
                let rows = Self::run_rows(at, rows_per_run);
                let x = self.read(local, at, &claimed, &a, rows)?;
                let wv = self.weight(local, w, at)?;
                if wv.len() as u64 != k * n || a.width != k {
                    return Err(format!("{}: a weight of {} values for a {k}x{n} matmul", at.name(), wv.len()));
                }
                self.resident_bytes(local, at, k * nl * st.bytes() + 2 * nl * rows_per_run * ACC_BYTES)?;
                let acc = block_matmul(&x, &wv, rows_per_run, (0, k), (n0, nl), (k, n), w_out_in, st);
                let f = Frag::finished(out, n, (rows.0, rows.1), (n0, n0 + nl), at.id, acc);
                self.pes[local].acc = vec![f];
                Ok(all(self.rounded(&self.pes[local].acc)))
            }
            &Kernel::Bias { b } => {
                let bv = self.weight(local, b, at)?;
                let pe = &mut self.pes[local];
                for f in pe.acc.iter_mut() {
                    let w = (f.c1 - f.c0) as usize;
                    let mut vals = f.vals.to_vec();
                    for (i, v) in vals.iter_mut().enumerate() {
                        *v += st.round(bv[f.c0 as usize + i % w.max(1)]);
                    }
                    f.vals = vals.into();
                }
                Ok(all(self.rounded(&self.pes[local].acc)))
            }
            &Kernel::AttnScores { grid, q, cache, fresh, attn, out, append } => {
                let (r, c) = at.pos(&grid)?;
                let (idx, parts) = flat_index(&grid, r, c);
                let total = attn.batch * attn.heads * attn.kv;
                let (j0, jl) = Share { n: total, parts }.range(idx);
                let ql = attn.q_len;
                let qv = self.read(local, at, &claimed, &q, (0, attn.batch * ql))?;
                let fr = self.read(local, at, &claimed, &fresh, (0, attn.batch * (attn.kv - attn.len)))?;
                let cv = if attn.len > 0 { self.tensor(cache, at)? } else { Arc::from(Vec::new()) };
                // The keys in the storage dtype, the scores accumulating over head_dim in fp32.
                self.resident_bytes(local, at, jl * attn.head_dim * st.bytes() + jl * ql * ACC_BYTES)?;
                let d = attn.head_dim as usize;
                let grp = (attn.heads / attn.kv_heads.max(1)).max(1);
                let mut vals = Vec::with_capacity((jl * ql) as usize);
                for j in j0..j0 + jl {
                    let (b, h, t) = (j / (attn.heads * attn.kv), (j / attn.kv) % attn.heads, j % attn.kv);
                    let krow = key_row(&cv, &fr, &attn, b, t, h / grp);
                    for i in 0..ql {
                        let qrow = &qv[((b * ql + i) * attn.heads * attn.head_dim + h * attn.head_dim) as usize..][..d];
                        let mut acc = 0f32;
                        for dd in 0..d {
                            acc += qrow[dd] * st.round(krow[dd]);
                        }
                        vals.push(((((b * attn.heads + h) * ql + i) * attn.kv + t), acc));
                    }
                }
                if let Some(app) = append {
                    // Its key rows, once per KV head: the updated cache the step leaves.
                    let kvw = attn.kv_heads * attn.head_dim;
                    let mut keep = Vec::new();
                    for j in j0..j0 + jl {
                        let (b, h, t) = (j / (attn.heads * attn.kv), (j / attn.kv) % attn.heads, j % attn.kv);
                        if h % grp == 0 {
                            let row: Arc<[f32]> =
                                key_row(&cv, &fr, &attn, b, t, h / grp).iter().map(|&v| st.round(v)).collect();
                            let (r0, c0) = (b * attn.kv + t, h / grp * attn.head_dim);
                            let (r1, c1) = (r0 + 1, c0 + attn.head_dim);
                            keep.push(Frag::finished(app, kvw, (r0, r1), (c0, c1), at.id, row));
                        }
                    }
                    let cache = &mut self.pes[local].cache;
                    cache.retain(|f| f.tensor != app);
                    cache.extend(keep);
                }
                self.pes[local].acc = scatter_frags(out, attn.kv, vals, at.id);
                Ok(all(self.rounded(&self.pes[local].acc)))
            }
            &Kernel::AttnContext { grid, p, cache, fresh, attn, out, append } => {
                let (r, c) = at.pos(&grid)?;
                let (idx, parts) = flat_index(&grid, r, c);
                let total = attn.batch * attn.heads * attn.head_dim;
                let (j0, jl) = Share { n: total, parts }.range(idx);
                let ql = attn.q_len;
                let pv = self.read(local, at, &claimed, &p, (0, attn.batch * attn.heads * ql))?;
                let fr = self.read(local, at, &claimed, &fresh, (0, attn.batch * (attn.kv - attn.len)))?;
                let cv = if attn.len > 0 { self.tensor(cache, at)? } else { Arc::from(Vec::new()) };
                // The values in the storage dtype, the context accumulating over the keys in fp32.
                self.resident_bytes(local, at, jl * attn.kv * st.bytes() + jl * ql * ACC_BYTES)?;
                let grp = (attn.heads / attn.kv_heads.max(1)).max(1);
                let hd = attn.heads * attn.head_dim;
                let mut vals = Vec::with_capacity((jl * ql) as usize);
                for j in j0..j0 + jl {
                    let (b, h, dd) = (j / hd, (j / attn.head_dim) % attn.heads, j % attn.head_dim);
                    for i in 0..ql {
                        let mut acc = 0f32;
                        for t in 0..attn.kv {
                            let pr = pv[(((b * attn.heads + h) * ql + i) * attn.kv + t) as usize];
                            let vrow = key_row(&cv, &fr, &attn, b, t, h / grp);
                            acc += pr * st.round(vrow[dd as usize]);
                        }
                        vals.push(((b * ql + i) * hd + h * attn.head_dim + dd, acc));
                    }
                }
                if let Some(app) = append {
                    // Its value columns (every key's), once per KV head: the updated cache the step
                    // leaves, a block of columns per run of its columns within one (sequence, head).
                    let kvw = attn.kv_heads * attn.head_dim;
                    let mut keep = Vec::new();
                    let mut j = j0;
                    while j < j0 + jl {
                        let (b, h, d0) = (j / hd, (j / attn.head_dim) % attn.heads, j % attn.head_dim);
                        let d1 = attn.head_dim.min(d0 + (j0 + jl - j));
                        if h % grp == 0 {
                            let mut block = Vec::with_capacity((attn.kv * (d1 - d0)) as usize);
                            for t in 0..attn.kv {
                                let vrow = key_row(&cv, &fr, &attn, b, t, h / grp);
                                block.extend(vrow[d0 as usize..d1 as usize].iter().map(|&v| st.round(v)));
                            }
                            let c0 = h / grp * attn.head_dim;
                            keep.push(Frag::finished(
                                app,
                                kvw,
                                (b * attn.kv, (b + 1) * attn.kv),
                                (c0 + d0, c0 + d1),
                                at.id,
                                block,
                            ));
                        }
                        j += d1 - d0;
                    }
                    let cache = &mut self.pes[local].cache;
                    cache.retain(|f| f.tensor != app);
                    cache.extend(keep);
                }
                self.pes[local].acc = scatter_frags(out, hd, vals, at.id);
                Ok(all(self.rounded(&self.pes[local].acc)))
            }
            Kernel::Elementwise { grid, op, inputs, rows_per_run, width, out, out2 } => {
                let (r, c) = at.pos(grid)?;
                let (idx, parts) = flat_index(grid, r, c);
                let (off, len) = Share { n: rows_per_run * width, parts }.range(idx);
                let (row0, _) = Self::run_rows(at, *rows_per_run);
                let mut frags = Vec::new();
                let mut frags2 = Vec::new();
                if len > 0 {
                    let first = row0 + off / width;
                    let end = row0 + (off + len - 1) / width + 1;
                    let ins: Vec<Vec<f32>> = match *op {
                        // One token of every sequence: output row b reads input row b * seq + pick.
                        EwOp::Select { seq, last } => {
                            let pick = if last { seq.saturating_sub(1) } else { 0 };
                            let mut v = Vec::new();
                            for row in first..end {
                                let r = row * seq + pick;
                                v.extend(self.read(local, at, &claimed, &inputs[0], (r, r + 1))?);
                            }
                            vec![v]
                        }
                        // Its picked rows read dy's row of their sequence; the others are zero.
                        EwOp::SelectGrad { seq, last } => {
                            let pick = if last { seq.saturating_sub(1) } else { 0 };
                            let mut v = Vec::new();
                            for row in first..end {
                                if row % seq.max(1) == pick {
                                    let r = row / seq.max(1);
                                    v.extend(self.read(local, at, &claimed, &inputs[0], (r, r + 1))?);
                                } else {
                                    v.extend(std::iter::repeat_n(0f32, *width as usize));
                                }
                            }
                            vec![v]
                        }
                        _ => inputs
                            .iter()
                            .map(|v| self.read(local, at, &claimed, v, (first, end)))
                            .collect::<Result<_, _>>()?,
                    };
                    self.resident(local, at, 2 * len)?;
                    let num = self.setup.numerics;
                    let mut p = off;
                    while p < off + len {
                        let row = row0 + p / width;
                        let c0 = p % width;
                        let c1 = (*width).min(c0 + (off + len - p));
                        let mut vals = Vec::with_capacity((c1 - c0) as usize);
                        let mut vals2 = Vec::new();
                        for cc in c0..c1 {
                            let i = ((row - first) * width + cc) as usize;
                            vals.push(match *op {
                                EwOp::Add => ins.iter().map(|x| x[i]).fold(0f32, |a, b| a + b),
                                EwOp::Gelu => gelu(num.gelu_tanh, ins[0][i]),
                                EwOp::Tanh => ins[0][i].tanh(),
                                EwOp::TanhGrad => (1.0 - ins[0][i] * ins[0][i]) * ins[1][i],
                                EwOp::SelectGrad { .. } => ins[0][i],
                                EwOp::GeluGrad => gelu_grad(num.gelu_tanh, ins[0][i]) * ins[1][i],
                                EwOp::Select { .. } | EwOp::Copy => ins[0][i],
                                EwOp::SwiGlu => {
                                    let (g, u) = (ins[0][i], ins[1][i]);
                                    g * (1.0 / (1.0 + (-g).exp())) * u
                                }
                                EwOp::SwiGluGrad => {
                                    // As the reference: d_gate here, d_up into the second output.
                                    let (g, u, dy) = (ins[0][i], ins[1][i], ins[2][i]);
                                    let s = 1.0 / (1.0 + (-g).exp());
                                    vals2.push(dy * g * s);
                                    dy * u * s * (1.0 + g * (1.0 - s))
                                }
                                EwOp::Rotary { head_dim, rot_dims, pos0, seq, inverse, .. } => {
                                    let row_vals = &ins[0][((row - first) * width) as usize..][..*width as usize];
                                    let freqs = self.setup.inv_freq.get(&rot_dims).map_or(&[][..], |v| v.as_slice());
                                    rotary(
                                        row_vals,
                                        cc,
                                        head_dim,
                                        rot_dims,
                                        pos0 + row % seq.max(1),
                                        freqs,
                                        (num.rotary_interleaved, inverse),
                                    )
                                }
                            });
                        }
                        frags.push(Frag::finished(*out, *width, (row, row + 1), (c0, c1), at.id, vals));
                        if let Some(o2) = out2 {
                            frags2.push(Frag::finished(*o2, *width, (row, row + 1), (c0, c1), at.id, vals2));
                        }
                        p += c1 - c0;
                    }
                }
                if out2.is_some() {
                    // Two outputs, each on its own send (both gathered: the same share of each).
                    if n_sends != 2 && len > 0 {
                        return Err(format!("{}: two outputs but {n_sends} sends", at.name()));
                    }
                    let (a, b) = (self.rounded(&frags), self.rounded(&frags2));
                    frags.extend(frags2);
                    self.pes[local].acc = frags;
                    return Ok(if n_sends == 2 { vec![Some(a), Some(b)] } else { vec![None; n_sends] });
                }
                self.pes[local].acc = frags;
                Ok(all(self.rounded(&self.pes[local].acc)))
            }
            &Kernel::MoeDispatch { grid, x, probs, route, out } => {
                let (r, c) = at.pos(&grid)?;
                let (idx, parts) = flat_index(&grid, r, c);
                let (a, cap, w) = (route.active(), route.capacity(), route.width);
                let (off, len) = Share { n: a * cap * w, parts }.range(idx);
                let pv = self.read(local, at, &claimed, &probs, (0, route.rows))?;
                let d = routing(&route, &pv);
                // Which token each row of the buffer holds.
                let mut token = vec![None; (a * cap) as usize];
                for (t, cs) in d.copies.iter().enumerate() {
                    for &(_, row) in cs {
                        if let Some(row) = row {
                            token[row] = Some(t as u64);
                        }
                    }
                }
                let xv = self.read(local, at, &claimed, &x, (0, route.rows))?;
                self.resident(local, at, 2 * len)?;
                let vals: Vec<f32> = (off..off + len)
                    .map(|i| token[(i / w) as usize].map_or(0.0, |t| xv[(t * w + i % w) as usize]))
                    .collect();
                self.pes[local].acc = if len > 0 { flat_frags(out, w, off, &vals, at.id) } else { Vec::new() };
                let map: Vec<f32> = d.slot_expert.iter().map(|e| e.map_or(-1.0, |e| e as f32)).collect();
                let slot_map = Frag::finished(ROUTING, a, (0, 1), (0, a), at.id, map);
                let mut p = self.rounded(&self.pes[local].acc).to_vec();
                p.push(slot_map);
                Ok(all(p.into()))
            }
            &Kernel::MoeCombine { grid, yd, probs, route, out } => {
                let (r, c) = at.pos(&grid)?;
                let (idx, parts) = flat_index(&grid, r, c);
                let (e, w) = (route.experts, route.width);
                let (off, len) = Share { n: route.rows * w, parts }.range(idx);
                let pv = self.read(local, at, &claimed, &probs, (0, route.rows))?;
                let d = routing(&route, &pv);
                let yv = self.read(local, at, &claimed, &yd, (0, route.active() * route.capacity()))?;
                self.resident(local, at, 2 * len)?;
                let vals: Vec<f32> = (off..off + len)
                    .map(|i| {
                        let (t, col) = (i / w, i % w);
                        d.copies[t as usize].iter().fold(0f32, |acc, &(ex, row)| match row {
                            Some(row) => {
                                acc + st.round(pv[(t * e) as usize + ex]) * yv[row * w as usize + col as usize]
                            }
                            None => acc,
                        })
                    })
                    .collect();
                self.pes[local].acc = if len > 0 { flat_frags(out, w, off, &vals, at.id) } else { Vec::new() };
                Ok(all(self.rounded(&self.pes[local].acc)))
            }
            &Kernel::MoeCombineGrad { grid, dy, yd, probs, route, out, dprobs } => {
                let (r, c) = at.pos(&grid)?;
                let (idx, parts) = flat_index(&grid, r, c);
                let (e, w, a) = (route.experts, route.width, route.active());
                let (off, len) = Share { n: a * route.capacity() * w, parts }.range(idx);
                let (poff, plen) = Share { n: route.rows * e, parts }.range(idx);
                let pv = self.read(local, at, &claimed, &probs, (0, route.rows))?;
                let d = routing(&route, &pv);
                let dyv = self.read(local, at, &claimed, &dy, (0, route.rows))?;
                let yv = self.read(local, at, &claimed, &yd, (0, a * route.capacity()))?;
                self.resident(local, at, 2 * (len + plen))?;
                // Each row of the buffer: its token and that copy's probability.
                let mut copy = vec![None; (a * route.capacity()) as usize];
                let mut dp = vec![0f32; (route.rows * e) as usize];
                for (t, cs) in d.copies.iter().enumerate() {
                    for &(ex, row) in cs {
                        if let Some(row) = row {
                            let pw = pv[t * e as usize + ex];
                            copy[row] = Some((t, pw));
                            let (dyr, yr) =
                                (&dyv[t * w as usize..][..w as usize], &yv[row * w as usize..][..w as usize]);
                            dp[t * e as usize + ex] = dyr.iter().zip(yr).fold(0f32, |s, (a, b)| s + a * b);
                        }
                    }
                }
                let vals: Vec<f32> = (off..off + len)
                    .map(|i| copy[(i / w) as usize].map_or(0.0, |(t, pw)| pw * dyv[t * w as usize + (i % w) as usize]))
                    .collect();
                let dyd = if len > 0 { flat_frags(out, w, off, &vals, at.id) } else { Vec::new() };
                let dpf = if plen > 0 {
                    flat_frags(dprobs, e, poff, &dp[poff as usize..(poff + plen) as usize], at.id)
                } else {
                    Vec::new()
                };
                let map: Vec<f32> = d.slot_expert.iter().map(|x| x.map_or(-1.0, |x| x as f32)).collect();
                let mut sends = Vec::new();
                if len > 0 {
                    let mut p = self.rounded(&dyd).to_vec();
                    p.push(Frag::finished(ROUTING, a, (0, 1), (0, a), at.id, map));
                    sends.push(Some(Payload::from(p)));
                }
                if plen > 0 {
                    sends.push(Some(self.rounded(&dpf)));
                }
                if sends.len() != n_sends {
                    return Err(format!("{}: {} outputs to send but {n_sends} sends", at.name(), sends.len()));
                }
                self.pes[local].acc = dyd.into_iter().chain(dpf).collect();
                Ok(sends)
            }
            &Kernel::MoeDispatchGrad { grid, dxd, probs, route, out } => {
                let (r, c) = at.pos(&grid)?;
                let (idx, parts) = flat_index(&grid, r, c);
                let w = route.width;
                let (off, len) = Share { n: route.rows * w, parts }.range(idx);
                let pv = self.read(local, at, &claimed, &probs, (0, route.rows))?;
                let d = routing(&route, &pv);
                let dv = self.read(local, at, &claimed, &dxd, (0, route.active() * route.capacity()))?;
                self.resident(local, at, 2 * len)?;
                let vals: Vec<f32> = (off..off + len)
                    .map(|i| {
                        let (t, col) = ((i / w) as usize, (i % w) as usize);
                        d.copies[t].iter().fold(0f32, |acc, &(_, row)| match row {
                            Some(row) => acc + dv[row * w as usize + col],
                            None => acc,
                        })
                    })
                    .collect();
                self.pes[local].acc = if len > 0 { flat_frags(out, w, off, &vals, at.id) } else { Vec::new() };
                Ok(all(self.rounded(&self.pes[local].acc)))
            }
            Kernel::RowStats { grid, op, x, rows_per_run, width } => {
                let (r, c) = at.pos(grid)?;
                let (ro, rl) = Share { n: *rows_per_run, parts: grid.rows as u64 }.range(r);
                let (co, cl) = Share { n: *width, parts: grid.cols as u64 }.range(c);
                let (row0, _) = Self::run_rows(at, *rows_per_run);
                let rows = (row0 + ro, row0 + ro + rl);
                let xv = self.read(local, at, &claimed, x, rows)?;
                let labels = match op {
                    RowOp::CrossEntropy { labels, .. } => self.read(local, at, &claimed, labels, rows)?,
                    _ => Vec::new(),
                };
                // A norm's backward: the forward's input and scale beside dy.
                // (The softmax's backward: the forward's probabilities beside dP.)
                let (xin, gamma) = match *op {
                    RowOp::NormGrad { x: xi, gamma, .. } => {
                        (self.read(local, at, &claimed, &xi, rows)?, Some(self.weight(local, gamma, at)?))
                    }
                    RowOp::SoftmaxGrad { p, .. } => (self.read(local, at, &claimed, &p, rows)?, None),
                    _ => (Vec::new(), None),
                };
                let sw = stat_width(op);
                self.resident(local, at, 2 * rl * cl + 2 * cl + sw as u64 * rl)?;
                let mut vals = Vec::with_capacity(sw * rl as usize);
                for i in 0..rl as usize {
                    let row = &xv[i * *width as usize..(i + 1) * *width as usize];
                    if let (RowOp::NormGrad { rms, .. }, Some(gm)) = (op, &gamma) {
                        let xr = &xin[i * *width as usize..(i + 1) * *width as usize];
                        vals.extend(norm_grad_stats(*rms, row, xr, gm, st, co, cl));
                        continue;
                    }
                    if let RowOp::MoeTopK { k } = *op {
                        vals.extend(topk_stats(row, co, cl, k));
                        continue;
                    }
                    if let RowOp::SoftmaxGrad { .. } = op {
                        let pr = &xin[i * *width as usize..(i + 1) * *width as usize];
                        let dot = (co..co + cl).map(|c| pr[c as usize] * row[c as usize]).fold(0f32, |a, b| a + b);
                        vals.extend([cl as f32, dot, 0.0]);
                        continue;
                    }
                    let (a, b) = row_stats(op, &self.setup.numerics, row, rows.0 + i as u64, co, cl);
                    vals.extend([cl as f32, a, b]);
                    if let Some(&l) = labels.get(i) {
                        // The label's logit, where this PE holds it.
                        let picked = label_col(l).filter(|&j| j >= co && j < co + cl).map_or(0.0, |j| row[j as usize]);
                        vals.push(picked);
                    }
                }
                // The row (and its labels, or the forward's input) stay for the apply pass.
                let lb = match op {
                    RowOp::CrossEntropy { labels, .. } => Some(labels.base),
                    RowOp::NormGrad { x, .. } => Some(x.base),
                    RowOp::SoftmaxGrad { p, .. } => Some(p.base),
                    _ => None,
                };
                let keep = claimed.iter().filter(|f| f.tensor == x.base || Some(f.tensor) == lb).cloned();
                let pe = &mut self.pes[local];
                pe.store.retain(|f| f.tensor != x.base);
                pe.store.extend(keep);
                let stats = Frag {
                    tensor: STATS,
                    view_cols: sw as u64,
                    r0: rows.0,
                    r1: rows.1,
                    c0: 0,
                    c1: sw as u64,
                    cover: cl,
                    src: at.id,
                    vals: vals.into(),
                };
                if cl == *width {
                    row_loss(op, pe, &stats);
                }
                pe.stats = Some(stats);
                Ok(all(Payload::from(pe.stats.clone().into_iter().collect::<Vec<_>>())))
            }
            Kernel::RowCombine { op, width } => {
                let sw = stat_width(op);
                let mut parts = claimed;
                parts.sort_by_key(|f| f.src);
                let pe = &mut self.pes[local];
                let Some(own) = pe.stats.as_mut() else {
                    return Err(format!("{}: combines statistics but has none", at.name()));
                };
                let mut vals = own.vals.to_vec();
                for p in parts.iter().filter(|f| f.tensor == STATS) {
                    if (p.r0, p.r1) != (own.r0, own.r1) || p.vals.len() != vals.len() {
                        return Err(format!(
                            "{}: received statistics of rows {}..{}, holds {}..{}",
                            at.name(),
                            p.r0,
                            p.r1,
                            own.r0,
                            own.r1
                        ));
                    }
                    for (o, q) in vals.chunks_mut(sw).zip(p.vals.chunks(sw)) {
                        combine(op, o, q);
                    }
                    own.cover += p.cover;
                }
                own.vals = vals.into();
                let own = own.clone();
                if own.cover == *width {
                    row_loss(op, pe, &own);
                }
                Ok(all(Payload::from(vec![own])))
            }
            Kernel::RowApply { grid, op, x, rows_per_run, width, out } => {
                let (r, c) = at.pos(grid)?;
                let (ro, rl) = Share { n: *rows_per_run, parts: grid.rows as u64 }.range(r);
                let (co, cl) = Share { n: *width, parts: grid.cols as u64 }.range(c);
                let (row0, _) = Self::run_rows(at, *rows_per_run);
                let rows = (row0 + ro, row0 + ro + rl);
                let stats = match claimed.iter().find(|f| f.tensor == STATS) {
                    Some(s) => s.clone(),
                    None => self.pes[local].stats.clone().ok_or_else(|| format!("{}: no row statistics", at.name()))?,
                };
                if stats.cover != *width || (stats.r0, stats.r1) != rows {
                    return Err(format!(
                        "{}: statistics of rows {}..{} over {} of {} columns (a missing reduction)",
                        at.name(),
                        stats.r0,
                        stats.r1,
                        stats.cover,
                        width
                    ));
                }
                let xv = self.read(local, at, &[], x, rows)?;
                let num = self.setup.numerics;
                // This PE's block of the output: its rows, its share of the columns.
                let block = |vals: Vec<f32>| Frag::finished(*out, *width, (rows.0, rows.1), (co, co + cl), at.id, vals);
                // The norm's scale and shift: resident, or streamed in with the layer.
                let params: Vec<(u32, Arc<[f32]>)> = match *op {
                    RowOp::Norm { gamma, beta, .. } => std::iter::once(gamma)
                        .chain(beta)
                        .map(|t| self.weight(local, t, at).map(|v| (t, v)))
                        .collect::<Result<_, _>>()?,
                    RowOp::Softmax { .. }
                    | RowOp::CrossEntropy { .. }
                    | RowOp::SoftmaxGrad { .. }
                    | RowOp::MoeTopK { .. } => Vec::new(),
                    RowOp::NormGrad { gamma, .. } => vec![(gamma, self.weight(local, gamma, at)?)],
                };
                if let RowOp::SoftmaxGrad { p, head_dim } = *op {
                    // dS = p * (dP - sum(p * dP)) / sqrt(head_dim), as the reference computes it.
                    let pv = self.read(local, at, &[], &p, rows)?;
                    let scale = 1.0 / (head_dim as f32).sqrt();
                    let w = *width as usize;
                    let mut vals = Vec::with_capacity((rl * cl) as usize);
                    for i in 0..rl as usize {
                        let dot = stats.vals[3 * i + 1];
                        for cc in co as usize..(co + cl) as usize {
                            vals.push(scale * pv[i * w + cc] * (xv[i * w + cc] - dot));
                        }
                    }
                    self.pes[local].acc = vec![block(vals)];
                    return Ok(all(self.rounded(&self.pes[local].acc)));
                }
                if let RowOp::NormGrad { x: xi, rms, dgamma, dbeta, .. } = *op {
                    let xin = self.read(local, at, &[], &xi, rows)?;
                    let gm = &params[0].1;
                    let eps = num.norm_eps as f32;
                    let w = *width as usize;
                    let mut vals = Vec::with_capacity((rl * cl) as usize);
                    let mut dg = vec![0f32; cl as usize];
                    let mut db = vec![0f32; cl as usize];
                    for i in 0..rl as usize {
                        let (dyr, xr) = (&xv[i * w..(i + 1) * w], &xin[i * w..(i + 1) * w]);
                        let s = &stats.vals[5 * i..5 * i + 5];
                        let n = s[0];
                        let (mean, rstd) = match rms {
                            false => (s[1], 1.0 / (s[2] / n + eps).sqrt()),
                            true => (0.0, 1.0 / (s[1] + eps).sqrt()),
                        };
                        let (m1, m2) = (s[3] / n, rstd * (s[4] - mean * s[3]) / n);
                        for (j, cc) in (co..co + cl).enumerate() {
                            let c = cc as usize;
                            let xhat = (xr[c] - mean) * rstd;
                            let g = dyr[c] * st.round(gm[c]);
                            vals.push(if rms { rstd * (g - xhat * m2) } else { rstd * (g - m1 - xhat * m2) });
                            dg[j] += dyr[c] * xhat;
                            db[j] += dyr[c];
                        }
                    }
                    // The rows' terms of the column sums, kept until the step's `ColSum`.
                    let part = |t: u32, v: Vec<f32>| Frag {
                        tensor: t,
                        view_cols: *width,
                        r0: 0,
                        r1: 1,
                        c0: co,
                        c1: co + cl,
                        cover: rl,
                        src: at.id,
                        vals: v.into(),
                    };
                    let mut new = vec![part(dgamma, dg)];
                    new.extend(dbeta.map(|t| part(t, db)));
                    let pe = &mut self.pes[local];
                    if pe.cols.is_empty() {
                        pe.cols = new;
                    } else {
                        for (acc, p) in pe.cols.iter_mut().zip(&new) {
                            let mut v = acc.vals.to_vec();
                            add_partials(acc, &mut v, std::slice::from_ref(p), at, "adds column sums to")?;
                            acc.vals = v.into();
                        }
                    }
                    self.pes[local].acc = vec![block(vals)];
                    return Ok(all(self.rounded(&self.pes[local].acc)));
                }
                // Cross-entropy: the rows' labels, and the step's count of labels not ignored.
                let (labels, valid) = match op {
                    RowOp::CrossEntropy { labels, .. } => {
                        (self.read(local, at, &[], labels, rows)?, valid_labels(&self.tensor(labels.base, at)?))
                    }
                    _ => (Vec::new(), 0),
                };
                let sw = stat_width(op);
                let mut vals = Vec::with_capacity((rl * cl) as usize);
                for i in 0..rl as usize {
                    let row = &xv[i * *width as usize..(i + 1) * *width as usize];
                    let s = &stats.vals[sw * i..sw * i + sw];
                    for cc in co..co + cl {
                        vals.push(match labels.get(i) {
                            Some(&l) => ce_grad(row[cc as usize], cc, label_col(l), s, valid),
                            None => row_apply(op, &num, row, rows.0 + i as u64, cc, s, |t, j| {
                                params.iter().find(|p| p.0 == t).map_or(0.0, |p| st.round(p.1[j as usize]))
                            }),
                        });
                    }
                }
                self.pes[local].acc = vec![block(vals)];
                Ok(all(self.rounded(&self.pes[local].acc)))
            }
            Kernel::Adam { grid, w, g, m, v, master, rows, rows_per_run, width, outs, keep_grad } => {
                // The gradient streams in the order its producers send it (blocks, not rows): the PE
                // keeps what it claims and steps once it has all of it, at its last run, over its share
                // of every run's rows.
                let pe = &mut self.pes[local];
                pe.store.extend(claimed.into_iter().filter(|f| f.tensor == g.base));
                if at.run < rows / rows_per_run.max(&1) {
                    return Ok(vec![None; n_sends]);
                }
                let (r, c) = at.pos(grid)?;
                let (idx, parts) = flat_index(grid, r, c);
                let (off, len) = Share { n: rows_per_run * width, parts }.range(idx);
                let (wv, mv, vv) = (self.tensor(*w, at)?, self.tensor(*m, at)?, self.tensor(*v, at)?);
                let pv = match master {
                    Some(t) => self.tensor(*t, at)?,
                    None => Arc::clone(&wv),
                };
                // Its share of the weight and both moments (the gradient streams through).
                self.resident(local, at, 3 * len * (rows / rows_per_run.max(&1)))?;
                let (lr, b1, b2, eps, step) = self.setup.adam;
                let t = step.max(1) as i32;
                let (c1, c2) = ((1.0 - b1.powi(t)) as f32, (1.0 - b2.powi(t)) as f32);
                let (lr, b1, b2, eps) = (lr as f32, b1 as f32, b2 as f32, eps as f32);
                let gw = g.width.max(1);
                let (mut kept, mut sent) = (Vec::new(), Vec::new());
                for j in 0..rows / rows_per_run.max(&1) {
                    let lo = j * rows_per_run * width + off;
                    // The gradient's values of the share (flat positions of the weight), row piece by
                    // row piece of the gradient's own rows (a vector's are one row).
                    let mut gv = Vec::with_capacity(len as usize);
                    let mut e = lo;
                    while e < lo + len {
                        let (row, c0) = (e / gw, e % gw);
                        let c1 = gw.min(c0 + (lo + len - e));
                        let piece = View { c0: g.c0 + c0, width: c1 - c0, ..*g };
                        gv.extend(self.read(local, at, &[], &piece, (row, row + 1))?);
                        e += c1 - c0;
                    }
                    let mut res: Vec<Vec<f32>> = vec![Vec::with_capacity(len as usize); outs.len()];
                    for (i, &gi) in gv.iter().enumerate() {
                        let e = lo as usize + i;
                        let mi = b1 * mv[e] + (1.0 - b1) * gi;
                        let vi = b2 * vv[e] + (1.0 - b2) * gi * gi;
                        let p2 = pv[e] - lr * (mi / c1) / ((vi / c2).sqrt() + eps);
                        for (o, x) in res.iter_mut().zip([p2, mi, vi, p2]) {
                            o.push(x);
                        }
                    }
                    for (&t, vals) in outs.iter().zip(&res) {
                        kept.extend(flat_frags(t, *width, lo, vals, at.id));
                    }
                    if *keep_grad {
                        kept.extend(flat_frags(g.base, g.cols, lo, &gv, at.id));
                    }
                    sent.extend(flat_frags(outs[0], *width, lo, &res[0], at.id));
                }
                let pe = &mut self.pes[local];
                pe.store.retain(|f| f.tensor != g.base);
                pe.cache.extend(kept);
                pe.acc.clear();
                Ok(all(self.rounded(&sent)))
            }
            &Kernel::WgradAcc { grid, x, dy, k, n, rows_per_run, w_out_in, out, bias: _, grouped: Some(gr) } => {
                // Slot e is expert e: the PE's columns of slot e are a block of expert e's gradient,
                // one fragment per slot its columns touch, laid out as the weight ([e, k, n] or
                // [e, n, k], viewed as rows of n or of k). With fewer slots than experts the blocks are
                // the slots' (`PER_SLOT`), which the output gateway sums into their experts.
                let out = if gr.slots < gr.experts { out | PER_SLOT } else { out };
                let (r, c) = at.pos(&grid)?;
                let (k0, kl) = Share { n: k, parts: grid.rows as u64 }.range(r);
                let (n0, nl) = Share { n: gr.slots * n, parts: grid.cols as u64 }.range(c);
                let rows = Self::run_rows(at, rows_per_run);
                let groups: Vec<(u64, u64, u64)> = (0..gr.slots)
                    .filter_map(|g| {
                        let (a, b) = (n0.max(g * n), (n0 + nl).min((g + 1) * n));
                        (a < b).then_some((g, a - g * n, b - g * n))
                    })
                    .collect();
                let blocks: Vec<(Vec<f32>, Vec<f32>)> = groups
                    .iter()
                    .map(|&(g, j0, j1)| {
                        let xv = self.read(local, at, &claimed, &View { c0: g * k + k0, width: kl, ..x }, rows)?;
                        let dv =
                            self.read(local, at, &claimed, &View { c0: g * n + j0, width: j1 - j0, ..dy }, rows)?;
                        Ok((xv, dv))
                    })
                    .collect::<Result<_, String>>()?;
                // One fp32 block (the emit streams it out before the next iteration's run 1) and
                // each group's x panel, double-buffered.
                let panels = 2 * rows_per_run * kl * groups.len() as u64 * self.setup.storage.bytes();
                self.resident_bytes(local, at, ACC_BYTES * kl * nl + panels)?;
                let pe = &mut self.pes[local];
                if at.run == 1 {
                    pe.acc = groups
                        .iter()
                        .map(|&(g, j0, j1)| {
                            let (r0, r1, c0, c1, vc) = if w_out_in {
                                (g * n + j0, g * n + j1, k0, k0 + kl, k)
                            } else {
                                (g * k + k0, g * k + k0 + kl, j0, j1, n)
                            };
                            let zeros = vec![0f32; ((r1 - r0) * (c1 - c0)) as usize];
                            Frag::finished(out, vc, (r0, r1), (c0, c1), at.id, zeros)
                        })
                        .collect();
                    pe.cols.clear();
                }
                if pe.acc.len() != groups.len() {
                    return Err(format!("{}: accumulates an expert gradient but holds no block", at.name()));
                }
                for (acc, ((_, j0, j1), (xv, dv))) in pe.acc.iter_mut().zip(groups.iter().zip(&blocks)) {
                    let mut vals = acc.vals.to_vec();
                    add_outer(&mut vals, xv, dv, rows_per_run as usize, (kl as usize, (j1 - j0) as usize), w_out_in);
                    acc.vals = vals.into();
                }
                Ok(vec![None; n_sends])
            }
            &Kernel::WgradAcc { grid, x, dy, k, n, rows_per_run, w_out_in, out, bias, grouped: None } => {
                let (r, c) = at.pos(&grid)?;
                let (k0, kl) = Share { n: k, parts: grid.rows as u64 }.range(r);
                let (n0, nl) = Share { n, parts: grid.cols as u64 }.range(c);
                let rows = Self::run_rows(at, rows_per_run);
                let xv = self.read(local, at, &claimed, &View { c0: x.c0 + k0, width: kl, ..x }, rows)?;
                let dyv = self.read(local, at, &claimed, &View { c0: dy.c0 + n0, width: nl, ..dy }, rows)?;
                // What the PE holds for the whole iteration: its block of dW (and of db in grid row 0)
                // in fp32, once (`emit` streams the block out of SRAM, and the program's next run 1
                // waits for it), and the x panel double-buffered; dy is the paced operand, consumed from
                // the fabric (as the compiler's summa sizing counts it).
                let db = if bias.is_some() && r == 0 { nl } else { 0 };
                let panel = 2 * rows_per_run * kl * self.setup.storage.bytes();
                self.resident_bytes(local, at, ACC_BYTES * (kl * nl + db) + panel)?;
                let pe = &mut self.pes[local];
                // The block, laid out as the weight is: [k, n], or [n, k].
                let (r0, r1, c0, c1, vc) =
                    if w_out_in { (n0, n0 + nl, k0, k0 + kl, k) } else { (k0, k0 + kl, n0, n0 + nl, n) };
                let fresh = |t: u32, r0: u64, r1: u64, c0: u64, c1: u64, vc: u64| {
                    Frag::finished(t, vc, (r0, r1), (c0, c1), at.id, vec![0f32; ((r1 - r0) * (c1 - c0)) as usize])
                };
                if at.run == 1 {
                    pe.acc = vec![fresh(out, r0, r1, c0, c1, vc)];
                    pe.cols = bias.filter(|_| r == 0).map(|b| fresh(b, 0, 1, n0, n0 + nl, n)).into_iter().collect();
                }
                let [acc] = pe.acc.as_mut_slice() else {
                    return Err(format!("{}: accumulates a weight gradient but holds no block", at.name()));
                };
                let mut vals = acc.vals.to_vec();
                let (kl, nl) = (kl as usize, nl as usize);
                add_outer(&mut vals, &xv, &dyv, rows_per_run as usize, (kl, nl), w_out_in);
                acc.vals = vals.into();
                if let Some(db) = pe.cols.first_mut() {
                    let mut v = db.vals.to_vec();
                    for i in 0..rows_per_run as usize {
                        for j in 0..nl {
                            v[j] += dyv[i * nl + j];
                        }
                    }
                    db.vals = v.into();
                }
                Ok(vec![None; n_sends])
            }
            &Kernel::AttnKvGrad { grid, p, x, attn, out } => {
                let (r, c) = at.pos(&grid)?;
                let (hh, d, ql) = (attn.heads, attn.head_dim, attn.q_len);
                let (j0, jl) = Share { n: attn.kv, parts: grid.rows as u64 }.range(r);
                let (n0, nl) = Share { n: attn.batch * hh * d, parts: grid.cols as u64 }.range(c);
                // The probabilities (or dS) of its keys for the (sequence, head)s of its columns, and
                // the columns of dO (or Q) of those heads: every query row.
                let pk = View { c0: p.c0 + j0, width: jl, ..p };
                let mut prow: BTreeMap<u64, Vec<f32>> = BTreeMap::new();
                let mut xcol: BTreeMap<u64, (u64, Vec<f32>)> = BTreeMap::new();
                if nl > 0 && jl > 0 {
                    for bh in n0 / d..(n0 + nl - 1) / d + 1 {
                        prow.insert(bh, self.read(local, at, &claimed, &pk, (bh * ql, (bh + 1) * ql))?);
                    }
                    for b in n0 / (hh * d)..(n0 + nl - 1) / (hh * d) + 1 {
                        let (lo, hi) = (n0.max(b * hh * d), (n0 + nl).min((b + 1) * hh * d));
                        let xs = View { c0: x.c0 + lo - b * hh * d, width: hi - lo, ..x };
                        xcol.insert(b, (lo, self.read(local, at, &claimed, &xs, (b * ql, (b + 1) * ql))?));
                    }
                }
                // The dK (or dV) block accumulating over the query rows in fp32, and its rounded copy.
                self.resident_bytes(local, at, jl * nl * (ACC_BYTES + self.setup.storage.bytes()))?;
                let mut vals = vec![0f32; (jl * nl) as usize];
                for j in 0..jl {
                    for n in n0..n0 + nl {
                        let (b, bh) = (n / (hh * d), n / d);
                        let (pv, (lo, xv)) = (&prow[&bh], &xcol[&b]);
                        let w = (xv.len() as u64 / ql.max(1)) as usize;
                        let mut acc = 0f32;
                        for i in 0..ql as usize {
                            acc += pv[i * jl as usize + j as usize] * xv[i * w + (n - lo) as usize];
                        }
                        vals[(j * nl + n - n0) as usize] = acc;
                    }
                }
                let cols = attn.batch * hh * d;
                let f = Frag::finished(out | PER_HEAD, cols, (j0, j0 + jl), (n0, n0 + nl), at.id, vals);
                self.pes[local].acc = if jl * nl > 0 { vec![f] } else { Vec::new() };
                Ok(vec![None; n_sends])
            }
            Kernel::HeadSum { attn, out, views } => {
                let (hh, kvh, d, kv) = (attn.heads, attn.kv_heads.max(1), attn.head_dim, attn.kv);
                let grp = (hh / kvh).max(1);
                let cols = attn.batch * hh * d;
                let whole = View { base: out | PER_HEAD, cols, c0: 0, width: cols };
                let pre = self.read(local, at, &claimed, &whole, (0, kv))?;
                let w = kvh * d;
                let mut vals = vec![0f32; (attn.batch * kv * w) as usize];
                for b in 0..attn.batch {
                    for j in 0..kv {
                        for g in 0..kvh {
                            for dd in 0..d {
                                let mut acc = 0f32;
                                for h in g * grp..(g + 1) * grp {
                                    acc += pre[(j * cols + (b * hh + h) * d + dd) as usize];
                                }
                                vals[((b * kv + j) * w + g * d + dd) as usize] = acc;
                            }
                        }
                    }
                }
                let f = Frag::finished(*out, w, (0, attn.batch * kv), (0, w), at.id, vals);
                Ok(self.send_views(local, f, views, n_sends))
            }
            Kernel::ExpertSum { slots, experts, k, n, w_out_in, out, views } => {
                let (slots, experts, out) = (*slots, *experts, *out);
                // Rows per expert (or slot) and their length, as the weight is laid out.
                let (per, vc) = if *w_out_in { (*n, *k) } else { (*k, *n) };
                let whole = View { base: out | PER_SLOT, cols: vc, c0: 0, width: vc };
                let pre = self.read(local, at, &claimed, &whole, (0, slots * per))?;
                let map = self.slot_map(local, at, slots)?;
                let size = (per * vc) as usize;
                let mut vals = vec![0f32; experts as usize * size];
                for (s, &e) in map.iter().enumerate() {
                    if e < 0.0 {
                        continue;
                    }
                    let e = e as usize;
                    let Some(dst) = vals.get_mut(e * size..(e + 1) * size) else {
                        return Err(format!("{}: slot {s} holds expert {e} of {experts}", at.name()));
                    };
                    for (d, &x) in dst.iter_mut().zip(&pre[s * size..(s + 1) * size]) {
                        *d += x;
                    }
                }
                let f = Frag::finished(out, vc, (0, experts * per), (0, vc), at.id, vals);
                Ok(self.send_views(local, f, views, n_sends))
            }
            &Kernel::EmbedGradAcc { grid, ids, dy, vocab, width, rows_per_run, out } => {
                let (r, c) = at.pos(&grid)?;
                let (idx, parts) = flat_index(&grid, r, c);
                let (lo, len) = Share { n: vocab * width, parts }.range(idx);
                let rows = Self::run_rows(at, rows_per_run);
                if at.run == 1 {
                    // The table's share of the gradient accumulates over the step in fp32.
                    self.resident_bytes(local, at, len * ACC_BYTES)?;
                    self.pes[local].acc = flat_frags(out, width, lo, &vec![0f32; len as usize], at.id);
                }
                if len == 0 {
                    return Ok(vec![None; n_sends]);
                }
                let idv = self.read(local, at, &claimed, &ids, rows)?;
                // Only the rows whose id falls in its share: their dy rows must have come.
                let mut add: Vec<(u64, Vec<f32>)> = Vec::new();
                for (i, &id) in idv.iter().enumerate() {
                    let id = id as u64;
                    if id >= vocab {
                        return Err(format!("{}: id {id} is outside the table of {vocab} rows", at.name()));
                    }
                    if id * width < lo + len && (id + 1) * width > lo {
                        let row = rows.0 + i as u64;
                        add.push((id, self.read(local, at, &claimed, &dy, (row, row + 1))?));
                    }
                }
                let pe = &mut self.pes[local];
                for f in pe.acc.iter_mut() {
                    let mut v = f.vals.to_vec();
                    for (id, row) in &add {
                        if *id >= f.r0 && *id < f.r1 {
                            for (k, cc) in (f.c0..f.c1).enumerate() {
                                v[k] += row[cc as usize];
                            }
                        }
                    }
                    f.vals = v.into();
                }
                Ok(vec![None; n_sends])
            }
            Kernel::WgradEmit => {
                let pe = &self.pes[local];
                let mut block = self.rounded(&pe.acc).to_vec();
                if pe.acc.iter().any(|f| f.tensor & PER_SLOT != 0 && f.tensor < NO_VALUES) {
                    // Per-slot blocks go with the slot map, which the output gateway sums them by.
                    let map = pe.route.clone().ok_or_else(|| {
                        format!("{}: sends per-slot expert gradients without the slot map", at.name())
                    })?;
                    block.push(map);
                }
                let mut outs = vec![Some(Payload::from(block))];
                if n_sends > 1 {
                    outs.push(Some(self.rounded(&pe.cols)));
                }
                outs.resize(n_sends, None);
                Ok(outs)
            }
            &Kernel::ColSum { grid, total } => {
                let (r, _) = at.pos(&grid)?;
                let mut parts = claimed;
                parts.sort_by_key(|f| f.src);
                let mut cols = std::mem::take(&mut self.pes[local].cols);
                if cols.is_empty() {
                    return Err(format!("{}: sends column sums but has none", at.name()));
                }
                for acc in cols.iter_mut() {
                    let mine: Vec<Frag> = parts.iter().filter(|p| p.tensor == acc.tensor).cloned().collect();
                    let mut v = acc.vals.to_vec();
                    add_partials(acc, &mut v, &mine, at, "adds column sums to")?;
                    acc.vals = v.into();
                    if r == 0 {
                        complete(acc, total, at)?;
                    }
                }
                Ok(all(self.rounded(&cols)))
            }
            &Kernel::LossSum { grid, total, labels, out } => {
                let (r, _) = at.pos(&grid)?;
                let mut parts = claimed;
                parts.sort_by_key(|f| f.src);
                let pe = &mut self.pes[local];
                let (mut sum, mut rows) = std::mem::take(&mut pe.loss);
                for p in parts.iter().filter(|f| f.tensor == out) {
                    if p.cover == 0 || p.vals.len() != 1 {
                        return Err(format!("{}: received {}, not a partial loss", at.name(), p.slice()));
                    }
                    sum += p.vals[0];
                    rows += p.cover;
                }
                let mut f = Frag {
                    tensor: out,
                    view_cols: 1,
                    r0: 0,
                    r1: 1,
                    c0: 0,
                    c1: 1,
                    cover: rows,
                    src: at.id,
                    vals: Arc::from(vec![sum]),
                };
                if r == 0 {
                    if rows != total {
                        return Err(format!(
                            "{}: the loss sums {rows} of the step's {total} rows (a missing reduction)",
                            at.name()
                        ));
                    }
                    let valid = valid_labels(&self.tensor(labels, at)?);
                    let inv = if valid == 0 { 0.0 } else { 1.0 / valid as f32 };
                    f = Frag { cover: 0, vals: Arc::from(vec![sum * inv]), ..f };
                }
                Ok(all(Payload::from(vec![f])))
            }
            &Kernel::Lookup { grid, ids, table, vocab, width, rows_per_run, out } => {
                let (r, c) = at.pos(&grid)?;
                let (v0, vl) = Share { n: vocab, parts: grid.rows as u64 }.range(r);
                let (w0, wl) = Share { n: width, parts: grid.cols as u64 }.range(c);
                let rows = Self::run_rows(at, rows_per_run);
                let idv = self.read(local, at, &claimed, &ids, rows)?;
                let tv = self.tensor(table, at)?;
                self.resident(local, at, vl * wl + 2 * rows_per_run * wl)?;
                let mut vals = Vec::with_capacity((rows_per_run * wl) as usize);
                for &id in &idv {
                    let id = id as u64;
                    for cc in w0..w0 + wl {
                        vals.push(if id >= v0 && id < v0 + vl {
                            st.round(tv[(id * width + cc) as usize])
                        } else {
                            0.0
                        });
                    }
                }
                let cover = if grid.rows == 1 { 0 } else { 1 };
                let f = Frag {
                    tensor: out,
                    view_cols: width,
                    r0: rows.0,
                    r1: rows.1,
                    c0: w0,
                    c1: w0 + wl,
                    cover,
                    src: at.id,
                    vals: vals.into(),
                };
                self.pes[local].acc = vec![f];
                Ok(all(self.rounded(&self.pes[local].acc)))
            }
        }
    }
}

/// The part of a train's payload that wavelets `from .. to` of its `n` carry: the values are laid out
/// in fragment order, row-major within a fragment, and spread evenly over the wavelets (a wavelet
/// carries one fp32 or two fp16 values; padding of a last half wavelet is spread with them).
pub fn slice_payload(p: &Payload, n: u64, from: u64, to: u64) -> Payload {
    if from == 0 && to >= n {
        return Arc::clone(p);
    }
    let total: u64 = p.iter().filter(|f| f.tensor != ROUTING).map(|f| f.vals.len() as u64).sum();
    let (lo, hi) = (from * total / n.max(1), to * total / n.max(1));
    let mut out = Vec::new();
    let mut base = 0u64;
    for f in p.iter() {
        if f.tensor == NO_VALUES || f.tensor == ROUTING {
            // A partial run's mark (a MoE slot map) rides with every part of the train.
            out.push(f.clone());
            continue;
        }
        let len = f.vals.len() as u64;
        let (a, b) = (lo.max(base), hi.min(base + len));
        if a < b {
            let w = (f.c1 - f.c0).max(1);
            // Cut [a, b) of this fragment's values into row pieces.
            let mut i = a - base;
            while i < b - base {
                let (row, col) = (i / w, i % w);
                let end = (b - base).min((row + 1) * w);
                let vals: Arc<[f32]> = f.vals[i as usize..end as usize].into();
                out.push(Frag {
                    r0: f.r0 + row,
                    r1: f.r0 + row + 1,
                    c0: f.c0 + col,
                    c1: f.c0 + col + (end - i),
                    vals,
                    ..f.clone()
                });
                i = end;
            }
        }
        base += len;
    }
    out.into()
}

/// Fragments in address order (tensor, row, column, sender), blocks of finished values several rows
/// high cut into rows: how a gateway that buffers a stream forwards it (row by row, so a consumer that
/// takes the train in several runs of rows gets its rows in each; partial sums keep their blocks).
fn in_order(frags: Vec<Frag>) -> Vec<Frag> {
    let mut rows = Vec::with_capacity(frags.len());
    for f in frags {
        if f.r1 <= f.r0 + 1 || f.tensor >= NO_VALUES || f.cover != 0 {
            rows.push(f);
            continue;
        }
        let w = (f.c1 - f.c0) as usize;
        for r in f.r0..f.r1 {
            let i = (r - f.r0) as usize * w;
            rows.push(Frag { r0: r, r1: r + 1, vals: f.vals[i..i + w].into(), ..f.clone() });
        }
    }
    rows.sort_by_key(|f| (f.tensor, f.r0, f.c0, f.src));
    rows
}

/// Fragments with consecutive rows of the same columns of a tensor joined into one block each (each
/// value copied once).
fn coalesce(mut frags: Vec<Frag>) -> Vec<Frag> {
    frags.sort_by_key(|f| (f.tensor, f.view_cols, f.c0, f.c1, f.cover, f.r0, f.src));
    let key = |f: &Frag| (f.tensor, f.view_cols, f.c0, f.c1, f.cover);
    let mut out: Vec<Frag> = Vec::with_capacity(frags.len());
    let mut i = 0;
    while i < frags.len() {
        let mut j = i + 1;
        while j < frags.len() && key(&frags[j]) == key(&frags[i]) && frags[j].r0 == frags[j - 1].r1 {
            j += 1;
        }
        if j == i + 1 {
            out.push(frags[i].clone());
        } else {
            let vals: Vec<f32> = frags[i..j].iter().flat_map(|f| f.vals.iter().copied()).collect();
            out.push(Frag { r1: frags[j - 1].r1, vals: vals.into(), ..frags[i].clone() });
        }
        i = j;
    }
    out
}

/// Values at scattered flat positions of a tensor with rows of `cols`, as fragments of contiguous runs.
fn scatter_frags(tensor: u32, cols: u64, mut vals: Vec<(u64, f32)>, src: u32) -> Vec<Frag> {
    vals.sort_by_key(|v| v.0);
    let mut out = Vec::new();
    let mut i = 0;
    while i < vals.len() {
        let mut j = i + 1;
        while j < vals.len() && vals[j].0 == vals[j - 1].0 + 1 {
            j += 1;
        }
        let run: Vec<f32> = vals[i..j].iter().map(|v| v.1).collect();
        out.extend(flat_frags(tensor, cols, vals[i].0, &run, src));
        i = j;
    }
    out
}

/// One PE's block of a matmul: `rows` rows of `x` (each the `kl` values of the contraction slice
/// starting at `k0`) times the weight's columns `n0..n0 + nl`, summed over k in increasing order.
/// The weight is `[k, n]`, or `[n, k]` when `w_out_in`; its values are rounded to the storage type.
/// (A grouped linear of one slot whose expert is the weight itself.)
#[allow(clippy::too_many_arguments)]
fn block_matmul(
    x: &[f32],
    wv: &[f32],
    rows: u64,
    kr: (u64, u64),
    nr: (u64, u64),
    kn: (u64, u64),
    w_out_in: bool,
    st: Storage,
) -> Vec<f32> {
    grouped_matmul(x, wv, &[0.0], rows, kr, nr, kn, w_out_in, st)
}

/// Adds a run's rank update `x^T dy` to a weight-gradient block: `x` is `rows x kl`, `dy` is
/// `rows x jl`, the block `[kl, jl]`, or `[jl, kl]` when the weight is stored out-by-in.
fn add_outer(block: &mut [f32], x: &[f32], dy: &[f32], rows: usize, (kl, jl): (usize, usize), w_out_in: bool) {
    for i in 0..rows {
        for kk in 0..kl {
            let xval = x[i * kl + kk];
            for j in 0..jl {
                let idx = if w_out_in { j * kl + kk } else { kk * jl + j };
                block[idx] += xval * dy[i * jl + j];
            }
        }
    }
}

/// A row's partial top-k statistics over columns `co..co + cl`: (count, then k (logit, column) pairs,
/// the highest first, ties to the lower column; missing ones are (-inf, -1)).
fn topk_stats(row: &[f32], co: u64, cl: u64, k: u64) -> Vec<f32> {
    let mut cols: Vec<u64> = (co..co + cl).collect();
    // A stable sort keeps column order among equals.
    cols.sort_by(|&a, &b| row[b as usize].partial_cmp(&row[a as usize]).unwrap_or(std::cmp::Ordering::Equal));
    let mut v = vec![cl as f32];
    for i in 0..k as usize {
        match cols.get(i) {
            Some(&c) => v.extend([row[c as usize], c as f32]),
            None => v.extend([f32::NEG_INFINITY, -1.0]),
        }
    }
    v
}

/// The dispatch layout (`Route::dispatch`) of the routing the probabilities `probs` (`[rows,
/// experts]`, zero off each token's top k) give: each token's k experts by probability, the highest
/// first, ties to the lower expert (as the reference ranks them, `functional::reference::moe_topk`).
fn routing(route: &crate::graph::Route, probs: &[f32]) -> crate::graph::Dispatch {
    let e = route.experts as usize;
    let chosen: Vec<Vec<usize>> = probs
        .chunks(e.max(1))
        .map(|row| {
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal));
            order.truncate(route.top_k as usize);
            order
        })
        .collect();
    route.dispatch(&chosen)
}

/// One PE's block of a grouped (expert) linear: `rows` rows of `x` (`[rows, slots * k]`, of which the
/// PE reads the contraction slice `k0..k0 + kl` of every slot) times columns `n0..n0 + nl` of the
/// `[rows, slots * n]` output; slot s's columns use the weights of expert `map[s]` (`w` holds every
/// expert's, `[k, n]` or `[n, k]` each), zero for an empty slot (-1).
#[allow(clippy::too_many_arguments)]
fn grouped_matmul(
    x: &[f32],
    wv: &[f32],
    map: &[f32],
    rows: u64,
    (k0, kl): (u64, u64),
    (n0, nl): (u64, u64),
    (k, n): (u64, u64),
    w_out_in: bool,
    st: Storage,
) -> Vec<f32> {
    let slots = map.len() as u64;
    let mut acc = vec![0f32; (rows * nl) as usize];
    for i in 0..rows as usize {
        for j in 0..nl {
            let (g, col) = ((n0 + j) / n, (n0 + j) % n);
            let Some(&e) = map.get(g as usize).filter(|&&e| e >= 0.0) else { continue };
            let base = e as u64 * k * n;
            let xr = &x[i * (slots * kl) as usize + (g * kl) as usize..][..kl as usize];
            let mut s = 0f32;
            for (kk, &xv) in xr.iter().enumerate() {
                let kk = k0 + kk as u64;
                let wi = base + if w_out_in { col * k + kk } else { kk * n + col };
                s += xv * st.round(wv[wi as usize]);
            }
            acc[i * nl as usize + j as usize] = s;
        }
    }
    acc
}

/// Values at flat positions `lo ..` of a tensor with rows of `cols`, as one fragment per row touched.
fn flat_frags(tensor: u32, cols: u64, lo: u64, vals: &[f32], src: u32) -> Vec<Frag> {
    let mut out = Vec::new();
    let (mut p, mut i) = (lo, 0usize);
    while i < vals.len() {
        let (row, c0) = (p / cols.max(1), p % cols.max(1));
        let c1 = cols.min(c0 + (vals.len() - i) as u64);
        let n = (c1 - c0) as usize;
        let v: Arc<[f32]> = vals[i..i + n].into();
        out.push(Frag { tensor, view_cols: cols, r0: row, r1: row + 1, c0, c1, cover: 0, src, vals: v });
        p += n as u64;
        i += n;
    }
    out
}

/// The part of `f` inside the view `v`'s columns (None if none).
fn crop(f: &Frag, v: &View) -> Option<Frag> {
    if f.tensor != v.base {
        return None;
    }
    if v.c0 == 0 && v.width == v.cols {
        // The whole tensor, whatever rows its fragments are cut in.
        return Some(f.clone());
    }
    let (c0, c1) = (f.c0.max(v.c0), f.c1.min(v.c0 + v.width));
    if c0 >= c1 {
        return None;
    }
    if (c0, c1) == (f.c0, f.c1) {
        return Some(f.clone());
    }
    let w = (f.c1 - f.c0) as usize;
    let mut vals = Vec::with_capacity((f.r1 - f.r0) as usize * (c1 - c0) as usize);
    for r in 0..(f.r1 - f.r0) as usize {
        vals.extend_from_slice(&f.vals[r * w + (c0 - f.c0) as usize..r * w + (c1 - f.c0) as usize]);
    }
    Some(Frag { c0, c1, vals: vals.into(), ..f.clone() })
}

/// Key (or value) row `t` of sequence `b`, head group `g`: from the cache, or from the fresh rows.
fn key_row<'a>(cache: &'a [f32], fresh: &'a [f32], a: &AttnShape, b: u64, t: u64, g: u64) -> &'a [f32] {
    let (d, w) = (a.head_dim as usize, (a.kv_heads * a.head_dim) as usize);
    let new = a.kv - a.len;
    if t < a.len {
        &cache[((b * a.len + t) as usize) * w + g as usize * d..][..d]
    } else {
        &fresh[((b * new + t - a.len) as usize) * w + g as usize * d..][..d]
    }
}

/// Output column `cc` of a row after the rotary embedding at position `pos`, as the reference rotates.
/// `inverse`: the rotation back (the sine negated), rotary's gradient.
fn rotary(
    row: &[f32],
    cc: u64,
    head_dim: u64,
    rot: u64,
    pos: u64,
    freqs: &[f64],
    (interleaved, inverse): (bool, bool),
) -> f32 {
    let (h, d) = (cc / head_dim, cc % head_dim);
    if d >= rot || freqs.is_empty() {
        return row[cc as usize];
    }
    let half = rot / 2;
    let base = h * head_dim;
    // The pair (a, b) this column belongs to, which one it is, and its frequency index.
    let (i, first) = if interleaved { (d / 2, d % 2 == 0) } else { (d % half, d < half) };
    let (a, b) = if interleaved { (base + 2 * i, base + 2 * i + 1) } else { (base + i, base + i + half) };
    let angle = (pos as f64 * freqs[i as usize]) as f32;
    let (cos, sin) = (angle.cos(), if inverse { -angle.sin() } else { angle.sin() });
    let (xa, xb) = (row[a as usize], row[b as usize]);
    if first {
        xa * cos - xb * sin
    } else {
        xb * cos + xa * sin
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044715;

fn gelu(tanh: bool, x: f32) -> f32 {
    if tanh {
        0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)).tanh())
    } else {
        0.5 * x * (1.0 + libm_erf(x * std::f32::consts::FRAC_1_SQRT_2))
    }
}

/// GELU's derivative, in the reference's formulas.
fn gelu_grad(tanh: bool, x: f32) -> f32 {
    if tanh {
        let th = (SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)).tanh();
        0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x)
    } else {
        let cdf = 0.5 * (1.0 + libm_erf(x * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = (-0.5 * x * x).exp() * (1.0 / (2.0 * std::f32::consts::PI).sqrt());
        cdf + x * pdf
    }
}

fn libm_erf(x: f32) -> f32 {
    <f32 as crate::functional::Real>::erf(x)
}

/// Whether query `i` (of `q`) sees key `j` (of `kv`), as the reference masks.
fn visible(q: u64, kv: u64, causal: bool, window: Option<u64>, i: u64, j: u64) -> bool {
    let pos = kv - q + i;
    if causal && j > pos {
        return false;
    }
    match window {
        Some(w) if causal => j + w > pos,
        _ => true,
    }
}

/// Partial statistics (a, b) of columns `co .. co + cl` of one row: LayerNorm (mean, M2), RMSNorm
/// (mean square, 0), softmax (max of the scaled visible scores, sum of exp(s - max)).
fn row_stats(op: &RowOp, num: &Numerics, row: &[f32], r: u64, co: u64, cl: u64) -> (f32, f32) {
    let xs = &row[co as usize..(co + cl) as usize];
    match *op {
        RowOp::Norm { rms: false, .. } => {
            let n = cl.max(1) as f32;
            let mean = xs.iter().sum::<f32>() / n;
            let m2 = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>();
            (mean, m2)
        }
        RowOp::Norm { rms: true, .. } => (xs.iter().map(|x| x * x).sum::<f32>() / cl.max(1) as f32, 0.0),
        // Computed with the forward's input (`norm_grad_stats`) or probabilities (`Kernel::RowStats`).
        RowOp::NormGrad { .. } | RowOp::SoftmaxGrad { .. } | RowOp::MoeTopK { .. } => (0.0, 0.0),
        RowOp::CrossEntropy { .. } => {
            let m = xs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            (m, xs.iter().map(|x| (x - m).exp()).sum::<f32>())
        }
        RowOp::Softmax { q, kv, head_dim, causal } => {
            let scale = 1.0 / (head_dim as f32).sqrt();
            let i = r % q.max(1);
            let vis = |j: u64| visible(q, kv, causal, num.sliding_window, i, j);
            let mut m = f32::NEG_INFINITY;
            for (k, x) in xs.iter().enumerate() {
                if vis(co + k as u64) {
                    m = m.max(x * scale);
                }
            }
            let mut s = 0f32;
            for (k, x) in xs.iter().enumerate() {
                if vis(co + k as u64) {
                    s += (x * scale - m).exp();
                }
            }
            (m, s)
        }
    }
}

/// Values of one row's statistics: (count, a, b), and the label's logit for cross-entropy.
fn stat_width(op: &RowOp) -> usize {
    match op {
        RowOp::CrossEntropy { .. } => 4,
        RowOp::NormGrad { .. } => 5,
        RowOp::MoeTopK { k } => 1 + 2 * *k as usize,
        _ => 3,
    }
}

/// The class a label picks (None: ignored, -100).
fn label_col(l: f32) -> Option<u64> {
    (l >= 0.0).then_some(l as u64)
}

/// Labels of the step not ignored.
fn valid_labels(labels: &[f32]) -> u64 {
    labels.iter().filter(|&&l| l >= 0.0).count() as u64
}

/// A cross-entropy root with a row's complete statistics (count, max, sum of exp, the label's logit)
/// adds the rows' `logsumexp - logit[label]` to its loss (ignored rows: their logit is 0 and their
/// label none, so they are told apart by the labels the root keeps).
fn row_loss(op: &RowOp, pe: &mut Pe, stats: &Frag) {
    let RowOp::CrossEntropy { labels, grad: false } = op else { return };
    let rows = stats.r1 - stats.r0;
    for i in 0..rows {
        let r = stats.r0 + i;
        let label = pe
            .store
            .iter()
            .find(|f| f.tensor == labels.base && f.r0 <= r && r < f.r1)
            .map(|f| f.vals[((r - f.r0) * (f.c1 - f.c0)) as usize]);
        let s = &stats.vals[4 * i as usize..4 * i as usize + 4];
        if label.and_then(label_col).is_some() {
            pe.loss.0 += s[1] + s[2].ln() - s[3];
        }
    }
    pe.loss.1 += rows;
}

/// `d loss / d logit` of column `cc` given the row's statistics (count, max, sum of exp, label's logit),
/// as the reference computes it: `exp(x - max) / sum / valid`, less `1 / valid` at the label.
fn ce_grad(x: f32, cc: u64, label: Option<u64>, s: &[f32], valid: u64) -> f32 {
    let Some(l) = label else { return 0.0 };
    let inv = if valid == 0 { 0.0 } else { 1.0 / valid as f32 };
    let p = (x - s[1]).exp() / s[2] * inv;
    if cc == l {
        p - inv
    } else {
        p
    }
}

/// A norm backward's partial statistics of columns `co .. co + cl` of one row: (count, mean, M2) of x
/// (RMSNorm: (count, mean square, 0)), the sum of `g = dy * gamma` and of `g * x`.
fn norm_grad_stats(rms: bool, dy: &[f32], x: &[f32], gamma: &[f32], st: Storage, co: u64, cl: u64) -> [f32; 5] {
    let r = co as usize..(co + cl) as usize;
    let n = cl.max(1) as f32;
    let xs = &x[r.clone()];
    let (a, b) = if rms {
        (xs.iter().map(|v| v * v).sum::<f32>() / n, 0.0)
    } else {
        let mean = xs.iter().sum::<f32>() / n;
        (mean, xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>())
    };
    let (mut sg, mut sgx) = (0f32, 0f32);
    for c in r {
        let g = dy[c] * st.round(gamma[c]);
        sg += g;
        sgx += g * x[c];
    }
    [cl as f32, a, b, sg, sgx]
}

/// Combines statistics `q` into `o`, both (count, a, b): LayerNorm's (mean, M2) by Chan's formula,
/// RMSNorm's mean square by counts, softmax's (max, sum) by rescaling to the larger max.
fn combine(op: &RowOp, o: &mut [f32], q: &[f32]) {
    let (na, nb) = (o[0], q[0]);
    let n = na + nb;
    match op {
        RowOp::Norm { rms: false, .. } | RowOp::NormGrad { rms: false, .. } => {
            if n > 0.0 {
                let delta = q[1] - o[1];
                o[1] += delta * nb / n;
                o[2] += q[2] + delta * delta * na * nb / n;
            }
        }
        RowOp::Norm { rms: true, .. } | RowOp::NormGrad { rms: true, .. } => {
            if n > 0.0 {
                o[1] = (na * o[1] + nb * q[1]) / n;
            }
        }
        RowOp::SoftmaxGrad { .. } => o[1] += q[1],
        RowOp::MoeTopK { k } => {
            // Both lists are sorted (highest first, ties to the lower column): merge the k best.
            let k = *k as usize;
            let pair = |v: &[f32], i: usize| (v[1 + 2 * i], v[2 + 2 * i]);
            let (mut a, mut b) = (0, 0);
            let mut merged = Vec::with_capacity(2 * k);
            for _ in 0..k {
                let (x, y) = (pair(o, a), pair(q, b));
                if y.0 > x.0 || (y.0 == x.0 && y.1 < x.1) {
                    merged.extend([y.0, y.1]);
                    b += 1;
                } else {
                    merged.extend([x.0, x.1]);
                    a += 1;
                }
            }
            o[1..].copy_from_slice(&merged);
        }
        RowOp::Softmax { .. } | RowOp::CrossEntropy { .. } => {
            let m = o[1].max(q[1]);
            if m > f32::NEG_INFINITY {
                let scale = |mx: f32| if mx == f32::NEG_INFINITY { 0.0 } else { (mx - m).exp() };
                o[2] = o[2] * scale(o[1]) + q[2] * scale(q[1]);
                o[1] = m;
            }
            if o.len() > 3 {
                // The label's logit: held by one PE of the row, zero on the others.
                o[3] += q[3];
            }
        }
    }
    if let RowOp::NormGrad { .. } = op {
        o[3] += q[3];
        o[4] += q[4];
    }
    o[0] = n;
}

/// Output of column `cc` of one row given its final statistics `s` (count, a, b).
fn row_apply(op: &RowOp, num: &Numerics, row: &[f32], r: u64, cc: u64, s: &[f32], w: impl Fn(u32, u64) -> f32) -> f32 {
    let x = row[cc as usize];
    match *op {
        RowOp::Norm { gamma, beta, rms: false } => {
            let rstd = 1.0 / (s[2] / s[0] + num.norm_eps as f32).sqrt();
            (x - s[1]) * rstd * w(gamma, cc) + beta.map_or(0.0, |b| w(b, cc))
        }
        RowOp::Norm { gamma, rms: true, .. } => {
            let rstd = 1.0 / (s[1] + num.norm_eps as f32).sqrt();
            w(gamma, cc) * (x * rstd)
        }
        // Their own formulas (`ce_grad`, the norm backward in `Kernel::RowApply`).
        RowOp::CrossEntropy { .. } | RowOp::NormGrad { .. } | RowOp::SoftmaxGrad { .. } => 0.0,
        RowOp::MoeTopK { k } => {
            // A softmax over the chosen logits (s[1] the highest), summed in choice order.
            let chosen = (0..k as usize).map(|i| (s[1 + 2 * i], s[2 + 2 * i]));
            let sum = chosen.clone().fold(0f32, |a, (v, _)| a + (v - s[1]).exp());
            match chosen.clone().any(|(_, c)| c == cc as f32) {
                true => (x - s[1]).exp() / sum,
                false => 0.0,
            }
        }
        RowOp::Softmax { q, kv, head_dim, causal } => {
            let scale = 1.0 / (head_dim as f32).sqrt();
            if visible(q, kv, causal, num.sliding_window, r % q.max(1), cc) {
                (x * scale - s[1]).exp() / s[2]
            } else {
                0.0
            }
        }
    }
}

/// Adds partial sums `parts` (in sender order) into `vals`, the values of `acc`'s slice, counting the
/// terms each covers; a part of another slice is an error naming the agent (`verb`: what it does).
fn add_partials(acc: &mut Frag, vals: &mut [f32], parts: &[Frag], at: &At, verb: &str) -> Result<(), String> {
    for p in parts {
        if !p.same_slice(acc) || p.vals.len() != vals.len() || p.cover == 0 {
            return Err(format!("{}: received {} but {verb} a partial sum of {}", at.name(), p.slice(), acc.slice()));
        }
        for (a, b) in vals.iter_mut().zip(p.vals.iter()) {
            *a += *b;
        }
        acc.cover += p.cover;
    }
    Ok(())
}

/// Checks that `acc` sums all `total` terms, and starts its count again for the next run.
fn complete(acc: &mut Frag, total: u64, at: &At) -> Result<(), String> {
    if acc.cover != total {
        return Err(format!(
            "{}: {} summed over {} of {total} terms (a missing reduction)",
            at.name(),
            acc.slice(),
            acc.cover
        ));
    }
    acc.cover = 0;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frag(r0: u64, r1: u64, c0: u64, c1: u64, first: f32) -> Frag {
        let n = ((r1 - r0) * (c1 - c0)) as usize;
        let vals: Arc<[f32]> = (0..n).map(|i| first + i as f32).collect();
        Frag::finished(1, 8, (r0, r1), (c0, c1), 0, vals)
    }

    /// Claims that split a train take, together, every value once, in order.
    #[test]
    fn slices_of_a_payload_partition_it() {
        let p: Payload = vec![frag(0, 2, 2, 6, 0.0), frag(5, 6, 0, 8, 100.0)].into();
        let n = 16; // 16 values, one per wavelet
        let mut seen = Vec::new();
        for (a, b) in [(0, 3), (3, 4), (4, 11), (11, 16)] {
            for f in slice_payload(&p, n, a, b).iter() {
                assert_eq!(f.vals.len() as u64, (f.r1 - f.r0) * (f.c1 - f.c0));
                seen.extend(f.vals.iter().copied());
            }
        }
        let all: Vec<f32> = p.iter().flat_map(|f| f.vals.iter().copied()).collect();
        assert_eq!(seen, all);
    }

    /// Chan's combine of two halves equals the statistics of the whole row.
    #[test]
    fn layernorm_statistics_combine() {
        let row: Vec<f32> = (0..10).map(|i| (i as f32 * 0.37).sin()).collect();
        let op = RowOp::Norm { gamma: 0, beta: None, rms: false };
        let num = Numerics { norm_eps: 1e-5, rotary_interleaved: false, gelu_tanh: true, sliding_window: None };
        let (m1, s1) = row_stats(&op, &num, &row, 0, 0, 4);
        let (m2, s2) = row_stats(&op, &num, &row, 0, 4, 6);
        let (m, s) = row_stats(&op, &num, &row, 0, 0, 10);
        let mut o = [4.0, m1, s1];
        combine(&op, &mut o, &[6.0, m2, s2]);
        assert!((o[1] - m).abs() < 1e-6 && (o[2] - s).abs() < 1e-5, "{o:?} vs ({m}, {s})");
    }
}
