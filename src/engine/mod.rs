//! The wafer engine: executes a mesh program on an emulated wafer, cycle-approximately.
//!
//! PEs run their tasks when the data they need has arrived (dataflow triggering) and the task picker
//! picks them; a task's duration follows its SIMD op, width and SRAM ports; its results leave as trains
//! of wavelets that reserve the links of their route trees (one wavelet per cycle per link direction,
//! shared between trains, paced by their slowest consumer); IO ports are links with their own rate and
//! latency. Time advances from event to event; events are ordered by (cycle, sequence number).
//!
//! Architecture invariant: the engine reads only the flat `mesh::MeshProgram` (never the graph or
//! petgraph); all timing is integer cycles; no floating point decides an order; results do not depend
//! on hash order or thread count.

mod credit;
pub mod fast;
mod link;
pub mod memory;
mod queue;
pub mod record;
pub mod report;
mod route;
mod sim;
pub mod synth;
pub mod values;

pub use link::{Pace, Timeline, UNIT};

use std::fmt;

use crate::mesh::MeshProgram;

/// How much of the machine is simulated individually.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fidelity {
    /// Every PE and every train.
    Detailed,
    /// For the whole wafer: a weight-streaming layer loop emulated for a few layers and extrapolated
    /// (`fast`); everything else runs as detailed, and reports say which.
    Fast,
}

impl Fidelity {
    pub fn name(self) -> &'static str {
        match self {
            Fidelity::Detailed => "detailed",
            Fidelity::Fast => "fast",
        }
    }
}

#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub fidelity: Fidelity,
    pub threads: usize,
    /// Record per-window activity for a trace.
    pub trace: Option<record::TraceSpec>,
    /// Where the engine publishes the cycle it has reached, for progress bars (never read back).
    pub progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl EngineOptions {
    pub fn new(fidelity: Fidelity, threads: usize) -> EngineOptions {
        EngineOptions { fidelity, threads, trace: None, progress: None }
    }
}

/// What a cycle of the critical path was spent on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Res {
    /// PE arithmetic at its SIMD width, and task picks.
    Compute,
    /// PE arithmetic limited by the SRAM ports rather than the SIMD width.
    Sram,
    /// Wavelets crossing the fabric: hops, ramps, contention, serialisation.
    Fabric,
    /// Perimeter IO ports: their bandwidth and latency.
    PerimeterIo,
    /// MemoryX's own bandwidth, where it is below the ports'.
    MemoryX,
    /// Links between wafers.
    InterWafer,
}

impl Res {
    pub const ALL: [Res; 6] = [Res::Compute, Res::Sram, Res::Fabric, Res::PerimeterIo, Res::MemoryX, Res::InterWafer];
    pub fn name(self) -> &'static str {
        match self {
            Res::Compute => "compute",
            Res::Sram => "sram",
            Res::Fabric => "fabric",
            Res::PerimeterIo => "perimeter_io",
            Res::MemoryX => "memoryx",
            Res::InterWafer => "inter_wafer",
        }
    }
}

/// Cycles of a dependency path, by resource: the engine carries one along every task run and train,
/// taking at each start the path of whatever constraint was met last (max-plus), so the path of the
/// last task to finish is the run's critical path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Path(pub [u64; 6]);

impl Path {
    pub fn add(mut self, r: Res, cycles: u64) -> Path {
        self.0[r as usize] += cycles;
        self
    }
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Whole-run counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub events: u64,
    pub flops: u64,
    pub wavelets_sent: u64,
    /// Wavelets arriving at PEs and ports (a multicast counts once per receiver).
    pub wavelets_delivered: u64,
    /// Wavelets times router-to-router links crossed.
    pub wavelet_hops: u64,
    pub relays: u64,
    /// Bytes through each IO port (in or out).
    pub io_bytes: Vec<u64>,
    /// Cycles each IO port's link was held by trains, summed over its trains (a train paced below the
    /// port's rate holds it longer at a fraction of its bandwidth).
    pub io_busy: Vec<u64>,
}

/// What one PE or port did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentStats {
    /// Cycles computing.
    pub busy: u64,
    /// Cycles a running task waited for its paced input or its streamed output beyond its compute.
    pub stalled: u64,
    pub runs: u64,
    pub flops: u64,
    /// Cycle the first task run started (u64::MAX if none ran) and the last one finished.
    pub first_start: u64,
    pub last_finish: u64,
}

impl Default for AgentStats {
    fn default() -> AgentStats {
        AgentStats { busy: 0, stalled: 0, runs: 0, flops: 0, first_start: u64::MAX, last_finish: 0 }
    }
}

/// One task that could not run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub agent: String,
    pub task: String,
    pub run: u32,
    pub waits_for: Vec<String>,
    /// A train this agent sent is held by a receiver whose queues are full: where a knot of waits
    /// shows itself (the agents that merely starve behind it are many more), so these are listed first.
    pub held: bool,
}

/// No event can fire while work remains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadlockReport {
    pub cycle: u64,
    pub blocked_agents: u64,
    /// The first `DEADLOCK_LISTED` blocked agents: those with held sends first, each group in mesh order.
    pub blocked: Vec<Blocked>,
}

/// How many blocked agents a deadlock report lists.
pub const DEADLOCK_LISTED: usize = 12;

impl fmt::Display for DeadlockReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "deadlock at cycle {}: {} PEs or ports have work left and no event can fire",
            self.cycle, self.blocked_agents
        )?;
        for b in &self.blocked {
            writeln!(f, "  {} task {} (run {}) waits for: {}", b.agent, b.task, b.run, b.waits_for.join("; "))?;
        }
        if self.blocked_agents as usize > self.blocked.len() {
            writeln!(f, "  ... and {} more", self.blocked_agents as usize - self.blocked.len())?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The program cannot progress: a result, reported with what each blocked PE waits for.
    #[error("{0}")]
    Deadlock(DeadlockReport),
    /// The program breaks the mesh-program contract (a compiler bug or a hand-written program's).
    #[error("invalid mesh program: {0}")]
    Program(String),
    /// A functional run found values that do not add up (a wrong route, a missing reduction, a tile
    /// that does not fit): a bug in the compiled program.
    #[error("functional run: {0}")]
    Values(String),
    /// An end-of-run invariant failed.
    #[error("engine invariant violated: {0}")]
    Invariant(String),
    /// The run outgrew the memory limit (`memory`): stopped before the host's OOM killer stops it.
    #[error("{0}")]
    Memory(String),
}

/// The outcome of one run.
#[derive(Clone, Debug)]
pub struct EngineRun {
    pub cycles: u64,
    pub totals: Totals,
    /// Per PE (mesh order), then per port.
    pub agents: Vec<AgentStats>,
    /// Busy fraction of router-to-router links over the run.
    pub fabric_utilization: f64,
    /// The critical path, by resource (sums to about `cycles`).
    pub critical_path: Path,
    /// Per-window activity, when a trace was asked for.
    pub recording: Option<record::Recording>,
    pub fidelity: Fidelity,
}

/// Runs `program` to completion and checks the end-of-run invariants:
/// FLOPs executed = the program's graph FLOPs, wavelets delivered = wavelets consumed,
/// bytes through each port = the bytes its plan expects.
/// Runs several wafers together (multi-wafer pipelined inference): side by side as one program,
/// linked only through their ports.
pub fn run_cluster(cluster: &crate::mesh::Cluster, opts: &EngineOptions) -> Result<EngineRun, EngineError> {
    let program = cluster.concat().map_err(EngineError::Program)?;
    run(&program, opts)
}

pub fn run(program: &MeshProgram, opts: &EngineOptions) -> Result<EngineRun, EngineError> {
    // One program runs in detail in both fidelities: fast fidelity's aggregation is of a whole
    // weight-streaming loop, over programs cut from it (`fast`). Merging repeated task runs inside one
    // program (the first attempt) moved pipelined programs by up to 85%, far outside the 2% the two
    // fidelities must agree to; equivalence classes of PEs are not built.
    run_program(program, opts)
}

/// Runs independent programs (a step's phases, fast fidelity's cut loops), several at once when their
/// options give more than one thread: with k of them side by side each run gets `threads / k` threads
/// (at least one), and a worker that finishes takes the next in `programs`' order. A run's result does
/// not depend on its threads (`tests/engine_determinism.rs`), so the results, returned in `programs`'
/// order, are those of running them one after the other; only the wall time and the peak memory (the
/// runs side by side hold their state at once) differ. The engine's windows are one cycle long and a
/// pipelined program keeps few partitions busy, so a second thread does more here, on a whole run,
/// than inside one (BENCHMARKS.md, "Engine speed against the targets").
pub fn run_each(
    programs: &[&MeshProgram],
    opts: &(dyn Fn(&MeshProgram) -> EngineOptions + Sync),
) -> Vec<Result<EngineRun, EngineError>> {
    let threads = programs.first().map_or(1, |p| opts(p).threads.max(1));
    let side_by_side = threads.min(programs.len());
    if side_by_side <= 1 {
        return programs.iter().map(|p| run(p, &opts(p))).collect();
    }
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    let per_run = (threads / side_by_side).max(1);
    let next = AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Result<EngineRun, EngineError>>>> =
        programs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    // Each worker publishes its run's cycle on its own counter; a progress bar shows the furthest.
    let shown = programs.first().and_then(|p| opts(p).progress);
    let reached: Vec<std::sync::Arc<AtomicU64>> = (0..side_by_side).map(|_| Default::default()).collect();
    let working = AtomicUsize::new(side_by_side);
    std::thread::scope(|scope| {
        for mine in &reached {
            let (next, results, working, shown) = (&next, &results, &working, &shown);
            scope.spawn(move || {
                // Counted out even if the run panics, so that the progress thread stops.
                struct Out<'a>(&'a AtomicUsize);
                impl Drop for Out<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::Release);
                    }
                }
                let _out = Out(working);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = programs.get(i) else { break };
                    let progress = shown.as_ref().map(|_| std::sync::Arc::clone(mine));
                    let r = run(p, &EngineOptions { threads: per_run, progress, ..opts(p) });
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
            });
        }
        if let Some(shown) = &shown {
            let (reached, working) = (&reached, &working);
            scope.spawn(move || {
                while working.load(Ordering::Acquire) > 0 {
                    shown
                        .store(reached.iter().map(|r| r.load(Ordering::Relaxed)).max().unwrap_or(0), Ordering::Relaxed);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            });
        }
    });
    if let Some(shown) = &shown {
        shown.store(reached.iter().map(|r| r.load(Ordering::Relaxed)).max().unwrap_or(0), Ordering::Relaxed);
    }
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| Err(EngineError::Invariant("a run side by side did not finish".into())))
        })
        .collect()
}

/// Runs `program` with values (a functional run, `values` says where they start): the same run as
/// `run` (its `EngineRun` is identical), and the values the program's readout PEs hold at the end.
pub fn run_functional(
    program: &MeshProgram,
    opts: &EngineOptions,
    setup: std::sync::Arc<values::Setup>,
) -> Result<(EngineRun, values::Results), EngineError> {
    run_with(program, opts, Some(setup))
}

fn run_program(program: &MeshProgram, opts: &EngineOptions) -> Result<EngineRun, EngineError> {
    run_with(program, opts, None).map(|(r, _)| r)
}

/// Partitions above which a multi-threaded run frees its state on another thread (small runs free
/// theirs in microseconds).
const BACKGROUND_DROP_PARTS: usize = 16;

fn run_with(
    program: &MeshProgram,
    opts: &EngineOptions,
    setup: Option<std::sync::Arc<values::Setup>>,
) -> Result<(EngineRun, values::Results), EngineError> {
    let t0 = std::time::Instant::now();
    let shared = sim::Shared::new(program)?;
    let mut parts = build_parts(&shared, opts);
    if let Some(setup) = &setup {
        for p in parts.iter_mut() {
            p.enable_values(std::sync::Arc::clone(setup));
        }
    }
    let t1 = std::time::Instant::now();
    let cycles = sim::run_parts(&shared, &mut parts, opts.threads, opts.progress.as_deref())?;
    // The critical path ends at the last task to finish (ties: the lowest agent id).
    let critical_path = parts
        .iter()
        .filter_map(|p| p.last_finish())
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, _, path)| path)
        .unwrap_or_default();
    if std::env::var_os("WAFER_ENGINE_TIMING").is_some() {
        eprintln!("engine: setup {:.3}s, run {:.3}s", (t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64());
    }
    // Blocked tasks and unconsumed deliveries: held senders first, then in mesh order.
    let mut blocked: Vec<(u32, Blocked)> = parts.iter().flat_map(|p| p.blocked(&shared)).collect();
    if !blocked.is_empty() {
        blocked.sort_by_key(|(id, b)| (!b.held, *id));
        let n = blocked.len() as u64;
        blocked.truncate(DEADLOCK_LISTED);
        return Err(EngineError::Deadlock(DeadlockReport {
            cycle: cycles,
            blocked_agents: n,
            blocked: blocked.into_iter().map(|(_, b)| b).collect(),
        }));
    }
    if let Some(msg) = parts.iter().find_map(|p| p.unconsumed(&shared)) {
        return Err(EngineError::Program(msg));
    }
    let n_ports = program.ports.len();
    let mut totals = Totals { io_bytes: vec![0; n_ports], io_busy: vec![0; n_ports], ..Totals::default() };
    let mut hop_unit_cycles = 0u128;
    let n_agents = program.mesh.pes() as usize + program.ports.len();
    let mut agents = vec![AgentStats::default(); n_agents];
    for p in &parts {
        let t = &p.totals;
        totals.events += t.events;
        totals.flops += t.flops;
        totals.wavelets_sent += t.wavelets_sent;
        totals.wavelets_delivered += t.wavelets_delivered;
        totals.wavelet_hops += t.wavelet_hops;
        totals.relays += t.relays;
        for (a, b) in totals.io_bytes.iter_mut().zip(&t.io_bytes) {
            *a += b;
        }
        for (a, b) in totals.io_busy.iter_mut().zip(&t.io_busy) {
            *a += b;
        }
        hop_unit_cycles += p.hop_unit_cycles;
        for (id, s) in p.agent_stats() {
            agents[id as usize] = s;
        }
    }
    if program.graph_flops != 0 && totals.flops != program.graph_flops {
        return Err(EngineError::Invariant(format!(
            "FLOPs executed {} != FLOPs of the graph {}",
            totals.flops, program.graph_flops
        )));
    }
    for (p, port) in program.ports.iter().enumerate() {
        if totals.io_bytes[p] != port.planned_bytes {
            return Err(EngineError::Invariant(format!(
                "port {} carried {} bytes, the plan says {}",
                port.name, totals.io_bytes[p], port.planned_bytes
            )));
        }
    }
    let mesh_links = 4.0 * program.mesh.pes() as f64;
    let fabric_utilization =
        if cycles == 0 { 0.0 } else { hop_unit_cycles as f64 / (UNIT as f64 * mesh_links * cycles as f64) };
    let recording = opts.trace.as_ref().map(|_| collect_recording(&mut parts, n_agents, cycles));
    let results = parts.iter().flat_map(|p| p.value_results(&shared)).collect();
    let run =
        EngineRun { cycles, totals, agents, fabric_utilization, critical_path, recording, fidelity: opts.fidelity };
    // Freeing a full wafer's state (a gigabyte in millions of allocations: 3% of a llama-3-8b decode's
    // instructions, callgrind) is work nobody waits for: where the run was given more than one thread,
    // another one does it while the caller goes on with the report.
    if opts.threads > 1 && parts.len() > BACKGROUND_DROP_PARTS {
        // Where no thread can be started, the closure (and the partitions with it) is dropped here.
        let _ = std::thread::Builder::new().name("wafer-free".into()).spawn(move || drop(parts));
    }
    Ok((run, results))
}

/// Builds every partition, on `opts.threads` threads (each partition is built independently, so the
/// result does not depend on how many).
fn build_parts(shared: &sim::Shared, opts: &EngineOptions) -> Vec<sim::Part> {
    let n = shared.n_parts();
    let threads = opts.threads.clamp(1, n.max(1) as usize);
    if threads == 1 {
        return (0..n).map(|p| sim::Part::new(shared, p, opts.trace.as_ref())).collect();
    }
    let mut slots: Vec<Option<sim::Part>> = (0..n).map(|_| None).collect();
    std::thread::scope(|scope| {
        for (w, chunk) in slots.chunks_mut((n as usize).div_ceil(threads)).enumerate() {
            let first = w * (n as usize).div_ceil(threads);
            scope.spawn(move || {
                for (i, slot) in chunk.iter_mut().enumerate() {
                    *slot = Some(sim::Part::new(shared, (first + i) as u32, opts.trace.as_ref()));
                }
            });
        }
    });
    slots.into_iter().flatten().collect()
}

/// Brings every partition's bins to the widest window and lays them out in global agent order.
fn collect_recording(parts: &mut [sim::Part], n_agents: usize, cycles: u64) -> record::Recording {
    let window = parts.iter().filter_map(|p| p.rec.as_ref().map(|r| r.window)).max().unwrap_or(1);
    let mut bins = vec![Vec::new(); n_agents];
    let mut spans = Vec::new();
    for p in parts.iter_mut() {
        let ids: Vec<u32> = p.agent_ids().collect();
        if let Some(rec) = p.rec.as_mut() {
            rec.widen_to(window);
            for (id, b) in ids.iter().zip(rec.bins.iter()) {
                bins[*id as usize] = b.to_vec();
            }
            spans.extend(rec.spans.iter().copied());
        }
    }
    spans.sort_by_key(|s| (s.agent, s.start, s.task));
    let windows = (cycles / window + 1) as u32;
    record::Recording { window_cycles: window, windows, bins, spans }
}
