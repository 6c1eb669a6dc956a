//! `wafer demo`: the main job on the embedded default, every stage of the pipeline in one command.
//!
//! gpt2-small is compiled for a CS-2 (the WSE-2 wafer with its perimeter IO), emulated cycle by cycle
//! on the whole wafer, run on the H100 model as the very same graph, compared side by side; the trace
//! of the emulation is written with its heatmap. Every number printed is computed by this run.

use std::time::{Duration, Instant};

use clap::Args;

use super::compare::against_gpu;
use super::run::{emulate, prepare, report, write_traces, EngineFlags, FidelityArg, RunCmd};
use super::{emit, WorkloadFlags};
use waferscale::model::Phase;
use waferscale::report::fmt::{duration, human, percent, thousands};
use waferscale::report::GraphSummary;
use waferscale::trace::{self, heatmap, TraceOptions, View};
use waferscale::Error;

/// Trace budget of the demo: fine enough for a heatmap of the full wafer, small enough to keep.
const DEMO_TRACE_BYTES: u64 = 32 << 20;

#[derive(Args)]
pub struct DemoCmd {
    /// The model [default: gpt2-small, the embedded default].
    #[arg(long, default_value = "gpt2-small")]
    pub model: String,
    /// The wafer system.
    #[arg(long, default_value = "cs2")]
    pub hw: String,
    /// Use only a WxH rectangle of the wafer (a reduced demo, e.g. 64x64 with --model gpt-tiny).
    #[arg(long, value_name = "WxH")]
    pub mesh: Option<String>,
    /// The GPU system the wafer is compared with.
    #[arg(long, default_value = "h100")]
    pub vs: String,
    /// Prompt tokens of the prefill the demo emulates.
    #[arg(long, default_value_t = 8)]
    pub seq: u64,
    /// Where the trace and the heatmap go.
    #[arg(long, value_name = "DIR", default_value = "traces")]
    pub out_dir: String,
    /// Engine threads [default: the cores available]. Results do not depend on it.
    #[arg(long, value_parser = super::run::parse_threads)]
    pub threads: Option<usize>,
}

fn say(s: &str) -> Result<(), Error> {
    emit(s, None)
}

pub fn run(cmd: DemoCmd) -> Result<(), Error> {
    let started = Instant::now();
    let engine = EngineFlags { fidelity: FidelityArg::Fast, threads: cmd.threads, max_memory: None };
    let threads = engine.threads();
    let run_cmd = RunCmd {
        model: cmd.model.clone(),
        hw: Some(cmd.hw.clone()),
        set: Vec::new(),
        mesh: cmd.mesh.clone(),
        mode: None,
        wafers: 1,
        micro_batches: None,
        workload: WorkloadFlags {
            phase: Some(Phase::Prefill),
            batch: Some(1),
            seq: Some(cmd.seq),
            context: None,
            dtype: None,
            sparsity: None,
            recompute: false,
            workload: None,
        },
        engine,
        json: false,
        output: None,
        trace: None,
        trace_window: None,
        trace_budget: None,
        func: Default::default(),
    };
    let why = if cmd.model == "gpt2-small" {
        "(a full training step of gpt2-small, batch 8 x 1024, emulates in minutes rather than seconds today:\n\
         \x20`wafer run gpt2-small --phase train --batch 8 --seq 1024` runs it)\n"
    } else {
        ""
    };
    say(&format!(
        "waferscale demo: {} on {}, a prefill of {} tokens (fp16), emulated on the wafer and compared with {}\n{why}\n",
        cmd.model, cmd.hw, cmd.seq, cmd.vs
    ))?;

    // Stages 1-3: model, graph, compile.
    let t = Instant::now();
    let p = prepare(&run_cmd)?;
    let plan = &p.compiled.plan;
    let prog = p.compiled.program();
    let gs = GraphSummary::new(&p.model, &p.graph);
    say(&format!(
        "[1/5] model         {}: {} params\n\
         [2/5] graph         {} ops, {} for the step\n\
         [3/5] compile       {} on {} x {} PEs: {} regions, {} PEs working, {} of SRAM allocated ({})\n",
        gs.model,
        human(gs.params as f64, ""),
        thousands(gs.ops),
        human(gs.flops as f64, "FLOP"),
        plan.mode,
        prog.mesh.width,
        prog.mesh.height,
        prog.regions.len(),
        thousands(prog.tiles.iter().map(|t| t.rect.pes()).sum::<u64>()),
        human(p.compiled.programs.iter().map(|prog| prog.sram_bytes()).sum::<u64>() as f64, "B"),
        secs(t.elapsed()),
    ))?;

    // Stage 4: the engine, with a trace.
    let t = Instant::now();
    let trace_opts = TraceOptions { budget_bytes: DEMO_TRACE_BYTES, window_cycles: None };
    let em = emulate(&p, engine.fidelity(), threads, false, Some(&trace_opts))?;
    let mut wafer = report(&p, &em, threads, started.elapsed())?;
    say(&format!(
        "[4/5] emulate       {} cycles = {} at {}: {} tokens/s, compute {} / fabric {} / io {} busy, bound by {} ({} on {} threads)\n",
        thousands(wafer.cycles),
        duration(wafer.seconds),
        human(wafer.machine.clock_hz, "Hz"),
        human(wafer.tokens_per_s, ""),
        percent(wafer.utilization.compute),
        percent(wafer.utilization.fabric),
        percent(wafer.utilization.io),
        wafer.bottleneck.dominant,
        secs(t.elapsed()),
        threads,
    ))?;
    std::fs::create_dir_all(&cmd.out_dir).map_err(|e| Error::Write { path: cmd.out_dir.clone(), source: e })?;
    let trace_path = format!("{}/demo.wtrace", cmd.out_dir.trim_end_matches('/'));
    let heatmap_path = format!("{}/demo-heatmap.png", cmd.out_dir.trim_end_matches('/'));
    let notes = write_traces(&trace_path, &p, &em, &wafer, &trace_opts)?;
    wafer.notes.extend(notes);
    let tr = trace::read(&trace_path)?;
    let png = heatmap::png_bytes(&heatmap::render_scaled(&tr, View::Compute, 0, tr.windows as usize - 1, true))?;
    trace::write_output(&heatmap_path, &png)?;

    // Stage 5: the same graph on the GPU model, side by side.
    let t = Instant::now();
    let c = against_gpu(&p, wafer, &cmd.vs, None, None, None)?;
    say(&format!("[5/5] GPU model     the same graph on {} ({})\n\n", cmd.vs, secs(t.elapsed())))?;
    say(&c.to_text())?;
    say(&format!(
        "\nwritten\n  {trace_path}  the PE utilisation trace ({} windows of {} cycles)\n  {heatmap_path}  where the PEs computed (`wafer trace heatmap FILE --metric fabric` for the links)\n",
        tr.windows,
        thousands(tr.window_cycles),
    ))?;
    say(&format!(
        "\ndone in {}. Try next:\n  \
         wafer trace summary {trace_path}\n  \
         wafer trace timeline {trace_path}\n  \
         wafer trace export {trace_path} --perfetto -o demo.pftrace   (open in ui.perfetto.dev)\n  \
         wafer run {} --hw {} --phase prefill --seq {} --json\n  \
         wafer compile llama-3-8b --hw cs3 --phase decode --context 4096\n  \
         wafer compare llama-3-8b --hw cs3 --vs h100 --phase decode --context 4096\n  \
         wafer run gemv:16384x16384 --hw wse2 --mesh 420x420 --dtype fp16\n  \
         wafer gpu llama-2-70b --hw dgx-h100 --gpus 8 --tp 8 --phase prefill --batch 8 --seq 4096 --dtype bf16\n",
        secs(started.elapsed()),
        cmd.model,
        cmd.hw,
        cmd.seq,
    ))
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
