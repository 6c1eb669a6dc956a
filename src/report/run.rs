//! The run report: one schema for the wafer engine (`wafer run`) and the GPU model (`wafer gpu`),
//! so that `wafer compare` puts identical fields side by side.
//!
//! Everything outside `host` depends only on the inputs (model, workload, hardware, options), never on
//! the machine the emulator ran on or its thread count: reports are compared byte for byte.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::fmt::{duration, human, percent, thousands};

/// A rate with a decimal prefix, two decimals below a thousand.
fn rate(v: f64) -> String {
    if v.abs() < 1e3 {
        format!("{v:.2}")
    } else {
        human(v, "")
    }
}
use super::{GpuDetails, WorkloadSummary};

/// The machine a report is about.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MachineSummary {
    /// Hardware description name (`cs2`, `h100`).
    pub name: String,
    /// `wafer` or `gpu`.
    pub kind: String,
    /// Human description (`CS-2, 757 x 996 PEs at 850 MHz`).
    pub description: String,
    /// Units working together: PEs on a wafer, or GPUs.
    pub units: u64,
    /// Wafers or GPUs in the system.
    pub devices: u64,
    pub clock_hz: f64,
    /// Dense peak FLOP/s in the workload's dtype.
    pub peak_flops_per_s: f64,
}

/// Busy fractions in [0, 1], averaged over the run and over the units that exist.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Utilization {
    /// Compute units busy (PEs computing; GPU tensor/vector pipes).
    pub compute: f64,
    /// On-chip network: fabric links (wafer), L2/NoC traffic over its bandwidth (GPU).
    pub fabric: f64,
    /// Off-chip IO: perimeter ports (wafer), HBM (GPU).
    pub io: f64,
    /// Memory occupancy: SRAM bytes allocated over SRAM bytes (wafer), HBM footprint over capacity (GPU).
    pub memory: f64,
}

/// Which resource the run's critical path spent its time on.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Bottleneck {
    /// The largest share: `compute`, `sram`, `fabric`, `perimeter_io`, `memoryx`, `inter_wafer`,
    /// `hbm`, `l2`, `launch`, `network`.
    pub dominant: String,
    /// Share of the critical path per resource; the shares sum to 1.
    pub shares: BTreeMap<String, f64>,
}

/// One region (wafer) or kernel group (GPU) of the breakdown.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OpRow {
    /// Region or kernel name (`l3.attn.qkv`).
    pub name: String,
    /// Op kind (`linear`, `attn_scores`, ...).
    pub kind: String,
    /// Units (PEs, SMs) assigned.
    pub units: u64,
    pub flops: u64,
    /// Cycles the units spent computing, waiting on inputs or backpressure, and idle, summed over units.
    pub cycles_busy: u64,
    pub cycles_stalled: u64,
    pub cycles_idle: u64,
    /// Wall time of the op in seconds (GPU kernels; region span on the wafer).
    pub seconds: f64,
    /// What bounds it: `compute`, `fabric`, `perimeter_io`, `hbm`, `l2`, `launch`, ...
    pub bound: String,
}

/// One perimeter IO channel of a wafer run (a port's share of one edge link): what crossed it and how
/// busy it was.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct IoChannel {
    /// Channel name (`io3.1`: port 3, its channel 1).
    pub name: String,
    /// Who is on the other side: `memoryx`, `swarmx`, `host`, `wafer1`.
    pub peer: String,
    /// Bytes through it in the step, in or out.
    pub bytes: u64,
    /// Its rate: bytes per device cycle.
    pub bytes_per_cycle: f64,
    /// Cycles its link was held by trains, summed over its trains (a train paced below the channel's
    /// rate, by a slower consumer, holds it longer).
    pub cycles_busy: u64,
    /// bytes / (bytes_per_cycle x cycles): the share of its capacity the step used. `utilization.io` is
    /// the same over all channels together (their mean weighted by rate).
    pub utilization: f64,
}

/// Channels the text printer names (the busiest first); `--json` has them all under `io_channels`.
const TEXT_IO_ROWS: usize = 4;

/// Facts about the emulator's own run: never compared between runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HostInfo {
    pub wall_seconds: f64,
    pub threads: u64,
    pub peak_rss_bytes: u64,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunReport {
    pub machine: MachineSummary,
    pub model: String,
    pub workload: WorkloadSummary,
    /// `pipelined`, `weight-streaming`, `multi-wafer`, or the GPU parallelism (`tp=8 pp=1 dp=1`).
    pub mode: String,
    /// `detailed`, `fast`, or `kernel-model` (GPU).
    pub fidelity: String,
    /// Device clock cycles of one step.
    pub cycles: u64,
    pub seconds: f64,
    /// FLOPs executed (the graph's FLOPs).
    pub flops: u64,
    pub achieved_flops_per_s: f64,
    /// achieved / peak.
    pub peak_fraction: f64,
    pub tokens_per_s: f64,
    pub utilization: Utilization,
    pub bottleneck: Bottleneck,
    pub breakdown: Vec<OpRow>,
    /// Named integer counters (`wavelets`, `wavelet_hops`, `io_bytes`, `relays`, `hbm_bytes`, ...).
    pub counters: BTreeMap<String, u64>,
    /// Wafer runs: every perimeter IO channel in port order (empty for GPUs, and then not printed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub io_channels: Vec<IoChannel>,
    /// Notes a reader needs (assumptions taken, fallbacks used), in a stable order.
    pub notes: Vec<String>,
    /// GPU model only: bytes per memory level, kernels, footprint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuDetails>,
    pub host: HostInfo,
}

/// Wafer regions the text printer shows (the busiest first); `--json` has them all.
const WAFER_REGION_ROWS: usize = 12;

/// Kernel rows the text printer shows (the slowest first); `--json` has them all.
const TEXT_KERNEL_ROWS: usize = 40;

/// bytes / (bytes_per_cycle x cycles), 0 for an empty run or a channel without rate.
pub fn channel_utilization(bytes: u64, bytes_per_cycle: f64, cycles: u64) -> f64 {
    let cap = bytes_per_cycle * cycles as f64;
    if cap > 0.0 {
        bytes as f64 / cap
    } else {
        0.0
    }
}

/// The perimeter IO utilisation of a run: all channels' bytes over all channels' capacity.
pub fn io_utilization(chans: &[IoChannel], cycles: u64) -> f64 {
    let bytes: u64 = chans.iter().map(|c| c.bytes).sum();
    channel_utilization(bytes, chans.iter().map(|c| c.bytes_per_cycle).sum(), cycles)
}

impl RunReport {
    /// The IO channels section of the text: per peer, how many channels and bytes; utilisation min,
    /// overall and max; the busiest few by name.
    fn io_text(&self, s: &mut String) {
        let ch = &self.io_channels;
        let mut peers: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
        for c in ch {
            let e = peers.entry(c.peer.as_str()).or_default();
            e.0 += 1;
            e.1 += c.bytes;
        }
        let peers: Vec<String> =
            peers.iter().map(|(p, (n, b))| format!("{p} {n} ({})", human(*b as f64, "B"))).collect();
        let _ = writeln!(s, "\nio channels {}: {}", ch.len(), peers.join(", "));
        let min = ch.iter().map(|c| c.utilization).fold(f64::INFINITY, f64::min);
        let max = ch.iter().map(|c| c.utilization).fold(0.0, f64::max);
        let idle = ch.iter().filter(|c| c.bytes == 0).count();
        let _ = writeln!(
            s,
            "  utilization min {}  all {}  max {}{}",
            percent(min),
            percent(self.utilization.io),
            percent(max),
            if idle > 0 { format!("  ({idle} idle)") } else { String::new() }
        );
        let mut rows: Vec<&IoChannel> = ch.iter().collect();
        rows.sort_by(|a, b| b.utilization.total_cmp(&a.utilization).then(a.name.cmp(&b.name)));
        for c in rows.iter().take(TEXT_IO_ROWS) {
            let _ = writeln!(
                s,
                "  {:<10}{:<9}{:>12}{:>16} cycles busy{:>8}",
                c.name,
                c.peer,
                human(c.bytes as f64, "B"),
                thousands(c.cycles_busy),
                percent(c.utilization)
            );
        }
        if ch.len() > TEXT_IO_ROWS {
            let _ = writeln!(s, "  ... {} more (--json: io_channels)", ch.len() - TEXT_IO_ROWS);
        }
    }

    /// One report for programs run one after the other on the same machine (weight-streaming training:
    /// the forward phase, then the backward phase): cycles, seconds, FLOPs and counters add up;
    /// utilisation and bottleneck shares are the phases' own, weighted by their cycles; memory is the
    /// fuller phase's; region rows are prefixed with their phase (`backward/l3.attn.qkv`).
    /// `None` when there are no phases.
    pub fn in_sequence(mut all: Vec<(String, RunReport)>) -> Option<RunReport> {
        if all.len() <= 1 {
            return all.pop().map(|(_, r)| r);
        }
        let mut out = all[0].1.clone();
        let cycles: u64 = all.iter().map(|(_, r)| r.cycles).sum();
        let weight = |r: &RunReport| if cycles > 0 { r.cycles as f64 / cycles as f64 } else { 1.0 / all.len() as f64 };
        out.cycles = cycles;
        out.seconds = all.iter().map(|(_, r)| r.seconds).sum();
        out.flops = all.iter().map(|(_, r)| r.flops).sum();
        out.achieved_flops_per_s = if out.seconds > 0.0 { out.flops as f64 / out.seconds } else { 0.0 };
        out.peak_fraction = if out.machine.peak_flops_per_s > 0.0 {
            out.achieved_flops_per_s / out.machine.peak_flops_per_s
        } else {
            0.0
        };
        out.tokens_per_s = if out.seconds > 0.0 { out.workload.tokens as f64 / out.seconds } else { 0.0 };
        out.utilization = Utilization {
            compute: all.iter().map(|(_, r)| r.utilization.compute * weight(r)).sum(),
            fabric: all.iter().map(|(_, r)| r.utilization.fabric * weight(r)).sum(),
            io: all.iter().map(|(_, r)| r.utilization.io * weight(r)).sum(),
            memory: all.iter().map(|(_, r)| r.utilization.memory).fold(0.0, f64::max),
        };
        let mut shares: BTreeMap<String, f64> = BTreeMap::new();
        for (_, r) in &all {
            for (k, v) in &r.bottleneck.shares {
                *shares.entry(k.clone()).or_default() += v * weight(r);
            }
        }
        let dominant = shares
            .iter()
            .fold(None::<(&String, f64)>, |best, (k, &v)| match best {
                Some((_, bv)) if bv >= v => best,
                _ => Some((k, v)),
            })
            .map_or_else(String::new, |(k, _)| k.clone());
        out.bottleneck = Bottleneck { dominant, shares };
        out.breakdown = all
            .iter()
            .flat_map(|(name, r)| {
                r.breakdown.iter().map(move |row| OpRow { name: format!("{name}/{}", row.name), ..row.clone() })
            })
            .collect();
        let mut counters: BTreeMap<String, u64> = BTreeMap::new();
        for (_, r) in &all {
            for (k, v) in &r.counters {
                *counters.entry(k.clone()).or_default() += v;
            }
        }
        out.counters = counters;
        // Channels of every phase, by name (the phases run on the same wafer); the step's utilisation of
        // perimeter IO is theirs together, so that it agrees with the channel rows.
        let mut chans: Vec<IoChannel> = Vec::new();
        for (_, r) in &all {
            for c in &r.io_channels {
                match chans.iter_mut().find(|x| x.name == c.name && x.peer == c.peer) {
                    Some(x) => {
                        x.bytes += c.bytes;
                        x.cycles_busy += c.cycles_busy;
                    }
                    None => chans.push(c.clone()),
                }
            }
        }
        if !chans.is_empty() {
            for c in &mut chans {
                c.utilization = channel_utilization(c.bytes, c.bytes_per_cycle, cycles);
            }
            out.utilization.io = io_utilization(&chans, cycles);
        }
        out.io_channels = chans;
        let mut notes: Vec<String> = Vec::new();
        for (name, r) in &all {
            for n in &r.notes {
                if !notes.contains(n) {
                    notes.push(n.clone());
                }
            }
            notes.push(format!(
                "phase {name}: {} cycles ({}), bound by {}",
                thousands(r.cycles),
                duration(r.seconds),
                r.bottleneck.dominant
            ));
        }
        out.notes = notes;
        out.host.peak_rss_bytes = all.iter().map(|(_, r)| r.host.peak_rss_bytes).max().unwrap_or(0);
        Some(out)
    }

    /// The report of a training step that runs the same programs `m` times in a row (micro-batches, each
    /// from an idle wafer, so each run takes the cycles of this one): cycles, seconds, FLOPs, counters
    /// and the breakdown's cycles and FLOPs are `m` times this run's; utilisation, bottleneck shares and
    /// memory are this run's; tokens/s is the step's tokens over the step's time.
    pub fn repeated(mut self, m: u64) -> RunReport {
        if m <= 1 {
            return self;
        }
        self.cycles *= m;
        self.seconds *= m as f64;
        self.flops *= m;
        self.tokens_per_s = if self.seconds > 0.0 { self.workload.tokens as f64 / self.seconds } else { 0.0 };
        for row in &mut self.breakdown {
            row.flops *= m;
            row.cycles_busy *= m;
            row.cycles_stalled *= m;
            row.cycles_idle *= m;
            row.seconds *= m as f64;
        }
        for v in self.counters.values_mut() {
            *v *= m;
        }
        for c in &mut self.io_channels {
            c.bytes *= m;
            c.cycles_busy *= m;
        }
        self.notes.push(format!(
            "the step is {m} micro-batches in a row through the same programs, each from an idle wafer: one is \
             emulated (the engine is deterministic, so every one takes its cycles) and its counts are multiplied \
             by {m}"
        ));
        self
    }

    /// The human-readable report: what `wafer run` and `wafer gpu` print without `--json`, and what
    /// snapshots hold. The `host` section is left out, so the text depends only on the inputs.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let w = &self.workload;
        let _ = writeln!(s, "machine     {} ({}): {}", m.name, m.kind, m.description);
        let _ = writeln!(s, "model       {}", self.model);
        let shape = match w.phase.as_str() {
            "decode" => format!("batch {} x 1 new token, KV cache {} tokens", w.batch, w.context),
            _ if self.model.contains(':') => "one op".to_string(),
            _ => format!("batch {} x seq {} = {} tokens", w.batch, w.seq, thousands(w.tokens)),
        };
        let mut extras = String::new();
        if w.recompute {
            extras.push_str(", activation recompute");
        }
        if w.sparsity > 0.0 {
            let _ = write!(extras, ", weight sparsity {}", w.sparsity);
        }
        let phase = if self.model.contains(':') { "op" } else { w.phase.as_str() };
        let _ = writeln!(s, "workload    {phase}: {shape}, {}{extras}", w.dtype);
        let _ = writeln!(s, "mode        {} ({})", self.mode, self.fidelity);
        let _ = writeln!(s, "step        {}  ({} cycles)", duration(self.seconds), thousands(self.cycles));
        let _ = writeln!(
            s,
            "flops       {}  achieved {}/s = {} of peak {}/s",
            human(self.flops as f64, "FLOP"),
            human(self.achieved_flops_per_s, "FLOP"),
            percent(self.peak_fraction),
            human(m.peak_flops_per_s, "FLOP")
        );
        let _ = writeln!(s, "throughput  {} tokens/s", rate(self.tokens_per_s));
        let u = &self.utilization;
        let _ = writeln!(
            s,
            "utilization compute {}  fabric {}  io {}  memory {}",
            percent(u.compute),
            percent(u.fabric),
            percent(u.io),
            percent(u.memory)
        );
        let mut shares: Vec<(&String, &f64)> = self.bottleneck.shares.iter().collect();
        shares.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
        let list: Vec<String> = shares.iter().map(|(k, v)| format!("{k} {}", percent(**v))).collect();
        let _ = writeln!(s, "bottleneck  {} ({})", self.bottleneck.dominant, list.join(", "));
        if !self.breakdown.is_empty() && m.kind == "wafer" {
            // Regions: the busiest dozen, with where their PEs' cycles went.
            let _ = writeln!(
                s,
                "\nregions (busiest {WAFER_REGION_ROWS} of {}){:>10}{:>14}{:>7}{:>7}{:>7}  bound",
                self.breakdown.len(),
                "PEs",
                "flops",
                "busy",
                "stall",
                "idle"
            );
            let mut rows: Vec<&OpRow> = self.breakdown.iter().collect();
            rows.sort_by(|a, b| b.cycles_busy.cmp(&a.cycles_busy).then(a.name.cmp(&b.name)));
            for r in rows.iter().take(WAFER_REGION_ROWS) {
                let total = (r.cycles_busy + r.cycles_stalled + r.cycles_idle).max(1) as f64;
                let _ = writeln!(
                    s,
                    "  {:<32}{:>8}{:>14}{:>7}{:>7}{:>7}  {}",
                    r.name,
                    thousands(r.units),
                    human(r.flops as f64, "FLOP"),
                    percent(r.cycles_busy as f64 / total),
                    percent(r.cycles_stalled as f64 / total),
                    percent(r.cycles_idle as f64 / total),
                    r.bound
                );
            }
        } else if !self.breakdown.is_empty() {
            let _ = writeln!(s, "\nbreakdown{:<22}{:>12}{:>8}{:>16}  bound", "", "time", "share", "flops");
            let total: f64 = self.breakdown.iter().map(|r| r.seconds).sum();
            for r in &self.breakdown {
                let share = if total > 0.0 { r.seconds / total } else { 0.0 };
                let _ = writeln!(
                    s,
                    "  {:<29}{:>12}{:>8}{:>16}  {}",
                    r.name,
                    duration(r.seconds),
                    percent(share),
                    human(r.flops as f64, "FLOP"),
                    r.bound
                );
            }
        }
        if let Some(g) = &self.gpu {
            let mem = &g.memory;
            let _ = writeln!(s, "\nmemory per GPU (the fullest)");
            for (name, v) in [
                ("weights", mem.weights_bytes),
                ("gradients", mem.gradients_bytes),
                ("optimizer state", mem.optimizer_bytes),
                ("activations", mem.activations_bytes),
                ("kv cache", mem.kv_cache_bytes),
            ] {
                if v > 0 {
                    let _ = writeln!(s, "  {name:<18}{:>16}", human(v as f64, "B"));
                }
            }
            let frac = if mem.capacity_bytes > 0 { mem.total_bytes as f64 / mem.capacity_bytes as f64 } else { 0.0 };
            let _ = writeln!(
                s,
                "  {:<18}{:>16}  of {} ({})",
                "total",
                human(mem.total_bytes as f64, "B"),
                human(mem.capacity_bytes as f64, "B"),
                percent(frac)
            );
            let _ = writeln!(s, "\nbytes moved (all GPUs)");
            for l in &g.levels {
                let _ = writeln!(s, "  {:<18}{:>16}", l.level, human(l.bytes as f64, "B"));
            }
            let mut rows: Vec<&super::KernelRow> = g.kernels.iter().collect();
            rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
            let _ = writeln!(s, "\nkernels per GPU and step ({} distinct, slowest first)", g.kernels.len());
            let _ = writeln!(
                s,
                "  {:<34}{:>6}  {:<10}{:>12}{:>12}{:>10}  {:<8} config",
                "kernel", "count", "kind", "time", "FLOP/s", "clock", "bound"
            );
            for r in rows.iter().take(TEXT_KERNEL_ROWS) {
                let _ = writeln!(
                    s,
                    "  {:<34}{:>6}  {:<10}{:>12}{:>12}{:>10}  {:<8} {} [{}]",
                    r.name,
                    r.count,
                    r.kind,
                    duration(r.seconds),
                    rate(r.achieved_flops_per_s),
                    human(r.clock_hz, "Hz"),
                    r.bound,
                    r.shape,
                    r.config
                );
            }
            if rows.len() > TEXT_KERNEL_ROWS {
                let _ = writeln!(s, "  ... {} more (--json lists every kernel)", rows.len() - TEXT_KERNEL_ROWS);
            }
        }
        if !self.io_channels.is_empty() {
            self.io_text(&mut s);
        }
        if !self.counters.is_empty() {
            let _ = writeln!(s, "\ncounters");
            for (k, v) in &self.counters {
                let _ = writeln!(s, "  {k:<28}{:>26}", thousands(*v));
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\nnotes");
            for n in &self.notes {
                let _ = writeln!(s, "  - {n}");
            }
        }
        s
    }
}
