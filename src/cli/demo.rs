//! `wafer demo`: the main job on the embedded default.

use super::emit;
use waferscale::graph;
use waferscale::model::{self, Phase, WorkloadArgs};
use waferscale::report::GraphSummary;
use waferscale::Error;

/// The main job on the embedded default. Until the compiler and engine exist, it runs the stages that
/// do and says which are still to come; it prints no number that was not computed.
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
    s.push_str(
        "\nStill to come (not yet built, so no numbers are shown for them):\n\
         [3/5] wafer compiler: placement, tiling, routing on colors, SRAM allocation, perimeter IO (wafer compile)\n\
         [4/5] wafer engine: cycle-approximate emulation of the mesh program (wafer run)\n\
         [5/5] GPU model and the side-by-side comparison, traces and heatmaps (wafer gpu, wafer compare)\n\
         \nTry next:\n  \
         wafer models\n  \
         wafer graph llama-3-8b --phase decode --context 4096\n  \
         wafer graph gpt2-small --json\n  \
         wafer graph gemm:8192x8192x8192 --dtype bf16\n",
    );
    emit(&s, None)
}
