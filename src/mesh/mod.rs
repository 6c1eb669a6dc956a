//! The mesh program: the compiler's output and the engine's only input.
//!
//! A flat, immutable description of what every PE of a wafer runs: which task template each PE
//! executes (assigned to rectangles of PEs), how trains of wavelets sent on each color travel
//! (route patterns, relative to the sender), and the perimeter IO ports with their streams.
//! Semantics: `shared/design/MACHINE-MODEL.md`, restated on each type below.
//!
//! Architecture invariant: the program indexes everything with typed `u32` ids (`TemplateId`,
//! `RegionId`, `PortId`, `ColorId`, local task indices) and holds no petgraph, no names on hot paths
//! (names live in `Region`/`Template`/`Task` for printers only), and no floating point that could
//! decide an ordering: rates are exact fractions of integers.
//! The program is not a file format: plans are saved as their compile inputs and recompiled.

use std::fmt;
use std::sync::Arc;

pub mod data;

pub use crate::hw::{MeshDims, SimdOp};

/// A color (virtual channel) on the fabric; at most `Timing::colors` distinct colors per router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ColorId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TemplateId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId(pub u32);

/// A task's index within its template (tasks of a PE are `0..template.tasks.len()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskIdx(pub u32);

impl ColorId {
    /// Not a fabric color: on an IO port, the link to its peer. A port task's `Recv` on `LINK` counts
    /// wavelets arriving from the peer wafer's port; a port `Send` on a real color injects into the mesh.
    pub const LINK: ColorId = ColorId(u32::MAX);
}

impl fmt::Display for ColorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// A PE position: x is the column (west to east), y the row (north to south).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Coord {
    pub x: u32,
    pub y: u32,
}

/// A rectangle of PEs: columns x..x+w, rows y..y+h.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl Rect {
    pub fn contains(&self, c: Coord) -> bool {
        c.x >= self.x && c.x < self.x + self.w && c.y >= self.y && c.y < self.y + self.h
    }
    pub fn pes(&self) -> u64 {
        self.w as u64 * self.h as u64
    }
    pub fn overlaps(&self, o: &Rect) -> bool {
        self.x < o.x + o.w && o.x < self.x + self.w && self.y < o.y + o.h && o.y < self.y + self.h
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dir {
    North,
    East,
    South,
    West,
}

impl Dir {
    /// (dx, dy) of one hop.
    pub fn delta(self) -> (i32, i32) {
        match self {
            Dir::North => (0, -1),
            Dir::East => (1, 0),
            Dir::South => (0, 1),
            Dir::West => (-1, 0),
        }
    }
}

/// Engine-facing machine parameters, copied from the hardware description when the program is built.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    pub clock_hz: f64,
    pub hop_cycles: u32,
    pub ramp_cycles: u32,
    pub pick_cycles: u32,
    pub queue_depth: u32,
    pub colors: u32,
    pub relay_cycles: u32,
    pub link_wavelets_per_cycle: u32,
    pub sram_bytes: u64,
    /// The PE's exact vector rates (see `hw::PeSpec::rate`), so the engine needs no hardware file.
    pub pe: crate::hw::PeSpec,
}

impl Timing {
    /// The engine-facing parameters of a wafer description.
    pub fn from_hw(hw: &crate::hw::WaferHw) -> Timing {
        Timing {
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
        }
    }
}

/// A region: the PEs that run one op (or one fused group of ops) of the graph, for reports and traces.
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    pub name: String,
    pub rect: Rect,
    /// Graph op names mapped here.
    pub ops: Vec<String>,
    /// Graph op kind of the main op (`linear`, `attn_scores`, ...).
    pub kind: String,
    /// Mesh algorithm (`gemv-tree`, `summa`, `cannon`, `row-reduce`, `elementwise`, ...).
    pub algorithm: String,
    /// FLOPs of the region's graph ops (the region's tasks must execute exactly these).
    pub flops: u64,
}

/// What a task waits for before it may start. All needs of a task must hold; they are counted per run:
/// run n (1-based) of a task needs n x `wavelets` wavelets received in total on the color, and
/// n x `times` completed runs of the other task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// `wavelets` wavelets arriving on `color` at this PE's ramp, per run.
    /// A data task: it becomes ready when the first of them arrives if its work is paced by this
    /// color (it then consumes them as they come), else when the last has arrived.
    /// On an IO port: wavelets arriving at the port from the mesh (leaving the wafer), or with
    /// `ColorId::LINK`, from the peer wafer's port.
    /// Wavelets of a need that is not the task's `paced_by` color are taken in by the PE as they
    /// arrive (an asynchronous receive into buffers the plan allocated), without occupying the PE;
    /// the task starts once the last of them has arrived. At most one task of a PE receives a color.
    Recv { color: ColorId, wavelets: u64 },
    /// Another task of this PE has completed `times` runs per run of this one (local activation).
    Done { task: TaskIdx, times: u32 },
    /// Run n (1-based) waits until `task` has completed at least
    /// `max(0, first + floor((n - 1) x num / den))` runs. `Done { task, times }` is
    /// `After { task, first: times, num: times, den: 1 }`; other uses:
    /// - `first: 0, num: 1, den: 1`: run n after the other task's run n - 1 (two tasks alternate);
    /// - `num: 0`: a one-time gate (every run waits for `first` runs of the other task);
    /// - `first: 1, num: 1, den: k`: k runs of this task per run of the other (a weight tile used by k chunks);
    /// - a negative `first`: the other task may run that many runs ahead (double buffering).
    ///
    /// Added by the compiler issue (layer loops, gates, double-buffered weight streams).
    After { task: TaskIdx, first: i64, num: u64, den: u64 },
}

impl Need {
    /// Runs of the other task that run `n` (1-based) of this task waits for (`Done` and `After`);
    /// None for a `Recv`.
    pub fn runs_needed(&self, n: u64) -> Option<u64> {
        match *self {
            Need::Recv { .. } => None,
            Need::Done { times, .. } => Some(n * times as u64),
            Need::After { first, num, den, .. } => {
                let v = first as i128 + ((n as i128 - 1) * num as i128) / den.max(1) as i128;
                Some(v.max(0) as u64)
            }
        }
    }
}

/// The vector work of one task run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Work {
    pub op: SimdOp,
    /// Elements processed; cycles follow from the PE's rate for `op` (SIMD width and SRAM ports).
    pub elems: u64,
    /// A fabric-input operand: the work consumes the `Recv` on this color as it arrives, so it cannot
    /// run ahead of the wavelets (and slow consumption backpressures the sender).
    pub paced_by: Option<ColorId>,
}

/// A train a task sends per run: `wavelets` wavelets on `color`, routed by the route that covers
/// this PE and color.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Send {
    pub color: ColorId,
    pub wavelets: u64,
    /// True: the train leaves as the task computes (a fabric-output operand), paced by the work.
    /// False: it leaves when the work is done (a result).
    pub streamed: bool,
    /// The runs (1-based, inclusive) on which this train is sent; None: every run. A relay that feeds
    /// a layer loop for the first L - 1 layers and the model's head after the last one sends the same
    /// stream on two colors with two windows. Added by the compiler issue.
    pub runs: Option<RunRange>,
}

/// An inclusive range of 1-based task runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunRange {
    pub first: u32,
    pub last: u32,
}

impl RunRange {
    pub fn contains(&self, run: u32) -> bool {
        run >= self.first && run <= self.last
    }
    pub fn len(&self) -> u32 {
        (self.last + 1).saturating_sub(self.first)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Send {
    /// Runs on which the train goes out, out of `repeat` runs of its task.
    pub fn runs_sent(&self, repeat: u32) -> u32 {
        match self.runs {
            None => repeat,
            Some(r) => RunRange { first: r.first.max(1), last: r.last.min(repeat) }.len(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// For printers and traces only.
    pub name: String,
    pub needs: Vec<Need>,
    pub work: Work,
    pub sends: Vec<Send>,
    /// Runs of this task; each run waits for its needs afresh (a run per chunk, per token, per layer).
    pub repeat: u32,
    /// FLOPs one run executes (a multiply-accumulate is two), summed by the engine for the invariant
    /// "FLOPs executed = FLOPs of the graph".
    pub flops: u64,
}

/// Bytes of one accumulator value in a PE's SRAM: a matmul's (or a scatter-add's) sums stay fp32 whatever
/// the storage dtype (fp16/bf16 storage with fp32 accumulation, the hardware's mixed-precision FMAC and the
/// values' rounding model), so the compiler sizes accumulators and functional runs count them at this.
pub const ACC_BYTES: u64 = 4;

/// The program of every PE that runs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    pub name: String,
    pub region: RegionId,
    pub tasks: Vec<Task>,
    /// SRAM bytes the compiler allocated on each PE running this template (weights, buffers, KV cache).
    pub sram_bytes: u64,
    /// Receive FIFOs the compiler allocated (inside `sram_bytes`) for inputs that arrive ahead of the
    /// input their task waits for.
    pub fifos: Vec<Fifo>,
}

/// A receive FIFO in a PE's SRAM: the PE takes up to `runs` runs of its task's `Recv` on `color` before
/// the task claims them, keeping its share of each run (a join's early input, such as a residual add's
/// skip, waits there for the late one instead of filling the fabric's queues back to its sender).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fifo {
    pub color: ColorId,
    pub runs: u32,
}

/// PEs running a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub rect: Rect,
    pub template: TemplateId,
}

/// How a train travels, relative to the PE (or port router) that sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `hops` hops in `dir`; delivered to every PE it passes (multicast) or only to the last.
    Line { dir: Dir, hops: u32, multicast: bool },
    /// To the PE at (dx, dy) from the sender, X first then Y (dimension-ordered unicast).
    To { dx: i32, dy: i32 },
    /// Multicast to a rectangle of `w x h` PEs whose top-left corner is at (dx, dy) from the sender:
    /// along the rectangle's first row reached, then up and down every column. Delivered to every PE of
    /// the rectangle.
    /// The compiler only emits senders whose row or column crosses the rectangle: a sender beside it
    /// (its row crosses) goes straight along its row into it, and that row is the first row reached;
    /// a sender above or below it (its column crosses) goes straight along its column to the nearer
    /// edge row, which is the first row reached. A sender inside the rectangle is beside it.
    Rect { dx: i32, dy: i32, w: u32, h: u32 },
    /// To the sender's own PE only (a loopback through the ramp).
    Local,
    /// Off the wafer: X first then Y to the router of `port`, and out through the port (data leaving
    /// the wafer: gradients to SwarmX, results to the host, hidden states to the next wafer). The
    /// port's tasks `Recv` it on the route's color.
    ToPort { port: PortId },
}

/// Who sends on a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Senders {
    /// Every PE in the rectangle, each with the pattern relative to itself.
    Pes(Rect),
    /// An IO port: the pattern is relative to the edge router the port attaches to.
    Port(PortId),
}

/// Routing of `color` for the given senders. Each router a route passes holds the color.
/// `relays` > 0 when the flow could not get a color end to end and PEs relay it: the engine charges
/// `relay_cycles` to the train's head at each relay.
/// The compiler's relayed routes carry `color` on their first and last segments (where the sender
/// sends and the receiver receives it) and other colors it found free between the relays; their
/// relaying is not written as tasks (only its latency is charged), and the per-router color rules of
/// the middle segments are the compiler's own bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub color: ColorId,
    pub senders: Senders,
    pub pattern: Pattern,
    pub relays: u32,
}

/// What is behind an IO port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Weights stream in from MemoryX (weight streaming).
    MemoryX,
    /// Gradients stream out to SwarmX / MemoryX.
    SwarmX,
    /// Activations and results to and from the host.
    Host,
    /// Another wafer (multi-wafer pipelined inference): hidden states.
    Wafer(u32),
}

/// A perimeter IO port: attached to an edge router, with an exact integer rate and a latency.
#[derive(Clone, Debug, PartialEq)]
pub struct Port {
    pub name: String,
    pub side: Dir,
    /// The edge PE whose router the port attaches to.
    pub at: Coord,
    /// Rate as an exact fraction: `wavelets` per `per_cycles` cycles (an integer token bucket).
    pub wavelets: u64,
    pub per_cycles: u64,
    pub latency_cycles: u64,
    pub peer: Peer,
    /// For `Peer::Wafer(w)`: the port (numbered within wafer `w`'s program) that this port's outgoing
    /// data arrives at. Such a port forwards what reaches it from its mesh; the peer port's tasks
    /// `Recv` it on `ColorId::LINK`. After `Cluster::concat` the id is global.
    pub peer_port: Option<PortId>,
    /// The port's own tasks: streams in (sends) and out (receives), with the same semantics as a PE's,
    /// their work ignored (a port computes nothing). Port templates belong to the program's `io` region,
    /// which covers no PE (an empty rectangle).
    pub template: TemplateId,
    /// Bytes the plan expects through this port in one run (the engine checks it).
    pub planned_bytes: u64,
}

/// The whole program of one wafer for one step.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshProgram {
    /// Format version of the program (bumped when semantics change).
    pub version: u32,
    /// The mesh in use (the `--mesh` rectangle, or the whole wafer).
    pub mesh: MeshDims,
    pub timing: Timing,
    pub regions: Vec<Region>,
    pub templates: Vec<Template>,
    /// Disjoint rectangles of PEs and their templates; PEs in no tile are idle.
    pub tiles: Vec<Tile>,
    pub routes: Vec<Route>,
    pub ports: Vec<Port>,
    /// FLOPs of the graph this program computes: the engine checks that its tasks execute exactly these.
    pub graph_flops: u64,
    /// Set when the program is several wafers side by side (`Cluster::concat`): the width of one,
    /// across whose boundaries no link runs.
    pub wafer_width: Option<u32>,
    /// The data side table for functional runs (cold: the timing engine never reads it); None where the
    /// program was not compiled with one (synthetic programs, wafers laid side by side).
    pub data: Option<Arc<data::ProgramData>>,
}

/// Several wafers run together (multi-wafer pipelined inference): ports with `Peer::Wafer` link them.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    pub wafers: Vec<MeshProgram>,
}

impl Cluster {
    /// One program of all wafers side by side (wafer k's column x becomes k * width + x), with
    /// template, region and port ids renumbered and each `peer_port` made global. The wafers must
    /// share mesh dimensions and timing.
    pub fn concat(&self) -> Result<MeshProgram, String> {
        let first = self.wafers.first().ok_or("a cluster needs at least one wafer")?;
        let (w, h) = (first.mesh.width, first.mesh.height);
        let mut out = MeshProgram {
            version: first.version,
            mesh: MeshDims { width: w * self.wafers.len() as u32, height: h },
            timing: first.timing,
            regions: vec![],
            templates: vec![],
            tiles: vec![],
            routes: vec![],
            ports: vec![],
            graph_flops: 0,
            wafer_width: Some(w),
            data: None,
        };
        let port_base: Vec<u32> = self
            .wafers
            .iter()
            .scan(0u32, |acc, p| {
                let b = *acc;
                *acc += p.ports.len() as u32;
                Some(b)
            })
            .collect();
        for (k, p) in self.wafers.iter().enumerate() {
            if p.mesh != first.mesh || p.timing != first.timing {
                return Err(format!("wafer {k} differs from wafer 0 in mesh or timing"));
            }
            let dx = k as u32 * w;
            let (rb, tb, pb) = (out.regions.len() as u32, out.templates.len() as u32, port_base[k]);
            let shift = |r: Rect| Rect { x: r.x + dx, ..r };
            out.regions.extend(p.regions.iter().map(|r| Region {
                rect: shift(r.rect),
                name: format!("w{k}.{}", r.name),
                ..r.clone()
            }));
            out.templates
                .extend(p.templates.iter().map(|t| Template { region: RegionId(t.region.0 + rb), ..t.clone() }));
            out.tiles
                .extend(p.tiles.iter().map(|t| Tile { rect: shift(t.rect), template: TemplateId(t.template.0 + tb) }));
            for r in &p.routes {
                let senders = match r.senders {
                    Senders::Pes(rect) => Senders::Pes(shift(rect)),
                    Senders::Port(q) => Senders::Port(PortId(q.0 + pb)),
                };
                let pattern = match r.pattern {
                    Pattern::ToPort { port } => Pattern::ToPort { port: PortId(port.0 + pb) },
                    other => other,
                };
                out.routes.push(Route { senders, pattern, ..*r });
            }
            for port in &p.ports {
                let peer_port = match (port.peer, port.peer_port) {
                    (Peer::Wafer(j), Some(q)) => {
                        let base = *port_base.get(j as usize).ok_or(format!("port {} names wafer {j}", port.name))?;
                        Some(PortId(base + q.0))
                    }
                    (_, q) => q.map(|q| PortId(q.0 + pb)),
                };
                out.ports.push(Port {
                    at: Coord { x: port.at.x + dx, y: port.at.y },
                    template: TemplateId(port.template.0 + tb),
                    peer_port,
                    name: format!("w{k}.{}", port.name),
                    ..port.clone()
                });
            }
            out.graph_flops += p.graph_flops;
        }
        // The data side tables, when every wafer has one (functional runs).
        let tables: Option<Vec<&data::ProgramData>> = self.wafers.iter().map(|p| p.data.as_deref()).collect();
        out.data = tables.map(|t| Arc::new(data::ProgramData::concat(&t, w)));
        Ok(out)
    }
}

/// A step run as phases, one after the other, on the same wafer: weight-streaming training runs its
/// forward pass (every layer, the whole wafer) and then its backward pass (the whole wafer again; when
/// the backward pass does not fit at once, the head's backward and then the layers', each on the whole
/// wafer).
/// Each phase is a complete program run to completion before the next starts; nothing stays in SRAM
/// from one phase to the next (data that crosses phases goes out to MemoryX and comes back), and the
/// step takes the sum of the phases' cycles. The graph's FLOPs are the sum of the phases' `graph_flops`.
/// Added by the compiler issue.
#[derive(Clone, Debug, PartialEq)]
pub struct Phases {
    pub phases: Vec<MeshProgram>,
}

/// Version of the program semantics above (2: `Need::After`, `Send::runs`; 3: `wafer_width`, clusters
/// laid side by side, `Phases`).
pub const PROGRAM_VERSION: u32 = 3;

impl MeshProgram {
    /// SRAM bytes the compiler allocated, over every PE that runs a template.
    pub fn sram_bytes(&self) -> u64 {
        self.tiles.iter().map(|t| self.templates[t.template.0 as usize].sram_bytes * t.rect.pes()).sum()
    }

    /// FLOPs the tasks execute: every PE of every tile runs every task `repeat` times.
    pub fn task_flops(&self) -> u64 {
        self.tiles
            .iter()
            .map(|t| {
                let per_pe: u64 =
                    self.templates[t.template.0 as usize].tasks.iter().map(|k| k.flops * k.repeat as u64).sum();
                per_pe * t.rect.pes()
            })
            .sum()
    }
}
