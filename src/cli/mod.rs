//! The command line: clap definitions, and for each command (one file each) a few lines that call the
//! library and print. No logic lives here that a library user would need.

use std::io::Write as _;

use clap::{Args, Parser, Subcommand};

use waferscale::model::{embedded_hardware, embedded_models, DType, Phase, WorkloadArgs};
use waferscale::Error;

mod demo;
mod graph;
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
    /// Run the main job on the embedded default: gpt2-small, one training step, batch 8, sequence 1024.
    #[command(after_help = "Example:\n  cargo run --release -- demo")]
    Demo,
    /// Build a model's dataflow graph and print its summary (params, FLOPs, bytes, ops).
    #[command(after_help = "Examples:\n  \
        wafer graph gpt2-small\n  \
        wafer graph llama-3-8b --phase decode --batch 4 --context 4096 --json\n  \
        wafer graph gemm:8192x8192x8192 --dtype bf16\n  \
        wafer graph models/tiny/gpt-tiny.json --dot -o gpt-tiny.dot\n  \
        wafer graph gpt-tiny --dump-after graph")]
    Graph(graph::GraphCmd),
    /// Look at a PE utilization trace: summary, heatmap, timeline, slice, export to Perfetto.
    #[command(after_help = "Examples:\n  \
        wafer trace summary run.wtrace\n  \
        wafer trace heatmap run.wtrace --metric stall --all -o stall.gif\n  \
        wafer trace export run.wtrace --perfetto -o run.perfetto-trace")]
    Trace(trace::TraceCmd),
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

fn parse_phase(s: &str) -> Result<Phase, String> {
    Phase::parse(s).ok_or_else(|| format!("`{s}` is not a phase; expected train, prefill or decode"))
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).ok_or_else(|| format!("`{s}` is not a dtype; expected fp32, fp16, bf16 or fp8"))
}

/// Runs one command.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Demo => demo::run(),
        Command::Graph(cmd) => graph::run(cmd),
        Command::Trace(cmd) => trace::run(cmd),
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
