//! PE utilization traces: what the wafer did, where and when.
//!
//! This module owns the trace file format (specified in `traces/FORMAT.md`; no other module reads or
//! writes it), turning an engine recording into a file (`write`), reading one back (`read`), and
//! looking at it: `summary`, `heatmap` (PNG and animated GIF), `timeline` (terminal sparklines),
//! `slice` (one PE's or region's history) and `perfetto` (export for ui.perfetto.dev).
//!
//! How a trace is made: `spec_for` tells the engine what to record (how many windows at most, which
//! PEs and ports keep their task runs), the engine records exact counts per agent and window
//! (`engine::record`), and `write` quantises them per PE and window into bitmap-compressed frames,
//! keeps exact per-region and per-port series beside them, and widens the window until the file fits
//! its byte budget, saying so.
//!
//! Architecture invariant: the trace never reads the graph or the engine's internals, only the mesh
//! program (for geometry, regions and names) and the engine's `EngineRun` with its `Recording`. A file
//! depends only on those and the header: no timestamps, no hash order, no thread count, so the same run
//! gives the same bytes for any number of threads. Reading never panics on any input: every error
//! names the byte offset and what was expected there.

mod error;
mod format;
pub mod heatmap;
pub mod perfetto;
mod read;
pub mod slice;
pub mod summary;
pub mod timeline;
mod write;

pub use error::TraceError;
pub use format::{FORMAT_VERSION, MAGIC};
pub use read::{read, read_bytes};
pub use write::{encode, write, WriteInfo};

use crate::engine::record::{Span, TraceSpec, METRICS};
use crate::mesh::{Coord, Dir, MeshProgram, Rect};
use crate::report::WorkloadSummary;

/// Default size budget of a trace file: 256 MiB.
pub const DEFAULT_BUDGET_BYTES: u64 = 256 << 20;
/// At most this many windows are recorded, however small the mesh: more than the viewers show (64
/// sparkline columns, 120 animation frames) would only grow the file.
pub const MAX_WINDOWS: u32 = 256;
/// Memory the engine's recording may take: each agent keeps up to `max_windows` bins of
/// `RECORDING_BIN_BYTES` (an index and seven u64 counts). 1.5 GiB keeps a full-wafer run with a trace
/// within the 4 GB peak-memory target (measured: 0.76 GB without a trace, BENCHMARKS.md).
pub const RECORDING_MEMORY_BYTES: u64 = 3 << 29;
pub const RECORDING_BIN_BYTES: u64 = std::mem::size_of::<crate::engine::record::Bin>() as u64;
/// Sampled PEs (whose task runs become spans): the corners and centre of every region, at most this many.
pub const MAX_SAMPLED_PES: usize = 64;
/// Sampled IO ports, at most.
pub const MAX_SAMPLED_PORTS: usize = 16;
/// Spans take at most this fraction (1 / n) of the budget; the earliest are kept.
pub const SPAN_BUDGET_DIVISOR: u64 = 8;

/// Exact counts of one agent (or a sum of agents) in one window, per `engine::record::Metric`:
/// compute and stalls in cycles; send, receive and fabric in cycles x capacity units.
pub type Counts = [u64; METRICS];

/// How big a trace may be and how fine its windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceOptions {
    /// The file never exceeds this many bytes: the window widens until it fits.
    pub budget_bytes: u64,
    /// The window the user asked for (`--trace-window`); by default as fine as the recording allows.
    pub window_cycles: Option<u64>,
}

impl Default for TraceOptions {
    fn default() -> TraceOptions {
        TraceOptions { budget_bytes: DEFAULT_BUDGET_BYTES, window_cycles: None }
    }
}

/// What a trace is of: written in its header and shown by every viewer.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceHeader {
    pub model: String,
    pub workload: WorkloadSummary,
    /// Hardware description name (`wse2`, `cs2`).
    pub hardware: String,
    /// `detailed` or `fast`.
    pub fidelity: String,
    /// `pipelined`, `weight-streaming`, `multi-wafer`.
    pub mode: String,
    /// The emulator's version (`waferscale 0.1.0`).
    pub version: String,
    pub clock_hz: f64,
}

impl TraceHeader {
    /// A header for a run of `program`, with the fidelity of `run`, the program's clock and this build's
    /// version.
    pub fn for_run(
        model: &str,
        workload: WorkloadSummary,
        hardware: &str,
        mode: &str,
        program: &MeshProgram,
        run: &crate::engine::EngineRun,
    ) -> TraceHeader {
        TraceHeader {
            model: model.to_string(),
            workload,
            hardware: hardware.to_string(),
            fidelity: run.fidelity.name().to_string(),
            mode: mode.to_string(),
            version: version_string(),
            clock_hz: program.timing.clock_hz,
        }
    }
}

/// A byte size as `--trace-budget` takes it: `268435456`, `256MB`, `256MiB`, `1.5GB`, `64k` (k, M, G
/// decimal; Ki, Mi, Gi binary; a trailing `B` optional).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("`{s}` is not a size; expected bytes such as 268435456, 256MB or 256MiB");
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let (num, mult) = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("K", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ]
    .iter()
    .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n, *m)))
    .unwrap_or((t, 1));
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 || v * mult as f64 > u64::MAX as f64 {
        return Err(bad());
    }
    Ok((v * mult as f64).round() as u64)
}

/// A duration for people: `1.08 us`, `2.50 ms`, `1.20 s`.
pub fn seconds_text(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.2} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// `waferscale X.Y.Z`: what trace headers and reports call this build.
pub fn version_string() -> String {
    format!("waferscale {}", env!("CARGO_PKG_VERSION"))
}

/// Writes an output file (a picture, an export) atomically: a temporary file beside it, renamed into
/// place, so a failure never leaves half a file.
pub fn write_output(path: &str, bytes: &[u8]) -> Result<(), TraceError> {
    let tmp = format!("{path}.tmp-{}", std::process::id());
    let res = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|source| TraceError::Write { path: path.to_string(), source })
}

/// What a heatmap or timeline shows, each as a fraction in [0, 1].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// The SIMD datapath computing.
    Compute,
    /// Wavelets leaving PEs (up ramps).
    Send,
    /// Wavelets arriving at PEs (down ramps).
    Receive,
    /// The router's four outgoing links.
    Fabric,
    /// A running task stalled, any cause.
    Stall,
    /// SRAM allocated over capacity (the compiler's static allocation: constant over the run).
    Sram,
}

impl View {
    pub const ALL: [View; 6] = [View::Compute, View::Send, View::Receive, View::Fabric, View::Stall, View::Sram];
    pub fn name(self) -> &'static str {
        match self {
            View::Compute => "compute",
            View::Send => "send",
            View::Receive => "receive",
            View::Fabric => "fabric",
            View::Stall => "stall",
            View::Sram => "sram",
        }
    }
    pub fn parse(s: &str) -> Option<View> {
        View::ALL.into_iter().find(|v| v.name() == s)
    }
    /// What the value means, for colour bars and legends.
    pub fn unit(self) -> &'static str {
        match self {
            View::Compute => "% of cycles computing",
            View::Send => "% of up-ramp capacity",
            View::Receive => "% of down-ramp capacity",
            View::Fabric => "% of 4-link router capacity",
            View::Stall => "% of cycles stalled",
            View::Sram => "% of SRAM allocated",
        }
    }
    /// The value from exact fractions (`fractions`) and an SRAM occupancy.
    pub fn of_fractions(self, f: &[f64; METRICS], sram: f64) -> f64 {
        use crate::engine::record::Metric as M;
        let v = match self {
            View::Compute => f[M::Compute as usize],
            View::Send => f[M::Send as usize],
            View::Receive => f[M::Receive as usize],
            View::Fabric => f[M::Fabric as usize],
            View::Stall => f[M::StallData as usize] + f[M::StallBackpressure as usize] + f[M::StallIo as usize],
            View::Sram => sram,
        };
        v.clamp(0.0, 1.0)
    }
    /// The value from a frame's quantised values.
    pub fn of_quantised(self, q: &[u8; METRICS], sram: f64) -> f64 {
        let mut f = [0.0; METRICS];
        for (a, b) in f.iter_mut().zip(q) {
            *a = *b as f64 / 255.0;
        }
        self.of_fractions(&f, sram)
    }
}

/// A region of the program, as the trace keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    pub name: String,
    pub kind: String,
    pub algorithm: String,
    pub rect: Rect,
    pub flops: u64,
}

/// A task template: its name, region, SRAM per PE and task names (spans name tasks by index).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateInfo {
    pub name: String,
    pub region: u32,
    pub sram_bytes: u64,
    pub tasks: Vec<String>,
}

/// PEs running a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileInfo {
    pub rect: Rect,
    pub template: u32,
}

/// A perimeter IO port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub name: String,
    pub side: Dir,
    pub at: Coord,
    /// Rate: `wavelets` per `per_cycles` cycles.
    pub wavelets: u64,
    pub per_cycles: u64,
    /// What is behind it: `memoryx`, `swarmx`, `host`, `wafer N`.
    pub peer: String,
    pub template: u32,
    /// Capacity units per cycle at the port's rate (`unit` x wavelets / per_cycles): the denominator of
    /// its utilization.
    pub capacity_units: u64,
}

/// One window of every PE: which PEs did anything, and their quantised fractions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// PEs (mesh order) with any nonzero metric in the window.
    pub active: bitvec::vec::BitVec<u8, bitvec::order::Lsb0>,
    /// Per active PE in mesh order: per metric, the fraction of the window x 255, rounded to nearest;
    /// a nonzero count is never stored as 0 (so a PE that did anything shows).
    pub values: Vec<[u8; METRICS]>,
}

impl Frame {
    /// The values of PE `pe` (zeros if it was idle).
    pub fn get(&self, pe: usize) -> [u8; METRICS] {
        match self.active.get(pe) {
            Some(b) if *b => self.values[self.active[..pe].count_ones()],
            _ => [0; METRICS],
        }
    }
    /// Active PEs and their values, in mesh order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &[u8; METRICS])> + '_ {
        self.active.iter_ones().zip(self.values.iter())
    }
}

/// A trace, read back from its file.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub header: TraceHeader,
    pub format_version: u16,
    pub width: u32,
    pub height: u32,
    /// Cycles of the run.
    pub cycles: u64,
    /// The window of the frames and series; windows cover `[i * window_cycles, (i + 1) * window_cycles)`,
    /// the last one cut at `cycles`.
    pub window_cycles: u64,
    pub windows: u32,
    /// The engine's recording window (the finest the file could have had).
    pub recorded_window_cycles: u64,
    /// The window the user asked for, if any.
    pub requested_window_cycles: Option<u64>,
    /// The window was widened to fit the budget.
    pub adapted: bool,
    pub budget_bytes: u64,
    /// SRAM bytes of one PE.
    pub sram_capacity_bytes: u64,
    /// Capacity units of one wavelet per cycle (`engine::UNIT` when written).
    pub unit: u64,
    pub regions: Vec<RegionInfo>,
    pub templates: Vec<TemplateInfo>,
    pub tiles: Vec<TileInfo>,
    pub ports: Vec<PortInfo>,
    /// Exact sums per window over the PEs of each region; one more entry at the end for PEs in no tile.
    pub region_series: Vec<Vec<Counts>>,
    /// Exact counts per window of each port (send: into the mesh; receive: out of it).
    pub port_series: Vec<Vec<Counts>>,
    pub frames: Vec<Frame>,
    /// Task runs of the sampled PEs and ports, by (agent, start, task).
    pub spans: Vec<Span>,
    /// Spans left out to stay within the budget (the latest ones).
    pub spans_dropped: u64,
    /// Per PE, its template (`NO_TEMPLATE` outside every tile).
    pub pe_template: Vec<u32>,
}

/// `Trace::pe_template` of a PE in no tile.
pub const NO_TEMPLATE: u32 = u32::MAX;

impl Trace {
    pub fn pes(&self) -> usize {
        self.width as usize * self.height as usize
    }
    pub fn coord(&self, pe: usize) -> Coord {
        Coord { x: (pe % self.width as usize) as u32, y: (pe / self.width as usize) as u32 }
    }
    /// The region a PE works for (through its tile's template), if any.
    pub fn pe_region(&self, pe: usize) -> Option<usize> {
        match self.pe_template[pe] {
            NO_TEMPLATE => None,
            t => Some(self.templates[t as usize].region as usize),
        }
    }
    /// PEs per region, plus the PEs in no tile at the end.
    pub fn region_pes(&self) -> Vec<u64> {
        let mut n = vec![0u64; self.regions.len() + 1];
        for pe in 0..self.pes() {
            n[self.pe_region(pe).unwrap_or(self.regions.len())] += 1;
        }
        n
    }
    pub fn pe_sram_bytes(&self, pe: usize) -> u64 {
        match self.pe_template[pe] {
            NO_TEMPLATE => 0,
            t => self.templates[t as usize].sram_bytes,
        }
    }
    /// First cycle and length of window `w`.
    pub fn window_span(&self, w: usize) -> (u64, u64) {
        window_span(self.window_cycles, self.cycles, w)
    }
    /// The name of agent `agent` (a PE `(x,y)` or a port).
    pub fn agent_name(&self, agent: u32) -> String {
        let a = agent as usize;
        if a < self.pes() {
            let c = self.coord(a);
            format!("PE ({},{})", c.x, c.y)
        } else {
            format!("port {}", self.ports.get(a - self.pes()).map_or("?", |p| p.name.as_str()))
        }
    }
    /// The template an agent runs, if any.
    pub fn agent_template(&self, agent: u32) -> Option<&TemplateInfo> {
        let a = agent as usize;
        let t = if a < self.pes() { self.pe_template[a] } else { self.ports.get(a - self.pes())?.template };
        self.templates.get(t as usize)
    }
    /// SRAM allocated on a PE over its capacity.
    pub fn pe_sram(&self, pe: usize) -> f64 {
        if self.sram_capacity_bytes == 0 {
            return 0.0;
        }
        (self.pe_sram_bytes(pe) as f64 / self.sram_capacity_bytes as f64).min(1.0)
    }
    /// The region named `name`, or an error listing the regions.
    pub fn region_index(&self, name: &str) -> Result<usize, TraceError> {
        self.regions.iter().position(|r| r.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.regions.iter().map(|r| r.name.as_str()).collect();
            TraceError::Query(format!("no region named `{name}` in this trace; its regions: {}", names.join(", ")))
        })
    }
    /// The PE at (x, y), or an error giving the mesh size.
    pub fn pe_index(&self, x: u32, y: u32) -> Result<usize, TraceError> {
        if x >= self.width || y >= self.height {
            return Err(TraceError::Query(format!(
                "PE ({x},{y}) is outside the {} x {} mesh of this trace (x < {}, y < {})",
                self.width, self.height, self.width, self.height
            )));
        }
        Ok((y * self.width + x) as usize)
    }
    /// Window `w`, or an error giving the number of windows.
    pub fn check_window(&self, w: u32) -> Result<usize, TraceError> {
        if w >= self.windows {
            return Err(TraceError::Query(format!(
                "window {w} does not exist: this trace has {} windows (0 to {})",
                self.windows,
                self.windows - 1
            )));
        }
        Ok(w as usize)
    }
    /// Average SRAM occupancy of a region's PEs (`regions.len()` for PEs in no region).
    pub fn region_sram(&self, r: usize) -> f64 {
        let (mut bytes, mut n) = (0u64, 0u64);
        for pe in 0..self.pes() {
            if self.pe_region(pe).unwrap_or(self.regions.len()) == r {
                bytes += self.pe_sram_bytes(pe);
                n += 1;
            }
        }
        if n == 0 || self.sram_capacity_bytes == 0 {
            0.0
        } else {
            bytes as f64 / (n as f64 * self.sram_capacity_bytes as f64)
        }
    }
    /// Exact fractions of the capacity of `n_pes` PEs over window `w` from summed counts: compute and
    /// stalls over cycles, send and receive over the ramps, fabric over the four outgoing links.
    pub fn pe_fractions(&self, c: &Counts, n_pes: u64, w: usize) -> [f64; METRICS] {
        let (_, len) = self.window_span(w);
        fractions(c, n_pes, len, self.unit)
    }
}

/// First cycle and length of window `w` of `window` cycles in a run of `cycles` cycles: the last window
/// is cut at the end of the run (a window entirely past it, which only an empty run has, keeps its
/// full length so that no fraction divides by zero).
pub fn window_span(window: u64, cycles: u64, w: usize) -> (u64, u64) {
    let start = window * w as u64;
    let len = if start >= cycles { window } else { window.min(cycles - start) };
    (start, len.max(1))
}

/// Denominator scale of each metric: cycles (1), capacity units (`unit`), or four links (`4 unit`).
pub fn metric_scale(m: usize, unit: u64) -> u64 {
    use crate::engine::record::Metric;
    match m {
        x if x == Metric::Send as usize || x == Metric::Receive as usize => unit,
        x if x == Metric::Fabric as usize => 4 * unit,
        _ => 1,
    }
}

/// Counts of `n` agents over `len` cycles as fractions of their capacity.
pub fn fractions(c: &Counts, n: u64, len: u64, unit: u64) -> [f64; METRICS] {
    let mut f = [0.0; METRICS];
    for (m, v) in f.iter_mut().enumerate() {
        let d = n as f64 * len as f64 * metric_scale(m, unit) as f64;
        *v = if d > 0.0 { c[m] as f64 / d } else { 0.0 };
    }
    f
}

/// What to record for a trace of `program` within `opts`: the most windows the recording memory and the
/// file budget make worthwhile, and a deterministic sample of PEs (corners and centre of every region)
/// and IO ports whose task runs are kept as spans.
pub fn spec_for(program: &MeshProgram, opts: &TraceOptions) -> TraceSpec {
    let pes = program.mesh.pes();
    let agents = pes + program.ports.len() as u64;
    let memory_windows = RECORDING_MEMORY_BYTES / (agents.max(1) * RECORDING_BIN_BYTES);
    // A frame where every PE has every metric: the activity bitmap, seven metric bitmaps, seven bytes.
    let worst_frame = pes.div_ceil(8) * 8 + 7 * pes;
    let series = (program.regions.len() as u64 + 1 + program.ports.len() as u64) * METRICS as u64 * 5;
    let file_windows = opts.budget_bytes / (worst_frame + series).max(1);
    // Most runs are far from the worst frame, and the writer widens windows until the file fits, so
    // record up to four times what the worst case allows.
    let max_windows = memory_windows.min(MAX_WINDOWS as u64).min(file_windows.saturating_mul(4)).max(1) as u32;
    TraceSpec { max_windows, sample: sample_agents(program) }
}

/// Corners and centre of every region (in region order, at most `MAX_SAMPLED_PES`), then the first
/// `MAX_SAMPLED_PORTS` ports; sorted global agent ids.
pub fn sample_agents(program: &MeshProgram) -> Vec<u32> {
    let (w, h) = (program.mesh.width, program.mesh.height);
    let mut pes: Vec<u32> = Vec::new();
    'regions: for r in &program.regions {
        let rc = r.rect;
        if rc.w == 0 || rc.h == 0 {
            continue;
        }
        let (x1, y1) = (rc.x + rc.w - 1, rc.y + rc.h - 1);
        for (x, y) in [(rc.x, rc.y), (x1, rc.y), (rc.x, y1), (x1, y1), (rc.x + rc.w / 2, rc.y + rc.h / 2)] {
            if x < w && y < h {
                let id = y * w + x;
                if !pes.contains(&id) {
                    if pes.len() == MAX_SAMPLED_PES {
                        break 'regions;
                    }
                    pes.push(id);
                }
            }
        }
    }
    let pes_n = program.mesh.pes() as u32;
    pes.extend((0..program.ports.len().min(MAX_SAMPLED_PORTS) as u32).map(|p| pes_n + p));
    pes.sort_unstable();
    pes
}

/// The template of every PE, from the program's tiles (`NO_TEMPLATE` outside them).
fn pe_templates(width: u32, height: u32, tiles: &[TileInfo]) -> Vec<u32> {
    let mut t = vec![NO_TEMPLATE; width as usize * height as usize];
    for tile in tiles {
        let r = tile.rect;
        for y in r.y..(r.y + r.h).min(height) {
            for x in r.x..(r.x + r.w).min(width) {
                t[(y * width + x) as usize] = tile.template;
            }
        }
    }
    t
}

fn side_code(d: Dir) -> u8 {
    match d {
        Dir::North => 0,
        Dir::East => 1,
        Dir::South => 2,
        Dir::West => 3,
    }
}

fn side_name(d: Dir) -> &'static str {
    match d {
        Dir::North => "north",
        Dir::East => "east",
        Dir::South => "south",
        Dir::West => "west",
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn budgets_parse_with_units() {
        assert_eq!(parse_bytes("268435456"), Ok(268_435_456));
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("256MB"), Ok(256_000_000));
        assert_eq!(parse_bytes("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("64k"), Ok(64_000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-1MB").is_err());
    }
}
