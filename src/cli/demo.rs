//! `wafer demo`: the main job on the embedded default.

use super::emit;
use waferscale::gpu::{self, GpuOptions};
use waferscale::graph;
use waferscale::hw::{load_with_overrides, GpuSystem};
use waferscale::model::{self, Phase, WorkloadArgs};
use waferscale::report::fmt::{duration, human, percent};
use waferscale::report::GraphSummary;
use waferscale::Error;

/// The main job on the embedded default. Until the compiler and engine exist, it runs the stages that
/// do (the graph, and the GPU model on the same graph) and says which are still to come; it prints
/// no number that was not computed.
pub fn run() -> Result<(), Error> {
    let model = model::load("gpt2-small")?;
    let args = WorkloadArgs { phase: Some(Phase::Train), batch: Some(8), seq: Some(1024), ..Default::default() };
    let workload = args.resolve(&model)?;
    let started = std::time::Instant::now();
    let g = graph::build(&model, &workload)?;
    let elapsed = started.elapsed();
    let mut s = String::new();
    s.push_str("waferscale demo: gpt2-small, one training step (batch 8 x seq 1024, fp16, Adam)\n\n");
    s.push_str("[1/5] model frontend  done: models/gpt2-small.json parsed\n");
    s.push_str(&format!(
        "[2/5] dataflow graph  done: {} ops, verified, built in {:.0} ms\n\n",
        g.n_ops(),
        elapsed.as_secs_f64() * 1e3
    ));
    s.push_str(&GraphSummary::new(&model, &g).to_text());
    // The same graph on the GPU model: one H100.
    let sys = GpuSystem::from_doc(&load_with_overrides("h100", &[])?)?;
    let r = gpu::run(&model, &workload, &sys, &GpuOptions::default())?;
    s.push_str(&format!(
        "\n[3/5] GPU model      done: the same graph on one {}: step {}, {}/s ({} of peak), bound by {}\n\
         \x20     (wafer gpu gpt2-small --batch 8 --seq 1024 for the kernels, bytes per level and memory)\n",
        sys.gpu.description,
        duration(r.seconds),
        human(r.achieved_flops_per_s, "FLOP"),
        percent(r.peak_fraction),
        r.bottleneck.dominant
    ));
    s.push_str(
        "\nStill to come (not yet built, so no numbers are shown for them):\n\
         [4/5] wafer compiler: placement, tiling, routing on colors, SRAM allocation, perimeter IO (wafer compile)\n\
         [5/5] wafer engine: cycle-approximate emulation of the mesh program (wafer run), then the side-by-side\n\
         \x20     comparison with the GPU model (wafer compare), traces and heatmaps\n\
         \nTry next:\n  \
         wafer models\n  \
         wafer graph llama-3-8b --phase decode --context 4096\n  \
         wafer gpu gemm:8192x8192x8192 --hw h100 --dtype bf16\n  \
         wafer gpu llama-2-70b --hw dgx-h100 --gpus 8 --tp 8 --phase prefill --batch 8 --seq 4096 --dtype bf16\n",
    );
    emit(&s, None)
}
