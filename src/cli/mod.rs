//! The command line: clap definitions, and for each command (one file each) a few lines that call the
//! library and print. No logic lives here that a library user would need.

use std::io::Write as _;

use clap::{Args, Parser, Subcommand};

use waferscale::hw::{load_with_overrides, HwDoc, WaferHw};
use waferscale::model::{embedded_hardware, embedded_models, DType, Phase, WorkloadArgs};
use waferscale::Error;

mod compare;
mod compile;
mod demo;
mod functional;
mod gpu;
mod graph;
mod plan;
mod reference;
mod run;
mod trace;

#[derive(Parser)]
#[command(
    name = "wafer",
    version,
    about = "Cycle-approximate emulator of a wafer-scale dataflow engine, with a companion GPU model",
    long_about = "waferscale compiles a transformer (from its Hugging Face config.json) into a dataflow graph and,\n\
                  stage by stage, onto a wafer-scale mesh of processing elements and a GPU model.\n\n\
                  Start with `wafer demo`, then `wafer models` and `wafer graph MODEL --help`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the main job on the embedded default: gpt2-small compiled for a CS-2, emulated on the whole
    /// wafer, compared with the H100 model; writes traces/demo.wtrace and traces/demo-heatmap.png.
    #[command(
        after_help = "Examples:\n  cargo run --release -- demo\n  wafer demo --model gpt-tiny --mesh 64x64 --out-dir /tmp/demo"
    )]
    Demo(demo::DemoCmd),
    /// Build a model's dataflow graph and print its summary (params, FLOPs, bytes, ops).
    #[command(after_help = "Examples:\n  \
        wafer graph gpt2-small\n  \
        wafer graph llama-3-8b --phase decode --batch 4 --context 4096 --json\n  \
        wafer graph gemm:8192x8192x8192 --dtype bf16\n  \
        wafer graph models/tiny/gpt-tiny.json --dot -o gpt-tiny.dot\n  \
        wafer graph gpt-tiny --dump-after graph")]
    Graph(graph::GraphCmd),
    /// Run a model (or one op) on the GPU model: kernels, simulated L2, HBM, launch, many GPUs.
    #[command(after_help = "Examples:\n  \
        wafer gpu gpt2-small --hw h100 --batch 8\n  \
        wafer gpu gemm:8192x8192x8192 --hw h100 --dtype bf16 --json\n  \
        wafer gpu llama-3-8b --hw h200 --phase decode --batch 16 --context 4096 --cuda-graphs\n  \
        wafer gpu llama-2-70b --hw dgx-h100 --gpus 8 --tp 8 --phase prefill --batch 8 --seq 4096 --dtype bf16\n  \
        wafer gpu gpt3-175b --hw h100-superpod-1024 --tp 8 --pp 16 --dp 8 --batch 1536 --seq 2048 --dtype bf16\n  \
        wafer gpu allreduce:8589934592 --hw dgx-h100 --gpus 8 --dtype bf16\n  \
        wafer gpu gpt-tiny --hw h100 --set l2.bytes=62914560")]
    Gpu(gpu::GpuCmd),
    /// Compile a model for a wafer: regions, algorithms, routes on colors, SRAM, IO ports; print the plan.
    #[command(after_help = "Examples:\n  \
        wafer compile gpt-tiny --hw wse2 --mesh 16x16\n  \
        wafer compile llama-3-8b --hw wse3 --phase decode\n  \
        wafer compile llama-3.1-405b --hw cs3 --mode weight-streaming -o llama405.plan\n  \
        wafer compile gemv:16384x16384 --hw wse2 --mesh 420x420\n  \
        wafer compile gpt-tiny --hw wse2 --mesh 16x16 --set pe.sram_bytes=98304 --dump-after place\n  \
        wafer compile llama-3-70b --hw cs3 --phase decode --wafers 4")]
    Compile(compile::CompileCmd),
    /// Emulate a model (or a saved plan) on the wafer engine: cycles, throughput, utilisation, bottleneck.
    #[command(after_help = "Examples:\n  \
        wafer run gpt-tiny --hw wse2 --mesh 32x32\n  \
        wafer run gemv:16384x16384 --hw wse2 --mesh 420x420 --dtype fp16 --json\n  \
        wafer run llama-3-8b --hw cs3 --phase decode --context 4096\n  \
        wafer run gpt3-175b --hw cs2 --mode weight-streaming --batch 1024 --seq 2048\n  \
        wafer run llama405.plan --fidelity detailed --threads 2")]
    Run(run::RunCmd),
    /// The same graph on a wafer (engine) and on GPUs (GPU model), side by side.
    #[command(after_help = "Examples:\n  \
        wafer compare gpt-tiny --hw cs2 --mesh 64x64 --vs h100\n  \
        wafer compare gpt2-small --hw cs2 --vs h100 --batch 8 --seq 1024\n  \
        wafer compare gemv:16384x16384 --hw cs2 --mesh 420x420 --vs a100 --json\n  \
        wafer compare llama-3-8b --hw cs3 --phase decode --vs dgx-h100 --vs-gpus 8")]
    Compare(compare::CompareCmd),
    /// Print a saved plan (recompiled from the inputs it stores): the wafer map and the tables.
    #[command(
        after_help = "Examples:\n  wafer plan llama405.plan\n  wafer plan llama405.plan --json\n  wafer plan llama405.plan --dump-after lower"
    )]
    Plan(plan::PlanCmd),
    /// Look at a PE utilization trace: summary, heatmap, timeline, slice, export to Perfetto.
    #[command(after_help = "Examples:\n  \
        wafer trace summary run.wtrace\n  \
        wafer trace heatmap run.wtrace --metric stall --all -o stall.gif\n  \
        wafer trace export run.wtrace --perfetto -o run.perfetto-trace")]
    Trace(trace::TraceCmd),
    /// Run one step of a model on the plain fp32 reference evaluator: logits (or hidden states), loss,
    /// gradients and the Adam update, from a safetensors checkpoint or seeded weights. No mesh, no timing.
    #[command(after_help = "Examples:\n  \
        wafer reference gpt-tiny --tokens 1,2,3,4\n  \
        wafer reference llama-tiny --phase decode --tokens 5,6,7,8 --json\n  \
        wafer reference gpt-tiny --phase train --seq 16 --seed 3\n  \
        wafer reference all-minilm-l6-v2 --weights ~/.cache/waferscale/minilm/model.safetensors \\\n      \
        --tokens 101,7592,2088,102 --out minilm.safetensors\n\n\
        Its defaults differ from the other commands': phase prefill, dtype fp32, seq 8, seed 0. With --dtype fp16 or bf16 every stored value\n\
        is rounded to that dtype (round to nearest even) and arithmetic stays fp32.")]
    Reference(reference::ReferenceCmd),
    /// List the shipped models (models/*.json, models/tiny/*.json) and hardware files.
    #[command(after_help = "Example:\n  wafer models")]
    Models,
}

/// The workload flags every model-taking command accepts.
#[derive(Args, Clone, Debug)]
pub struct WorkloadFlags {
    /// train (forward, backward, Adam), prefill (prompt forward) or decode (one token with a KV cache).
    #[arg(long, value_parser = parse_phase)]
    pub phase: Option<Phase>,
    /// Sequences per step [default: 1].
    #[arg(long)]
    pub batch: Option<u64>,
    /// Tokens per sequence (training or prompt length) [default: 1024, or the model's limit].
    #[arg(long)]
    pub seq: Option<u64>,
    /// Decode only: tokens already in the KV cache [default: --seq].
    #[arg(long)]
    pub context: Option<u64>,
    /// fp32, fp16, bf16 or fp8 (fp8 on GPUs only) [default: fp16].
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<DType>,
    /// Fraction of weights that are zero, in [0, 1).
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// Training only: recompute each layer's forward in backward instead of keeping activations.
    #[arg(long)]
    pub recompute: bool,
    /// A TOML file with any of: phase, batch, seq, context, dtype, sparsity, recompute (flags win).
    #[arg(long, value_name = "FILE")]
    pub workload: Option<String>,
}

impl WorkloadFlags {
    pub fn args(&self) -> Result<WorkloadArgs, Error> {
        let flags = WorkloadArgs {
            phase: self.phase,
            batch: self.batch,
            seq: self.seq,
            context: self.context,
            dtype: self.dtype,
            sparsity: self.sparsity,
            recompute: self.recompute.then_some(true),
        };
        Ok(match &self.workload {
            Some(path) => WorkloadArgs::from_file(path)?.overlay(&flags),
            None => flags,
        })
    }
}

/// The hardware flags every wafer command accepts.
#[derive(Args, Clone, Debug)]
pub struct HwFlags {
    /// A shipped description (wse2, wse3, cs2, cs3) or a path to a TOML file in the same schema.
    #[arg(long)]
    pub hw: String,
    /// Override a value of the description, e.g. --set pe.sram_bytes=98304 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Use only a WxH rectangle of the wafer's mesh (e.g. 16x16).
    #[arg(long, value_name = "WxH", value_parser = check_mesh)]
    pub mesh: Option<String>,
}

/// `WxH` in PEs.
pub(crate) fn parse_mesh(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("`{s}` is not a mesh; expected WIDTHxHEIGHT in PEs, e.g. 64x64");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let w: u32 = w.trim().parse().map_err(|_| bad())?;
    let h: u32 = h.trim().parse().map_err(|_| bad())?;
    Ok((w, h))
}

fn check_mesh(s: &str) -> Result<String, String> {
    parse_mesh(s).map(|_| s.to_string())
}

impl HwFlags {
    pub fn mesh_dims(&self) -> Result<Option<(u32, u32)>, Error> {
        self.mesh
            .as_deref()
            .map(|m| {
                parse_mesh(m)
                    .map_err(|e| Error::Compile(waferscale::compile::CompileError::Unsupported(format!("--mesh: {e}"))))
            })
            .transpose()
    }

    /// The description (after `extends` and `--set`) and the validated wafer, restricted to `--mesh`.
    pub fn load(&self) -> Result<(HwDoc, WaferHw), Error> {
        let doc = load_with_overrides(&self.hw, &self.set)?;
        let mut hw = WaferHw::from_doc(&doc)?;
        if let Some((w, h)) = self.mesh_dims()? {
            hw = hw.with_mesh(w, h)?;
        }
        Ok((doc, hw))
    }
}

/// Pretty JSON of a report type, with a final newline.
pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Result<String, Error> {
    let mut s = serde_json::to_string_pretty(v)
        .map_err(|e| Error::Compile(waferscale::compile::CompileError::Internal(format!("cannot serialise: {e}"))))?;
    s.push('\n');
    Ok(s)
}

fn parse_phase(s: &str) -> Result<Phase, String> {
    Phase::parse(s).ok_or_else(|| format!("`{s}` is not a phase; expected train, prefill or decode"))
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).ok_or_else(|| format!("`{s}` is not a dtype; expected fp32, fp16, bf16 or fp8"))
}

/// Runs one command.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Demo(cmd) => demo::run(cmd),
        Command::Graph(cmd) => graph::run(cmd),
        Command::Gpu(cmd) => gpu::run(cmd),
        Command::Compile(cmd) => compile::run(cmd),
        Command::Plan(cmd) => plan::run(cmd),
        Command::Run(cmd) => run::run(cmd),
        Command::Compare(cmd) => compare::run(cmd),
        Command::Trace(cmd) => trace::run(cmd),
        Command::Reference(cmd) => reference::run(cmd),
        Command::Models => {
            let mut s = String::from("models (wafer graph NAME):\n");
            for f in embedded_models() {
                s.push_str(&format!("  {:<24} {}\n", f.name, f.path));
            }
            s.push_str("\nsingle ops: gemm:MxNxK  gemv:KxN  allreduce:BYTES  elementwise:N\n");
            if !embedded_hardware().is_empty() {
                s.push_str("\nhardware (--hw NAME):\n");
                for f in embedded_hardware() {
                    s.push_str(&format!("  {:<24} {}\n", f.name, f.path));
                }
            }
            emit(&s, None)
        }
    }
}

/// Prints to stdout (a closed pipe is not an error), or writes FILE whole: to a temporary file
/// beside it that is renamed into place, so a failure never leaves a half-written file.
pub(crate) fn emit(text: &str, path: Option<&str>) -> Result<(), Error> {
    match path {
        None => {
            let mut out = std::io::stdout().lock();
            match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(Error::Write { path: "<stdout>".into(), source: e })
                }
                _ => Ok(()),
            }
        }
        Some(p) => {
            let tmp = format!("{p}.tmp-{}", std::process::id());
            let res = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, p));
            if res.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            res.map_err(|source| Error::Write { path: p.to_string(), source })
        }
    }
}

/// Prints the compile's warnings (notes starting with `warning: `, such as weights that ran out of
/// router colors and lost IO bandwidth) on stderr, where a user sees them beside `--json` too.
pub(crate) fn warn_notes(notes: &[String]) {
    for n in notes.iter().filter(|n| n.starts_with("warning: ")) {
        eprintln!("{n}");
    }
}
