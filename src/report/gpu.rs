//! GPU-specific parts of a run report: bytes per memory level, the per-kernel table, the footprint.

use serde::Serialize;

/// Bytes moved at one level of the memory hierarchy over the step.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LevelBytes {
    /// `hbm`, `l2`, `smem`, `nvlink`, `network`.
    pub level: String,
    pub bytes: u64,
}

/// One kernel of the lowered graph.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct KernelRow {
    pub name: String,
    /// The graph ops fused into it.
    pub ops: Vec<String>,
    /// Total over the `count` launches (per GPU; kernels run in parallel on every GPU of a stage).
    pub seconds: f64,
    /// Graph FLOPs of the `count` launches on one GPU.
    pub flops: u64,
    pub achieved_flops_per_s: f64,
    /// `compute`, `smem`, `hbm`, `l2`, `latency`, `launch` or `network`.
    pub bound: String,
    /// Count of identical kernels folded into this row (one per layer, say).
    pub count: u64,
    /// `gemm`, `flash_fwd`, `flash_bwd`, `memory`, `allreduce`, ...
    pub kind: String,
    /// The problem size (`2048x4608x12288` for a GEMM: M x N x K).
    pub shape: String,
    /// The configuration the model chose (`tile 128x256x64, 16 waves of 132 CTAs (1/SM)`).
    pub config: String,
    /// The SM clock the kernel ran at (boost, or the power limit's sustained clock).
    pub clock_hz: f64,
}

/// Memory needed per GPU (the fullest GPU) against its capacity.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MemoryFootprint {
    pub weights_bytes: u64,
    pub gradients_bytes: u64,
    pub optimizer_bytes: u64,
    pub activations_bytes: u64,
    pub kv_cache_bytes: u64,
    pub total_bytes: u64,
    pub capacity_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GpuDetails {
    pub levels: Vec<LevelBytes>,
    pub kernels: Vec<KernelRow>,
    pub memory: MemoryFootprint,
}
