//! The run report: one schema for the wafer engine (`wafer run`) and the GPU model (`wafer gpu`),
//! so that `wafer compare` puts identical fields side by side.
//!
//! Everything outside `host` depends only on the inputs (model, workload, hardware, options), never on
//! the machine the emulator ran on or its thread count: reports are compared byte for byte.

use std::collections::BTreeMap;

use serde::Serialize;

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
    /// Notes a reader needs (assumptions taken, fallbacks used), in a stable order.
    pub notes: Vec<String>,
    /// GPU model only: bytes per memory level, kernels, footprint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuDetails>,
    pub host: HostInfo,
}

impl RunReport {
    /// The human-readable report: headline numbers, utilisation, the critical path's shares, the
    /// busiest regions or kernels, and counters.
    pub fn to_text(&self) -> String {
        use super::fmt::{human, thousands};
        use std::fmt::Write as _;
        let mut s = String::new();
        let w = &self.workload;
        let _ = writeln!(s, "machine     {} ({}): {}", self.machine.name, self.machine.kind, self.machine.description);
        let _ = writeln!(
            s,
            "model       {}  {} batch {} seq {} ({} tokens), {}",
            self.model,
            w.phase,
            w.batch,
            w.seq,
            thousands(w.tokens),
            w.dtype
        );
        let _ = writeln!(s, "mode        {}, fidelity {}", self.mode, self.fidelity);
        let _ = writeln!(s, "cycles      {:>22}  {:.6} s", thousands(self.cycles), self.seconds);
        let _ = writeln!(s, "throughput  {:>22}  tokens/s", format!("{:.1}", self.tokens_per_s));
        let _ = writeln!(
            s,
            "flops       {:>22}  {} achieved, {:.2}% of peak {}",
            thousands(self.flops),
            human(self.achieved_flops_per_s, "FLOP/s"),
            100.0 * self.peak_fraction,
            human(self.machine.peak_flops_per_s, "FLOP/s")
        );
        let u = &self.utilization;
        let _ = writeln!(
            s,
            "utilization compute {:.1}%  fabric {:.1}%  io {:.1}%  memory {:.1}%",
            100.0 * u.compute,
            100.0 * u.fabric,
            100.0 * u.io,
            100.0 * u.memory
        );
        let shares: Vec<String> = self
            .bottleneck
            .shares
            .iter()
            .filter(|(_, v)| **v > 0.0)
            .map(|(k, v)| format!("{k} {:.1}%", 100.0 * v))
            .collect();
        let _ = writeln!(s, "bottleneck  {} (critical path: {})", self.bottleneck.dominant, shares.join(", "));
        if !self.breakdown.is_empty() {
            let _ = writeln!(
                s,
                "\nbreakdown (top 12 by busy cycles)      units        flops   busy%  stall%   idle%  bound"
            );
            let mut rows: Vec<&OpRow> = self.breakdown.iter().collect();
            rows.sort_by(|a, b| b.cycles_busy.cmp(&a.cycles_busy).then(a.name.cmp(&b.name)));
            for r in rows.iter().take(12) {
                let total = (r.cycles_busy + r.cycles_stalled + r.cycles_idle).max(1) as f64;
                let _ = writeln!(
                    s,
                    "  {:<34} {:>8} {:>12} {:>6.1}  {:>6.1}  {:>6.1}  {}",
                    r.name,
                    r.units,
                    human(r.flops as f64, ""),
                    100.0 * r.cycles_busy as f64 / total,
                    100.0 * r.cycles_stalled as f64 / total,
                    100.0 * r.cycles_idle as f64 / total,
                    r.bound
                );
            }
            if rows.len() > 12 {
                let _ = writeln!(s, "  ... {} more", rows.len() - 12);
            }
        }
        let _ = writeln!(s, "\ncounters");
        for (k, v) in &self.counters {
            let _ = writeln!(s, "  {k:<20}{:>24}", thousands(*v));
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}
