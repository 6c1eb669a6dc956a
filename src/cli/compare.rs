//! `wafer compare`: the same graph on the wafer engine and on the GPU model, side by side.

use std::time::Instant;

use clap::Args;

use super::compile::parse_mode;
use super::run::{emulate, prepare, report, EngineFlags, Prepared, RunCmd};
use super::{emit, to_json, WorkloadFlags};
use waferscale::compile::Mode;
use waferscale::gpu::{self, GpuOptions};
use waferscale::hw::{load_with_overrides, GpuSystem};
use waferscale::report::{Comparison, RunReport};
use waferscale::Error;

#[derive(Args)]
pub struct CompareCmd {
    /// A shipped model name, a config.json path, or a single op (gemm:MxNxK, gemv:KxN, ...).
    pub model: String,
    /// The wafer system: wse2, wse3, cs2, cs3 or a TOML path.
    #[arg(long, default_value = "cs2")]
    pub hw: String,
    /// Override a value of the wafer description (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Use only a WxH rectangle of the wafer's mesh.
    #[arg(long, value_name = "WxH")]
    pub mesh: Option<String>,
    /// pipelined or weight-streaming on the wafer [default: pipelined when the model fits].
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<Mode>,
    /// Wafers (multi-wafer pipelined inference).
    #[arg(long, default_value_t = 1)]
    pub wafers: u32,
    /// The GPU system: a100, h100, h200, dgx-h100, h100-superpod-256, ... or a TOML path.
    #[arg(long, default_value = "h100")]
    pub vs: String,
    /// GPUs on the GPU side [default: 1, or what the cluster description holds with --vs-tp/--vs-dp].
    #[arg(long)]
    pub vs_gpus: Option<u64>,
    /// Tensor-parallel GPUs per layer on the GPU side [default: min(GPUs, 8)].
    #[arg(long)]
    pub vs_tp: Option<u64>,
    /// Pipeline stages on the GPU side [default: 1].
    #[arg(long)]
    pub vs_pp: Option<u64>,
    #[command(flatten)]
    pub workload: WorkloadFlags,
    #[command(flatten)]
    pub engine: EngineFlags,
    /// Print both reports and the comparison as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Write the output to FILE instead of standard output.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<String>,
}

/// Compares and returns the comparison (used by the demo too).
pub fn compare(cmd: &CompareCmd, quiet: bool) -> Result<Comparison, Error> {
    let started = Instant::now();
    let run_cmd = RunCmd {
        model: cmd.model.clone(),
        hw: Some(cmd.hw.clone()),
        set: cmd.set.clone(),
        mesh: cmd.mesh.clone(),
        mode: cmd.mode,
        wafers: cmd.wafers,
        micro_batches: None,
        workload: cmd.workload.clone(),
        engine: cmd.engine,
        json: quiet,
        output: None,
        trace: None,
        trace_window: None,
        trace_budget: None,
        func: Default::default(),
    };
    let p = prepare(&run_cmd)?;
    cmd.engine.set_memory_limit();
    let (fidelity, threads) = (cmd.engine.fidelity(), cmd.engine.threads());
    let em = emulate(&p, fidelity, threads, quiet, None)?;
    let wafer = report(&p, &em, threads, started.elapsed())?;
    against_gpu(&p, wafer, &cmd.vs, cmd.vs_gpus, cmd.vs_tp, cmd.vs_pp)
}

/// Runs the same graph (model and workload) as `p` on the GPU system `vs` and puts the wafer's report
/// beside it (used by the demo too).
pub fn against_gpu(
    p: &Prepared,
    wafer: RunReport,
    vs: &str,
    gpus: Option<u64>,
    tp: Option<u64>,
    pp: Option<u64>,
) -> Result<Comparison, Error> {
    let sys = GpuSystem::from_doc(&load_with_overrides(vs, &[])?)?;
    let tp = tp.or_else(|| gpus.map(|g| g.min(8)));
    let opts = GpuOptions { gpus, tp, pp, ..Default::default() };
    let gpu = gpu::run(&p.model, &p.graph.workload, &sys, &opts)?;
    let mut notes = Vec::new();
    if wafer.flops != gpu.flops {
        notes.push(format!(
            "FLOPs differ ({} on the wafer, {} on the GPUs): {}",
            wafer.flops,
            gpu.flops,
            "the wafer counts what runs on its PEs (weight streaming leaves the optimizer to MemoryX); \
             the GPU model counts its kernels' FLOPs (causal attention skips masked blocks)"
        ));
    }
    Ok(Comparison::new(wafer, gpu, notes))
}

pub fn run(cmd: CompareCmd) -> Result<(), Error> {
    if let Some(path) = &cmd.output {
        super::run::check_output_path(path)?;
    }
    let c = compare(&cmd, cmd.json)?;
    let text = if cmd.json { to_json(&c)? } else { c.to_text() };
    emit(&text, cmd.output.as_deref())
}
