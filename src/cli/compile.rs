//! `wafer compile`: compile a model for a wafer and print (or save) the plan.

use clap::Args;

use super::{emit, HwFlags, WorkloadFlags};
use waferscale::compile::{self, CompileOptions, Dump, Mode, PlanFile, PlanInputs, PLAN_VERSION};
use waferscale::model;
use waferscale::Error;

#[derive(Args)]
pub struct CompileCmd {
    /// A shipped model name (gpt2-small, llama-3-8b, gpt-tiny), a config.json path,
    /// or a single op: gemm:MxNxK, gemv:KxN, allreduce:BYTES, elementwise:N.
    pub model: String,
    #[command(flatten)]
    pub hw: HwFlags,
    /// pipelined (every layer resident) or weight-streaming (layers in turn, weights from MemoryX)
    /// [default: pipelined when the model fits, weight streaming otherwise].
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<Mode>,
    /// Wafers for multi-wafer pipelined inference (the layers split across them).
    #[arg(long, default_value_t = 1)]
    pub wafers: u32,
    /// Training: run the step as M micro-batches [default: one batch when it fits, else the fewest that fit].
    #[arg(long, value_name = "M")]
    pub micro_batches: Option<u32>,
    #[command(flatten)]
    pub workload: WorkloadFlags,
    /// Print the plan summary as one JSON object.
    #[arg(long, conflicts_with = "dump_after")]
    pub json: bool,
    /// Print a compile stage: place, route, alloc or lower (the printers the snapshots use).
    #[arg(long, value_parser = parse_dump)]
    pub dump_after: Option<Dump>,
    /// Run the verifier (always on in debug builds).
    #[arg(long)]
    pub verify: bool,
    /// Save the plan to FILE (JSON: the compile inputs and the summary; `wafer plan FILE` recompiles it).
    #[arg(short = 'o', long, value_name = "PLAN")]
    pub output: Option<String>,
}

pub(crate) fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::parse(s).ok_or_else(|| format!("`{s}` is not a mode; expected pipelined or weight-streaming"))
}

pub(crate) fn parse_dump(s: &str) -> Result<Dump, String> {
    Dump::parse(s).ok_or_else(|| format!("`{s}` is not a compile stage; expected place, route, alloc or lower"))
}

/// Map width in characters: the terminal's (`COLUMNS`) less the border, at most 96 by default.
pub(crate) fn map_cols() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .map_or(96, |c| c.saturating_sub(4).clamp(16, 400))
}

pub fn run(cmd: CompileCmd) -> Result<(), Error> {
    let m = model::load(&cmd.model)?;
    let workload = cmd.workload.args()?.resolve(&m)?;
    let (doc, hw) = cmd.hw.load()?;
    let opts = CompileOptions {
        mode: cmd.mode,
        wafers: cmd.wafers,
        verify: cmd.verify || cfg!(debug_assertions),
        micro_batches: cmd.micro_batches,
        layer_iters: None,
    };
    let (_, c) = compile::compile_model(&m, &workload, &hw, &opts)?;
    super::warn_notes(&c.plan.notes);
    if let Some(path) = &cmd.output {
        let inputs = PlanInputs::new(&cmd.model, &m, &workload, &doc, &cmd.hw.set, cmd.hw.mesh_dims()?, &opts)?;
        let file = PlanFile { version: PLAN_VERSION, inputs, summary: c.plan.clone() };
        emit(&file.to_json(), Some(path))?;
    }
    let text = if cmd.json {
        super::to_json(&c.plan)?
    } else if let Some(d) = cmd.dump_after {
        d.print(&c.plan, &c.programs)
    } else {
        c.plan.to_text(map_cols())
    };
    emit(&text, None)
}
