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
