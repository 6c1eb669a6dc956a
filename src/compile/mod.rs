//! The wafer compiler: a dataflow graph and a wafer description in, a plan and a mesh program out.
//!
//! Stages, each with a printer (`print.rs`) and checked by the verifier (`verify.rs`):
//! 1. `stage`: ops grouped into stages (views dropped, KV-cache ops fused into attention, layers folded
//!    into loops under weight streaming) and the streams between them and the IO ports;
//! 2. `place`: one rectangle per stage, sized in proportion to its work (bands of equal height,
//!    filled in a snake), every stage at least as large as its tiles need;
//! 3. `kernel`: per stage, the mesh algorithm, its tiling over the region's PEs and the SRAM of every PE
//!    class (`alloc` in `--dump-after`);
//! 4. `io`: the perimeter IO ports split into link-wide channels, and every off-wafer stream on one;
//! 5. `route`: every stream between regions and ports on a color, within the per-router limits;
//! 6. `lower`: the flat `mesh::MeshProgram` the engine runs.
//!
//! Architecture invariant: compile is a pure function of its inputs (graph, hardware, options): integer
//! arithmetic decides placement, BTreeMaps and vectors order everything that reaches an output, and
//! loading a plan file recompiles from the inputs it stores. The compiler knows nothing of time or
//! threads; the program it emits is the engine's only input.

mod data;
mod file;
mod io;
mod kernel;
mod lower;
mod micro;
mod place;
mod print;
mod route;
mod stage;
mod verify;

use std::fmt;

use crate::graph::Graph;
use crate::hw::WaferHw;
use crate::mesh::{Cluster, MeshProgram, Phases};
use crate::model::{DType, SingleOp};

pub use file::{load_plan, PlanFile, PlanInputs, PLAN_VERSION};
pub use micro::compile_model;
pub use print::{print_program, Dump, Plan};
pub use stage::runs_in_memoryx;
pub use verify::{dry_run, verify_plan, verify_program};

/// How the model runs on the wafer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Every layer resident at once, each op on its own region, activations streaming region to region.
    Pipelined,
    /// One layer at a time on the whole wafer, its weights streamed in from MemoryX.
    WeightStreaming,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pipelined => "pipelined",
            Mode::WeightStreaming => "weight-streaming",
        }
    }
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "pipelined" => Some(Mode::Pipelined),
            "weight-streaming" | "ws" => Some(Mode::WeightStreaming),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// None: pipelined when the model fits, weight streaming otherwise.
    pub mode: Option<Mode>,
    /// Wafers for multi-wafer pipelined inference (1: one wafer).
    pub wafers: u32,
    /// Run the verifier (and, on small meshes, the dry run) after compiling.
    pub verify: bool,
    /// Training: run the step as this many micro-batches (None: one batch when it fits, else the fewest
    /// micro-batches that fit; see `compile_model`).
    pub micro_batches: Option<u32>,
    /// Weight streaming: emit the folded layer loop for only this many iterations (the first n - 1
    /// layers and the last), every decision (placement, tiling, IO channels, routes) taken as for all
    /// of them. Fast fidelity emulates two such programs and extrapolates the loop (`engine::fast`).
    /// None, or at least the model's layers: every layer.
    pub layer_iters: Option<u32>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions { mode: None, wafers: 1, verify: cfg!(debug_assertions), micro_batches: None, layer_iters: None }
    }
}

/// How a compile's programs run together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One program on one wafer.
    Single,
    /// One program per wafer, run together (multi-wafer pipelined inference): `mesh::Cluster`.
    Wafers,
    /// Programs run one after the other on one wafer (weight-streaming training: forward, then
    /// backward, or head-backward and backward when the backward pass does not fit at once):
    /// `mesh::Phases`.
    Phases,
}

/// The result of compiling: the printable plan and the program(s).
#[derive(Clone, Debug)]
pub struct Compiled {
    pub plan: Plan,
    /// The programs: one, one per wafer, or one per phase (see `layout`).
    pub programs: Vec<MeshProgram>,
    pub layout: Layout,
    /// Training with micro-batches: the programs (one micro-batch) run this many times per step, else 1.
    pub micro_batches: u32,
}

impl Compiled {
    /// The program of a single-program compile (the first of several).
    pub fn program(&self) -> &MeshProgram {
        &self.programs[0]
    }
    /// The programs as a cluster of wafers run together (multi-wafer pipelined inference).
    pub fn cluster(&self) -> Cluster {
        Cluster { wafers: self.programs.clone() }
    }
    /// The programs as phases run in turn on one wafer (weight-streaming training).
    pub fn phases(&self) -> Phases {
        Phases { phases: self.programs.clone() }
    }
    /// What the engine runs for one step, in order, each with its phase name: one program (`""`), all
    /// wafers side by side as one (`""`), or one per phase of a weight-streaming training step
    /// (`forward`, then `backward`, with `head-backward` between them when the backward pass runs in two
    /// phases: nothing stays on the wafer between them). A micro-batched step runs
    /// these `micro_batches` times (see `engine::report::build_step`).
    pub fn step_programs(&self) -> Result<Vec<(String, MeshProgram)>, CompileError> {
        Ok(match self.layout {
            Layout::Phases => {
                let n = self.programs.len();
                self.programs.iter().enumerate().map(|(i, p)| (phase_name(i, n).to_string(), p.clone())).collect()
            }
            Layout::Wafers if self.programs.len() > 1 => {
                vec![(String::new(), self.cluster().concat().map_err(CompileError::Internal)?)]
            }
            _ => vec![(String::new(), self.program().clone())],
        })
    }
}

/// The name of phase `i` of a phased step of `n` phases (as the plan printer names them).
pub fn phase_name(i: usize, n: usize) -> &'static str {
    crate::report::phase_name(i as u32, n as u32)
}

/// Errors of the compiler. Limits of the machine and bad requests are the user's (exit 2); an internal
/// error or a failed verification is a bug (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(
        "SRAM overflow: op `{op}` ({class}) needs {needed} bytes per PE but only {available} are available \
         ({sram} bytes of SRAM less {reserve} reserved for code and stack); {hint}"
    )]
    Sram { op: String, class: String, needed: u64, available: u64, sram: u64, reserve: u64, hint: String },
    #[error("mesh too small: {what}; {hint}")]
    MeshTooSmall { what: String, hint: String },
    #[error(
        "too many colors: stream `{stream}` {why} ({x}, {y}), which routes {used} of its {limit} colors; \
         {hint}"
    )]
    Colors { stream: String, why: String, x: u32, y: u32, used: u32, limit: u32, hint: String },
    #[error(
        "too many colors: op `{op}` ({class}) needs {needed} colors at its routers (its inputs, its collectives \
         and its outputs), the routers have {limit}; every algorithm for it needs more; raise fabric.colors"
    )]
    OpColors { op: String, class: String, needed: u32, limit: u32 },
    #[error("{0}")]
    Unsupported(String),
    #[error("{path}: {message}")]
    PlanFile { path: String, message: String },
    #[error("internal compiler error: {0}")]
    Internal(String),
    #[error("internal compiler error: the plan verifier failed ({} problems):\n  {}", .0.len(), .0.iter().take(20).cloned().collect::<Vec<_>>().join("\n  "))]
    Verify(Vec<String>),
}

impl CompileError {
    /// True when the error is the user's input or a limit of the machine rather than a bug.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, CompileError::Internal(_) | CompileError::Verify(_))
    }

    /// Replaces `old` in the advice of an SRAM or mesh-size error with `new`.
    pub(crate) fn rehint(self, old: &str, new: &str) -> CompileError {
        match self {
            CompileError::Sram { op, class, needed, available, sram, reserve, hint } => {
                CompileError::Sram { op, class, needed, available, sram, reserve, hint: hint.replace(old, new) }
            }
            CompileError::MeshTooSmall { what, hint } => {
                CompileError::MeshTooSmall { what, hint: hint.replace(old, new) }
            }
            e => e,
        }
    }
}

/// Compiles `g` for `hw`.
pub fn compile(g: &Graph, hw: &WaferHw, opts: &CompileOptions) -> Result<Compiled, CompileError> {
    if g.workload.dtype == DType::Fp8 {
        return Err(CompileError::Unsupported(
            "dtype fp8: the wafer computes in fp16, bf16 or fp32 (fp8 is a GPU dtype); use --dtype fp16".into(),
        ));
    }
    if opts.wafers == 0 {
        return Err(CompileError::Unsupported("--wafers 0: at least one wafer".into()));
    }
    let single = SingleOp::parse(&g.model).ok().flatten().is_some();
    if opts.wafers > 1 {
        if g.workload.phase == crate::model::Phase::Train {
            return Err(CompileError::Unsupported(format!(
                "--wafers {}: multi-wafer pipelining is for inference; train with weight streaming on one wafer",
                opts.wafers
            )));
        }
        if opts.mode == Some(Mode::WeightStreaming) {
            return Err(CompileError::Unsupported(format!(
                "--wafers {} with weight streaming: multi-wafer runs are pipelined (weights resident across wafers)",
                opts.wafers
            )));
        }
        if single {
            return Err(CompileError::Unsupported(format!(
                "--wafers {}: a single-op workload runs on one wafer",
                opts.wafers
            )));
        }
    }
    let compiled = lower::compile_all(g, hw, opts, single)?;
    if opts.verify {
        // A cut loop computes fewer layers than the graph: only its program is checked.
        let cut = opts.layer_iters.is_some_and(|n| n < compiled.plan.layers_folded);
        let problems = if cut { Vec::new() } else { verify_plan(g, &compiled) };
        if !problems.is_empty() {
            return Err(CompileError::Verify(problems));
        }
        for p in &compiled.programs {
            let mut problems = verify_program(p);
            if p.mesh.pes() <= verify::DRY_RUN_MAX_PES && compiled.layout != Layout::Wafers {
                problems.extend(dry_run(p));
            }
            if !problems.is_empty() {
                return Err(CompileError::Verify(problems));
            }
        }
        // Wafers run together: dry-run them side by side, linked through their ports.
        if compiled.layout == Layout::Wafers && compiled.program().mesh.pes() <= verify::DRY_RUN_MAX_PES {
            let all = compiled.cluster().concat().map_err(|e| CompileError::Verify(vec![e]))?;
            let problems = dry_run(&all);
            if !problems.is_empty() {
                return Err(CompileError::Verify(problems));
            }
        }
    }
    Ok(compiled)
}
