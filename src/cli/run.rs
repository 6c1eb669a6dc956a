//! `wafer run`: compile a model (or recompile a saved plan) and emulate it on the wafer engine.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use super::compile::parse_mode;
use super::{emit, to_json, HwFlags, WorkloadFlags};
use waferscale::compile::{self, CompileOptions, Compiled, Layout, Mode};
use waferscale::engine::report::{ReportContext, StepShape};
use waferscale::engine::{self, EngineOptions, EngineRun, Fidelity};
use waferscale::graph::Graph;
use waferscale::hw::WaferHw;
use waferscale::mesh::MeshProgram;
use waferscale::model;
use waferscale::report::{GraphSummary, HostInfo, RunReport};
use waferscale::Error;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FidelityArg {
    /// Every PE, every task run and every train as events (meshes up to ~256x256).
    Detailed,
    /// For the whole wafer: a weight-streaming layer loop is emulated for a few layers and extrapolated;
    /// anything else runs as detailed (the report says which).
    Fast,
}

/// The engine options `wafer run` and `wafer compare` take.
#[derive(Args, Clone, Copy, Debug)]
pub struct EngineFlags {
    /// detailed (every PE and train) or fast (weight-streaming loops emulated for a few layers and extrapolated).
    #[arg(long, value_enum, default_value = "fast")]
    pub fidelity: FidelityArg,
    /// Engine threads [default: the cores available]. Results do not depend on it.
    #[arg(long, value_parser = parse_threads)]
    pub threads: Option<usize>,
    /// Stop with an error (exit 2) once the emulation holds more memory than this, e.g. 8GB
    /// [default: 90% of the memory available when the run starts].
    #[arg(long, value_name = "BYTES", value_parser = waferscale::trace::parse_bytes)]
    pub max_memory: Option<u64>,
}

impl EngineFlags {
    /// Applies `--max-memory` to the engine's memory guard (`engine::memory`), for the whole process.
    pub fn set_memory_limit(&self) {
        if let Some(b) = self.max_memory {
            waferscale::engine::memory::set_limit(b);
        }
    }
    pub fn fidelity(&self) -> Fidelity {
        match self.fidelity {
            FidelityArg::Detailed => Fidelity::Detailed,
            FidelityArg::Fast => Fidelity::Fast,
        }
    }
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(default_threads).max(1)
    }
}

/// `wafer run --functional` and its inputs.
#[derive(Args, Clone, Debug, Default)]
pub struct FunctionalFlags {
    /// Functional run: the PEs hold real values and compute real results in the same emulation, checked
    /// against the reference (the timing report is unchanged; a check line follows it).
    #[arg(long)]
    pub functional: bool,
    /// With --functional: a Hugging Face safetensors checkpoint [default: seeded random weights].
    #[arg(long, value_name = "FILE", requires = "functional")]
    pub weights: Option<std::path::PathBuf>,
    /// With --functional: seed of the random weights, inputs and tokens.
    #[arg(long, default_value_t = 0, requires = "functional")]
    pub seed: u64,
    /// With --functional: token ids of one sequence (sets --seq; in decode, the context and the new token).
    #[arg(long, value_name = "IDS", conflicts_with = "input", requires = "functional")]
    pub tokens: Option<String>,
    /// With --functional: a safetensors file with `input_ids` (I64 or I32, [batch, seq] or [seq]).
    #[arg(long, value_name = "FILE", requires = "functional")]
    pub input: Option<std::path::PathBuf>,
    /// With --functional: write the results the wafer computed as F32 safetensors.
    #[arg(long, value_name = "FILE", requires = "functional")]
    pub out: Option<std::path::PathBuf>,
    /// With --functional and --phase decode: decode N tokens in turn, each step from the KV cache the
    /// previous step left on the wafer, checked against the reference's prefill of the sequence
    /// (--context C: sequences of C + N tokens; --tokens: the last N are decoded). The timing report
    /// is the first step's.
    #[arg(long, value_name = "N", requires = "functional", value_parser = clap::value_parser!(u64).range(1..))]
    pub decode_steps: Option<u64>,
}

#[derive(Args)]
pub struct RunCmd {
    /// A shipped model name (gpt2-small, llama-3-8b, gpt-tiny), a config.json path, a single op
    /// (gemm:MxNxK, gemv:KxN, allreduce:BYTES, elementwise:N), or a plan saved by `wafer compile -o`.
    pub model: String,
    /// Hardware: a wafer or system in models/hardware (wse2, wse3, cs2, cs3) or a TOML path
    /// [default: cs2; a plan brings its own].
    #[arg(long)]
    pub hw: Option<String>,
    /// Override a value of the description, e.g. --set pe.sram_bytes=98304 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Use only a WxH rectangle of the wafer's mesh (e.g. 420x420).
    #[arg(long, value_name = "WxH")]
    pub mesh: Option<String>,
    /// pipelined or weight-streaming [default: pipelined when the model fits].
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<Mode>,
    /// Wafers for multi-wafer pipelined inference.
    #[arg(long, default_value_t = 1)]
    pub wafers: u32,
    /// Training: run the step as M micro-batches [default: one batch when it fits, else the fewest that fit].
    #[arg(long, value_name = "M")]
    pub micro_batches: Option<u32>,
    #[command(flatten)]
    pub workload: WorkloadFlags,
    #[command(flatten)]
    pub engine: EngineFlags,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Write the report to FILE instead of standard output.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<String>,
    /// Record a PE utilisation trace to FILE (inspect with `wafer trace summary FILE`).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<String>,
    /// Trace window in cycles [default: as fine as the budget allows].
    #[arg(long, value_name = "CYCLES", requires = "trace", value_parser = clap::value_parser!(u64).range(1..))]
    pub trace_window: Option<u64>,
    /// Largest trace file, e.g. 64MB or 268435456 [default: 256MiB]; the window widens to fit.
    #[arg(long, value_name = "BYTES", requires = "trace", value_parser = waferscale::trace::parse_bytes)]
    pub trace_budget: Option<u64>,
    #[command(flatten)]
    pub func: FunctionalFlags,
}

/// `--threads`: a positive count.
pub fn parse_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{s}` is not a positive number of threads")),
    }
}

/// Fails before any work when `path` cannot be written: its directory does not exist.
pub fn check_output_path(path: &str) -> Result<(), Error> {
    let dir = std::path::Path::new(path).parent().filter(|d| !d.as_os_str().is_empty());
    match dir {
        Some(d) if !d.is_dir() => Err(Error::Write {
            path: path.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("no directory {}", d.display())),
        }),
        _ => Ok(()),
    }
}

/// A plan file is JSON with the compile inputs under `inputs`.
fn is_plan(arg: &str) -> bool {
    if arg.ends_with(".plan") {
        return true;
    }
    std::path::Path::new(arg).is_file()
        && std::fs::read_to_string(arg)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v.get("inputs").is_some() && v.get("version").is_some())
}

/// What `wafer run` (and the demo and `wafer compare`) emulate: graph, machine, compiled programs.
pub struct Prepared {
    pub model: model::Model,
    pub graph: Graph,
    pub hw: WaferHw,
    pub compiled: Compiled,
    /// How it was compiled (None: recompiled from a plan file's own inputs).
    pub options: Option<CompileOptions>,
}

/// Compiles the model argument (or recompiles a plan) for the wafer.
pub fn prepare(cmd: &RunCmd) -> Result<Prepared, Error> {
    if is_plan(&cmd.model) {
        let (graph, hw, compiled) = compile::load_plan(&cmd.model)?;
        super::warn_notes(&compiled.plan.notes);
        let model = model::load(&graph.model).or_else(|_| model::load(&compiled.plan.model))?;
        return Ok(Prepared { model, graph, hw, compiled, options: None });
    }
    let model = model::load(&cmd.model)?;
    let mut args = cmd.workload.args()?;
    if cmd.func.functional {
        super::functional::check_decode_steps(&cmd.func, &args)?;
        if let Some(t) = super::reference::given_tokens(cmd.func.tokens.as_deref(), cmd.func.input.as_deref())? {
            let t = super::functional::first_step_tokens(&cmd.func, t)?;
            super::reference::apply_tokens(&mut args, &model, Some(&t))?;
        }
    }
    let workload = args.resolve(&model)?;
    let flags =
        HwFlags { hw: cmd.hw.clone().unwrap_or_else(|| "cs2".into()), set: cmd.set.clone(), mesh: cmd.mesh.clone() };
    let (_, hw) = flags.load()?;
    let opts = CompileOptions {
        mode: cmd.mode,
        wafers: cmd.wafers,
        verify: cfg!(debug_assertions),
        micro_batches: cmd.micro_batches,
        layer_iters: None,
    };
    let (graph, compiled) = compile::compile_model(&model, &workload, &hw, &opts)?;
    super::warn_notes(&compiled.plan.notes);
    Ok(Prepared { model, graph, hw, compiled, options: Some(opts) })
}

/// The programs the engine runs for one step, in order, each with its phase name.
pub fn programs_of(p: &Prepared) -> Result<Vec<(String, MeshProgram)>, Error> {
    Ok(p.compiled.step_programs()?)
}

/// The engine's runs of the programs, in order.
pub struct Emulated {
    pub programs: Vec<(String, MeshProgram)>,
    pub runs: Vec<EngineRun>,
    /// What the fidelity did (fast fidelity: aggregated, or emulated whole and why).
    pub notes: Vec<String>,
}

/// Runs the engine over every program with a progress spinner (after a second, on a terminal, unless
/// `quiet`); records a trace of each when `trace` is given.
pub fn emulate(
    p: &Prepared,
    fidelity: Fidelity,
    threads: usize,
    quiet: bool,
    trace: Option<&waferscale::trace::TraceOptions>,
) -> Result<Emulated, Error> {
    let programs = programs_of(p)?;
    let progress = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let spinner = (!quiet).then(|| {
        let (progress, done) = (Arc::clone(&progress), Arc::clone(&done));
        std::thread::spawn(move || {
            let started = Instant::now();
            while !done.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if done.load(Ordering::Relaxed) {
                return;
            }
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} emulating: cycle {msg} ({elapsed})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            while !done.load(Ordering::Relaxed) {
                bar.set_message(waferscale::report::fmt::thousands(progress.load(Ordering::Relaxed)));
                bar.tick();
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        })
    });
    let opts = |prog: &MeshProgram| EngineOptions {
        fidelity,
        threads,
        trace: trace.map(|t| waferscale::trace::spec_for(prog, t)),
        progress: Some(Arc::clone(&progress)),
    };
    // A trace records every window of every PE: a loop fast fidelity would cut runs whole instead.
    let cuts = loop_layers(p).is_some_and(engine::fast::aggregates);
    let result = if fidelity == Fidelity::Fast && !(cuts && trace.is_some()) {
        run_fast(p, &programs, &opts)
    } else {
        let note = (fidelity == Fidelity::Fast).then(|| engine::fast::whole_note("a traced run is emulated whole"));
        let progs: Vec<&MeshProgram> = programs.iter().map(|(_, prog)| prog).collect();
        engine::run_each(&progs, &opts)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map(|r| (r, note))
            .map_err(Error::from)
    };
    done.store(true, Ordering::Relaxed);
    if let Some(h) = spinner {
        let _ = h.join();
    }
    let (runs, note) = result?;
    Ok(Emulated { programs, runs, notes: note.into_iter().collect() })
}

/// The weight-streaming loop's length (None: not weight streaming).
pub(super) fn loop_layers(p: &Prepared) -> Option<u32> {
    let plan = &p.compiled.plan;
    (plan.mode == Mode::WeightStreaming.name()).then_some(plan.layers_folded)
}

/// Fast fidelity over a step's programs (`engine::fast::run_step`): the loop cut by recompiling with
/// `layer_iters`.
fn run_fast(
    p: &Prepared,
    programs: &[(String, MeshProgram)],
    opts: &(dyn Fn(&MeshProgram) -> EngineOptions + Sync),
) -> Result<(Vec<EngineRun>, Option<String>), Error> {
    let layers = loop_layers(p);
    let cut = |keep: u32| -> Result<Vec<(String, MeshProgram)>, String> {
        let o = CompileOptions {
            mode: Some(Mode::WeightStreaming),
            wafers: 1,
            verify: cfg!(debug_assertions),
            micro_batches: Some(p.compiled.micro_batches),
            layer_iters: Some(keep),
        };
        let (_, c) = compile::compile_model(&p.model, &p.graph.workload, &p.hw, &o).map_err(|e| e.to_string())?;
        c.step_programs().map_err(|e| e.to_string())
    };
    let run = |progs: &[&MeshProgram]| engine::run_each(progs, opts);
    let step = engine::fast::run_step(programs, layers, &cut, &run)?;
    Ok((step.runs, Some(step.note)))
}

/// The report of a run: one phase's, or the phases' in sequence.
pub fn report(p: &Prepared, em: &Emulated, threads: usize, wall: Duration) -> Result<RunReport, Error> {
    let summary = GraphSummary::new(&p.model, &p.graph);
    let plan = &p.compiled.plan;
    let mut notes = plan.notes.clone();
    notes.extend(em.notes.iter().cloned());
    if plan.offload_flops > 0 {
        notes.push(format!(
            "{} FLOPs of the step run off the wafer (the optimizer update in MemoryX) and are not in the wafer's FLOP count",
            waferscale::report::fmt::thousands(plan.offload_flops)
        ));
    }
    let host = HostInfo {
        wall_seconds: wall.as_secs_f64(),
        threads: threads as u64,
        peak_rss_bytes: peak_rss_bytes(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let ctx = ReportContext {
        hw: &p.hw,
        model: p.graph.model.clone(),
        workload: summary.workload.clone(),
        dtype: p.graph.workload.dtype,
        mode: plan.mode.clone(),
        notes,
        host,
    };
    let c = &p.compiled;
    let wafers = if c.layout == Layout::Wafers { c.programs.len() as u64 } else { 1 };
    let shape = StepShape { wafers, micro_batches: c.micro_batches as u64 };
    engine::report::build_step(&em.programs, &em.runs, ctx, shape).ok_or_else(|| {
        Error::Engine(waferscale::engine::EngineError::Program("the compile produced no program to run".into()))
    })
}

/// Writes the trace of each run: `path` for the first, `STEM.PHASE.EXT` beside it for later phases.
/// Returns the notes to add to the report.
pub fn write_traces(
    path: &str,
    p: &Prepared,
    em: &Emulated,
    report: &RunReport,
    opts: &waferscale::trace::TraceOptions,
) -> Result<Vec<String>, Error> {
    let mut notes = Vec::new();
    for (i, ((name, program), run)) in em.programs.iter().zip(&em.runs).enumerate() {
        let file = if i == 0 {
            path.to_string()
        } else {
            let pb = std::path::Path::new(path);
            let stem = pb.file_stem().map_or_else(|| path.to_string(), |s| s.to_string_lossy().into_owned());
            let ext = pb.extension().map_or_else(String::new, |e| format!(".{}", e.to_string_lossy()));
            pb.with_file_name(format!("{stem}.{name}{ext}")).display().to_string()
        };
        let header = waferscale::trace::TraceHeader::for_run(
            &report.model,
            report.workload.clone(),
            &p.hw.name,
            &report.mode,
            program,
            run,
        );
        let info = waferscale::trace::write(&file, &header, program, run, opts)?;
        let phase = if name.is_empty() { String::new() } else { format!(" ({name} phase)") };
        notes.push(format!("{}{phase} written to {file}", info.message()));
    }
    Ok(notes)
}

/// Peak resident memory of this process (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    waferscale::engine::memory::status_bytes("VmHWM:").unwrap_or(0)
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn run(cmd: RunCmd) -> Result<(), Error> {
    let started = Instant::now();
    for path in cmd.trace.iter().chain(&cmd.output) {
        check_output_path(path)?;
    }
    let p = prepare(&cmd)?;
    cmd.engine.set_memory_limit();
    let (fidelity, threads) = (cmd.engine.fidelity(), cmd.engine.threads());
    let trace_opts = waferscale::trace::TraceOptions {
        budget_bytes: cmd.trace_budget.unwrap_or(waferscale::trace::DEFAULT_BUDGET_BYTES),
        window_cycles: cmd.trace_window,
    };
    let trace = cmd.trace.as_ref().map(|_| &trace_opts);
    let (em, checked) = if cmd.func.functional {
        let (em, checked) = super::functional::emulate(&cmd.func, &p, fidelity, threads, trace)?;
        (em, Some(checked))
    } else {
        (emulate(&p, fidelity, threads, cmd.json, trace)?, None)
    };
    let mut report = report(&p, &em, threads, started.elapsed())?;
    report.notes.extend(checked.iter().flat_map(|c| c.notes.iter().cloned()));
    if let Some(path) = &cmd.trace {
        let notes = write_traces(path, &p, &em, &report, &trace_opts)?;
        report.notes.extend(notes);
    }
    let mut text = if cmd.json { to_json(&report)? } else { report.to_text() };
    if let Some(c) = &checked {
        // The report stays the timing report; the check goes after it (to stderr beside JSON).
        if cmd.json {
            eprintln!("{}", c.line());
            if let Some(l) = c.steps_line() {
                eprintln!("{l}");
            }
        } else {
            text.push_str(&c.text());
        }
    }
    emit(&text, cmd.output.as_deref())?;
    // The report and the check are out; a result outside its bound fails the run.
    checked.as_ref().map_or(Ok(()), |c| c.verdict())
}
