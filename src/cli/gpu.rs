//! `wafer gpu`: run a model (or a single op) on the GPU model and print the run report.

use clap::{Args, ValueEnum};

use super::{emit, WorkloadFlags};
use waferscale::gpu::attention::FlashVariant;
use waferscale::gpu::{self, AttentionImpl, ClockMode, GpuOptions};
use waferscale::graph::GraphError;
use waferscale::hw::{load_with_overrides, GpuSystem};
use waferscale::model;
use waferscale::Error;

/// The SM clock a step is timed at.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ClockFlag {
    /// Boost for a step that fits in the boost window (sm.boost_window_s), else sustained.
    Auto,
    /// The boost clock (sm.clock_hz): a short burst on a rested GPU.
    Boost,
    /// The power limit's clock (sm.sustained_clock_hz): a GPU under load for longer than the window.
    Sustained,
}

/// How attention runs.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AttentionFlag {
    /// Fused, with the architecture's FlashAttention generation (3 on Hopper, 2 on Ampere).
    Fused,
    /// FlashAttention-2 (mma.sync; softmax serialized with the matmuls).
    Flash2,
    /// FlashAttention-3 (Hopper only: wgmma, softmax overlapped).
    Flash3,
    /// Batched GEMMs and a softmax kernel that writes the score matrix.
    Unfused,
}

#[derive(Args)]
pub struct GpuCmd {
    /// A shipped model name (gpt2-small, llama-3-8b, gpt-tiny), a config.json path,
    /// or a single op: gemm:MxNxK, gemv:KxN, allreduce:BYTES, elementwise:N.
    pub model: String,
    #[command(flatten)]
    pub workload: WorkloadFlags,
    /// GPU or GPU cluster: a100, h100, h200, dgx-a100, dgx-h100, dgx-h200, h100-superpod-256,
    /// h100-superpod-1024, or a path to a TOML description.
    #[arg(long, default_value = "h100")]
    pub hw: String,
    /// Override a hardware value: --set l2.bytes=62914560 (repeatable; the key must exist).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// GPUs in total [default: tp x pp x dp].
    #[arg(long)]
    pub gpus: Option<u64>,
    /// Tensor-parallel GPUs per layer (Megatron-style) [default: 1].
    #[arg(long)]
    pub tp: Option<u64>,
    /// Pipeline stages (1F1B) [default: 1].
    #[arg(long)]
    pub pp: Option<u64>,
    /// Data-parallel replicas [default: gpus / (tp x pp)].
    #[arg(long)]
    pub dp: Option<u64>,
    /// Micro-batches per replica and step [default: batch / dp with pipeline stages, else 1].
    #[arg(long)]
    pub microbatches: Option<u64>,
    /// ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also weights, over data parallelism.
    #[arg(long)]
    pub zero: Option<u8>,
    /// Attention implementation [default: fused].
    #[arg(long, value_enum)]
    pub attention: Option<AttentionFlag>,
    /// Replay the step as a captured CUDA graph (GPU-side launch gap only) instead of eager launches.
    #[arg(long)]
    pub cuda_graphs: bool,
    /// SM clock: boost for a short step, the power limit's sustained clock for one longer than the
    /// boost window (auto); or either for the whole step [default: auto].
    #[arg(long, value_enum)]
    pub clock: Option<ClockFlag>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Write the output to FILE instead of standard output.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<String>,
}

pub fn run(cmd: GpuCmd) -> Result<(), Error> {
    let model = model::load(&cmd.model)?;
    let workload = cmd.workload.args()?.resolve(&model)?;
    let doc = load_with_overrides(&cmd.hw, &cmd.sets)?;
    let sys = GpuSystem::from_doc(&doc)?;
    let attention = cmd.attention.and_then(|a| match a {
        AttentionFlag::Fused => None,
        AttentionFlag::Flash2 => Some(AttentionImpl::Fused(FlashVariant::Fa2)),
        AttentionFlag::Flash3 => Some(AttentionImpl::Fused(FlashVariant::Fa3)),
        AttentionFlag::Unfused => Some(AttentionImpl::Unfused),
    });
    let opts = GpuOptions {
        gpus: cmd.gpus,
        tp: cmd.tp,
        pp: cmd.pp,
        dp: cmd.dp,
        microbatches: cmd.microbatches,
        zero: cmd.zero,
        attention,
        cuda_graphs: cmd.cuda_graphs,
        clock: match cmd.clock {
            None | Some(ClockFlag::Auto) => ClockMode::Auto,
            Some(ClockFlag::Boost) => ClockMode::Boost,
            Some(ClockFlag::Sustained) => ClockMode::Sustained,
        },
    };
    let report = gpu::run(&model, &workload, &sys, &opts)?;
    let text = if cmd.json {
        let mut s = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Graph(GraphError::Internal(format!("cannot serialise the report: {e}"))))?;
        s.push('\n');
        s
    } else {
        report.to_text()
    };
    emit(&text, cmd.output.as_deref())
}
