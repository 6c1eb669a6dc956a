//! The GPU model: the same dataflow graph the wafer runs, lowered to the kernels a GPU would launch
//! and timed on a model of SMs, tensor cores, SMEM, a simulated L2 and HBM; many GPUs with tensor,
//! pipeline and data parallelism and NCCL-like collectives.
//!
//! The stages: [`lower`] cuts the graph of one micro-batch into kernels (fusion rules, tensor-parallel
//! sharding and its all-reduces, the pipeline stage of each kernel); each distinct kernel is timed
//! once ([`gemm`], [`attention`], [`stream`], [`collective`]) and the result reused wherever the same
//! shape recurs (every layer); the kernels of a pass are laid on a stream with launch overheads; the
//! passes of all micro-batches are scheduled 1F1B over the stages ([`pipeline`]); the data-parallel
//! gradient all-reduce overlaps the last backward; the optimizer closes the step.
//!
//! Architecture invariant: timing comes only from the mechanisms (tiles and waves, the L2 simulated
//! over the kernels' access order, bandwidths, overlap, launch costs, collectives, the schedule);
//! there is no per-shape correction anywhere. This module never sees the wafer, and the graph never
//! sees this module. Everything is deterministic: no hash-map order and no threads reach a result.

pub mod attention;
pub mod collective;
pub mod gemm;
pub mod l2;
pub mod lower;
pub mod pipeline;
pub mod stream;
pub mod timing;

use std::collections::BTreeMap;
use std::time::Instant;

use crate::graph::{self, GraphError, Pass};
use crate::hw::{GpuArch, GpuHw, GpuSystem};
use crate::model::{DType, Model, Phase, SingleOp, Workload};
use crate::report::fmt::{duration, human};
use crate::report::{
    Bottleneck, GpuDetails, HostInfo, KernelRow, LevelBytes, MachineSummary, MemoryFootprint, OpRow, RunReport,
    Utilization, WorkloadSummary,
};
use attention::FlashVariant;
use collective::{time_collective, CollOp, CollSpec, Group};
pub use lower::{AttentionImpl, Parallel};
use lower::{Kernel, KernelKind, Layout, Lowered, StageMemory};
use timing::{Resource, Shares, Timing, Traffic};

/// Errors of the GPU model: all of them the user's input (exit code 2) except a graph bug.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("parallelism: {0}")]
    Parallel(String),
    #[error("{0}")]
    DoesNotFit(Box<DoesNotFit>),
    #[error("{hw}: {message}")]
    Unsupported { hw: String, message: String },
    #[error(transparent)]
    Graph(#[from] GraphError),
}

/// A configuration whose fullest GPU needs more memory than it has.
#[derive(Debug)]
pub struct DoesNotFit {
    /// The model, workload and parallelism.
    pub what: String,
    /// The GPU and the description it came from.
    pub gpu: String,
    /// The pipeline stage of the fullest GPU.
    pub stage: u32,
    pub need_bytes: u64,
    pub capacity_bytes: u64,
    /// What the bytes are for (`weights 12.10 GB, gradients ...`).
    pub breakdown: String,
    /// What the user can change.
    pub hint: String,
}

impl std::fmt::Display for DoesNotFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} does not fit in the memory of one {}: the fullest GPU (pipeline stage {}) needs {} for {}, \
             but has {} of HBM (hbm.bytes); {}",
            self.what,
            self.gpu,
            self.stage,
            bytes_text(self.need_bytes),
            self.breakdown,
            bytes_text(self.capacity_bytes),
            self.hint
        )
    }
}

impl GpuError {
    pub fn is_user_error(&self) -> bool {
        match self {
            GpuError::Graph(g) => g.is_user_error(),
            _ => true,
        }
    }
}

/// Options of a GPU run beyond the model, workload and hardware.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuOptions {
    pub gpus: Option<u64>,
    pub tp: Option<u64>,
    pub pp: Option<u64>,
    pub dp: Option<u64>,
    pub microbatches: Option<u64>,
    pub zero: Option<u8>,
    /// None: fused, with the FlashAttention generation of the architecture.
    pub attention: Option<AttentionImpl>,
    /// Replay the step as a captured CUDA graph instead of launching eagerly.
    pub cuda_graphs: bool,
    /// The SM clock the step is timed at.
    pub clock: ClockMode,
}

/// The SM clock a step runs at: the boost clock of a short burst, or the clock the power limit holds
/// under sustained load (`sm.clock_hz` and `sm.sustained_clock_hz` of the hardware description).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClockMode {
    /// A step that lasts no longer than `sm.boost_window_s` at the boost clock is a burst from a rested
    /// GPU and runs at boost; a longer one runs at the sustained clock, the steady state of steps run
    /// back to back (the whole step, the first window's boost included: at most the window's share of
    /// the clock difference is lost, 2 ms on an H100).
    #[default]
    Auto,
    /// Every kernel at the boost clock (a burst from a rested GPU).
    Boost,
    /// Every kernel at the sustained clock (a GPU that has been under load for longer than the window).
    Sustained,
}

impl ClockMode {
    pub fn name(self) -> &'static str {
        match self {
            ClockMode::Auto => "auto",
            ClockMode::Boost => "boost",
            ClockMode::Sustained => "sustained",
        }
    }
}

fn bytes_text(b: u64) -> String {
    format!("{} ({} bytes)", human(b as f64, "B"), crate::report::fmt::thousands(b))
}

/// Checks and completes the parallel configuration against the model, workload and machine.
pub fn resolve_parallel(model: &Model, w: &Workload, sys: &GpuSystem, o: &GpuOptions) -> Result<Parallel, GpuError> {
    let bad = |m: String| Err(GpuError::Parallel(m));
    for (flag, v) in
        [("--gpus", o.gpus), ("--tp", o.tp), ("--pp", o.pp), ("--dp", o.dp), ("--microbatches", o.microbatches)]
    {
        if v == Some(0) {
            return bad(format!("{flag} must be at least 1"));
        }
    }
    let tp = o.tp.unwrap_or(1);
    let pp = o.pp.unwrap_or(1);
    let dp = match (o.dp, o.gpus) {
        (Some(d), _) => d,
        (None, Some(g)) if g.is_multiple_of(tp * pp) => g / (tp * pp),
        (None, Some(g)) => return bad(format!("--gpus {g} is not a multiple of --tp {tp} x --pp {pp} = {}", tp * pp)),
        (None, None) => 1,
    };
    let gpus = tp.saturating_mul(pp).saturating_mul(dp);
    if let Some(g) = o.gpus {
        if g != gpus {
            return bad(format!("--gpus {g} but --tp {tp} x --pp {pp} x --dp {dp} = {gpus}; they must be equal"));
        }
    }
    if gpus > sys.max_gpus() {
        let hint = if sys.kind == "gpu" {
            "a gpu description is one GPU; name a cluster (dgx-h100, h100-superpod-256, h100-superpod-1024)".to_string()
        } else {
            format!("use a bigger cluster or --set network.nodes={}", gpus.div_ceil(sys.node.gpus as u64))
        };
        return bad(format!(
            "{gpus} GPUs requested but {} ({}) has {}; {hint}",
            sys.name,
            sys.description,
            sys.max_gpus()
        ));
    }
    let zero = o.zero.unwrap_or(0);
    if zero > 3 {
        return bad(format!("--zero {zero}: expected 0, 1, 2 or 3"));
    }
    if zero > 0 && w.phase != Phase::Train {
        return bad(format!(
            "--zero {zero} shards optimizer state, gradients or weights of training; phase is {}",
            w.phase.name()
        ));
    }
    match model {
        Model::Op(op) => {
            if tp > 1 || pp > 1 {
                return bad(format!(
                    "the single-op workload {op} runs on one GPU (allreduce:BYTES over --gpus); --tp and --pp do not apply"
                ));
            }
            if dp > 1 && !matches!(op, SingleOp::AllReduce { .. }) {
                return bad(format!("the single-op workload {op} runs on one GPU; only allreduce:BYTES spans --gpus"));
            }
            if o.microbatches.is_some_and(|m| m > 1) {
                return bad("--microbatches does not apply to a single-op workload".into());
            }
            Ok(Parallel { tp, pp, dp, microbatches: 1, zero })
        }
        Model::Transformer(s) => {
            if !s.heads.is_multiple_of(tp) {
                return bad(format!(
                    "--tp {tp} does not divide the {} attention heads of {} (num_attention_heads in {})",
                    s.heads, s.name, s.source
                ));
            }
            if !s.kv_heads.is_multiple_of(tp) && !tp.is_multiple_of(s.kv_heads) {
                return bad(format!(
                    "--tp {tp} neither divides nor is a multiple of the {} key/value heads of {}",
                    s.kv_heads, s.name
                ));
            }
            if !s.ffn_hidden.is_multiple_of(tp) {
                return bad(format!("--tp {tp} does not divide the FFN width {} of {}", s.ffn_hidden, s.name));
            }
            if pp > s.layers {
                return bad(format!(
                    "--pp {pp} stages for the {} layers of {}: at most one stage per layer",
                    s.layers, s.name
                ));
            }
            if !w.batch.is_multiple_of(dp) {
                return bad(format!("--dp {dp} does not divide the batch of {} sequences (--batch)", w.batch));
            }
            let per_replica = w.batch / dp;
            let microbatches = o.microbatches.unwrap_or(if pp > 1 { per_replica } else { 1 });
            if !per_replica.is_multiple_of(microbatches) {
                return bad(format!(
                    "--microbatches {microbatches} does not divide the {per_replica} sequences of each data-parallel replica (--batch {} / --dp {dp})",
                    w.batch
                ));
            }
            Ok(Parallel { tp, pp, dp, microbatches, zero })
        }
    }
}

/// The attention implementation: what was asked, checked against the architecture.
fn resolve_attention(sys: &GpuSystem, asked: Option<AttentionImpl>) -> Result<AttentionImpl, GpuError> {
    let best = match sys.gpu.arch {
        GpuArch::Hopper => FlashVariant::Fa3,
        GpuArch::Ampere => FlashVariant::Fa2,
    };
    match asked {
        None => Ok(AttentionImpl::Fused(best)),
        Some(AttentionImpl::Fused(FlashVariant::Fa3)) if sys.gpu.arch != GpuArch::Hopper => {
            Err(GpuError::Unsupported {
                hw: sys.name.clone(),
                message: format!(
                    "FlashAttention-3 needs Hopper (wgmma, TMA); {} is {} (arch); use --attention flash2",
                    sys.gpu.description,
                    sys.gpu.arch.name()
                ),
            })
        }
        Some(a) => Ok(a),
    }
}

/// Kernel time, memoized by the kernel's full description: each distinct shape is simulated once.
struct Timer<'a> {
    sys: &'a GpuSystem,
    /// Each kernel at the clock the power limit allows it under sustained load, instead of at boost.
    sustained: bool,
    /// Tensor-core kernels timed at boost, kept across the runs of one `run` (`--clock auto` times
    /// the step at boost first).
    boost: &'a mut BTreeMap<KernelKind, Burst>,
    /// The timing and the SM clock it ran at.
    memo: BTreeMap<KernelKind, (Timing, f64)>,
}

impl Timer<'_> {
    fn time(&mut self, k: &KernelKind) -> Timing {
        self.timed(k).0
    }

    /// The kernel's timing and its SM clock.
    fn timed(&mut self, k: &KernelKind) -> (Timing, f64) {
        if let Some(t) = self.memo.get(k) {
            return t.clone();
        }
        let gpu = &self.sys.gpu;
        let t = match k {
            KernelKind::Gemm(g) => {
                let (pick, burst) = match self.boost.get(k) {
                    Some(Burst::Gemm(p, t)) => (*p, t.clone()),
                    _ => {
                        let (p, t) = gemm::pick_gemm(gpu, g);
                        self.boost.insert(*k, Burst::Gemm(p, t.clone()));
                        (p, t)
                    }
                };
                at_power_limit(gpu, g.dtype, self.sustained, burst, |at| gemm::time_pick(at, g, &pick))
            }
            KernelKind::Flash(f) => {
                let burst = match self.boost.get(k) {
                    Some(Burst::Other(t)) => t.clone(),
                    _ => {
                        let t = attention::time_flash(gpu, f);
                        self.boost.insert(*k, Burst::Other(t.clone()));
                        t
                    }
                };
                at_power_limit(gpu, f.dtype, self.sustained, burst, |at| attention::time_flash(at, f))
            }
            // Memory-bound: their tensor utilization is nil, and the power of their bytes is not modelled.
            KernelKind::Stream(s) => (stream::time_stream(gpu, s), gpu.sm.clock_hz),
            KernelKind::Collective(c) => {
                let ct = time_collective(self.sys, c);
                let mut shares = Shares::default();
                shares.add(Resource::Network, ct.seconds);
                let t = Timing {
                    seconds: ct.seconds,
                    shares,
                    traffic: Traffic::default(),
                    exec_flops: 0.0,
                    compute_busy_s: 0.0,
                    config: format!("{}, bus bandwidth {}/s", ct.algorithm, human(ct.busbw_bytes_per_s, "B")),
                };
                (t, gpu.sm.clock_hz)
            }
        };
        self.memo.insert(*k, t.clone());
        t
    }
}

/// A tensor-core kernel timed at boost; a GEMM with the kernel the library picked, which it keeps
/// at any clock.
enum Burst {
    Gemm(gemm::GemmPick, Timing),
    Other(Timing),
}

/// A GEMM under the power limit: the library picks its kernel at boost (cuBLAS's heuristics do not
/// know the clock), and under sustained load (`sustained`) that kernel runs at the clock the power
/// limit allows it. Returns the timing and the clock.
pub fn power_limited_gemm(gpu: &GpuHw, shape: &gemm::GemmShape, sustained: bool) -> (Timing, f64) {
    let (pick, burst) = gemm::pick_gemm(gpu, shape);
    at_power_limit(gpu, shape.dtype, sustained, burst, |at| gemm::time_pick(at, shape, &pick))
}

/// Times a tensor-core kernel at the boost clock and, under sustained load (`sustained`), again at the
/// clock the power limit allows it (`GpuHw::power_limited_clock_hz` of its tensor utilization at
/// boost, in `dtype`). Returns the timing and the clock.
pub fn power_limited(gpu: &GpuHw, dtype: DType, sustained: bool, time: impl Fn(&GpuHw) -> Timing) -> (Timing, f64) {
    let burst = time(gpu);
    at_power_limit(gpu, dtype, sustained, burst, time)
}

/// `power_limited` with the kernel's timing at boost (`burst`) already known.
fn at_power_limit(
    gpu: &GpuHw,
    dtype: DType,
    sustained: bool,
    burst: Timing,
    time: impl Fn(&GpuHw) -> Timing,
) -> (Timing, f64) {
    if !sustained {
        return (burst, gpu.sm.clock_hz);
    }
    let peak = gpu.peak_flops_per_s(dtype);
    let utilization = if burst.seconds > 0.0 && peak > 0.0 { burst.exec_flops / burst.seconds / peak } else { 0.0 };
    let clock = gpu.power_limited_clock_hz(utilization);
    if clock >= gpu.sm.clock_hz {
        return (burst, gpu.sm.clock_hz);
    }
    (time(&gpu.at_clock(clock)), clock)
}

/// The kernels of one pass on one GPU, laid on a stream.
#[derive(Clone, Debug, Default)]
struct PassTime {
    seconds: f64,
    shares: Shares,
    traffic: Traffic,
    busy_s: f64,
    /// Collective bytes sent per GPU inside the pass: (NVLink, network).
    coll_bytes: (f64, f64),
    kernels: u64,
}

/// Launch model. Eager: the host issues one kernel every `eager_ns` and a kernel starts when both the
/// host has issued it and the previous kernel has ended plus the GPU-side gap. CUDA graph: the step is
/// replayed from a captured graph, and only the GPU-side gap remains.
fn pass_time(sys: &GpuSystem, timer: &mut Timer, kernels: &[&Kernel], graphs: bool) -> PassTime {
    let gap = sys.gpu.launch.graph_ns * 1e-9;
    let eager = sys.gpu.launch.eager_ns * 1e-9;
    let mut host = 0.0;
    let mut gpu_t = 0.0;
    let mut out = PassTime::default();
    for k in kernels {
        let t = timer.time(&k.kind);
        let start = if graphs {
            gpu_t + gap
        } else {
            host += eager;
            (gpu_t + gap).max(host)
        };
        out.shares.add(Resource::Launch, start - gpu_t);
        out.shares += t.shares;
        out.traffic += t.traffic;
        out.busy_s += t.compute_busy_s;
        if let KernelKind::Collective(c) = &k.kind {
            let ct = time_collective(sys, c);
            if ct.inter_node {
                out.coll_bytes.1 += ct.bus_bytes;
            } else {
                out.coll_bytes.0 += ct.bus_bytes;
            }
        }
        gpu_t = start + t.seconds;
        out.kernels += 1;
    }
    out.seconds = gpu_t;
    out
}

fn bound_of(sys: &GpuSystem, t: &Timing, graphs: bool) -> Resource {
    let launch = if graphs { sys.gpu.launch.graph_ns } else { sys.gpu.launch.eager_ns } * 1e-9;
    if t.seconds < launch {
        Resource::Launch
    } else {
        t.bound()
    }
}

fn pass_name(p: Pass) -> &'static str {
    p.name()
}

/// Runs the GPU model on a model and workload, at the clock `opts.clock` chooses.
pub fn run(model: &Model, workload: &Workload, sys: &GpuSystem, opts: &GpuOptions) -> Result<RunReport, GpuError> {
    let started = Instant::now();
    let window = sys.gpu.power.boost_window_s;
    let mut boost = BTreeMap::new();
    let (mut report, why) = match opts.clock {
        ClockMode::Boost => {
            (run_at(model, workload, sys, opts, false, &mut boost)?, "boost (--clock boost)".to_string())
        }
        ClockMode::Sustained => (
            run_at(model, workload, sys, opts, true, &mut boost)?,
            "sustained (--clock sustained): kernels above the power limit's utilization slowed to its clock"
                .to_string(),
        ),
        ClockMode::Auto => {
            let burst = run_at(model, workload, sys, opts, false, &mut boost)?;
            let at_boost = duration(burst.seconds);
            if burst.seconds <= window {
                let why = format!(
                    "boost, as the step ({at_boost}) fits in the {} boost window (power.boost_window_s; \
                     --clock sustained for steps run back to back)",
                    duration(window)
                );
                (burst, why)
            } else {
                let why = format!(
                    "sustained, as the step lasts {at_boost} at boost, longer than the {} boost window \
                     (power.boost_window_s): kernels above the power limit's utilization run at its clock \
                     (--clock boost for a single burst)",
                    duration(window)
                );
                (run_at(model, workload, sys, opts, true, &mut boost)?, why)
            }
        }
    };
    let slowest = report
        .gpu
        .as_ref()
        .map(|g| g.kernels.iter().map(|k| k.clock_hz).fold(f64::INFINITY, f64::min))
        .filter(|c| c.is_finite())
        .unwrap_or(sys.gpu.sm.clock_hz);
    report.notes.push(format!(
        "SM clock: {why}; boost {}, slowest kernel at {}",
        human(sys.gpu.sm.clock_hz, "Hz"),
        human(slowest, "Hz")
    ));
    report.host.wall_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Runs the GPU model with every kernel at the boost clock, or (`sustained`) each at the clock the
/// power limit allows it under sustained load.
fn run_at(
    model: &Model,
    workload: &Workload,
    sys: &GpuSystem,
    opts: &GpuOptions,
    sustained: bool,
    boost: &mut BTreeMap<KernelKind, Burst>,
) -> Result<RunReport, GpuError> {
    let gpu = &sys.gpu;
    if workload.dtype == DType::Fp8 && gpu.tensor.flops_per_clk.fp8 == 0.0 {
        return Err(GpuError::Unsupported {
            hw: sys.name.clone(),
            message: format!(
                "{} has no FP8 tensor cores (tensor.flops_per_clk.fp8 = 0); use --dtype bf16 or fp16",
                gpu.description
            ),
        });
    }
    let par = resolve_parallel(model, workload, sys, opts)?;
    let attention = resolve_attention(sys, opts.attention)?;
    let spec = match model {
        Model::Transformer(s) => Some(s),
        Model::Op(_) => None,
    };
    let full = graph::build(model, workload)?;
    let micro_workload = match model {
        Model::Op(_) => workload.clone(),
        Model::Transformer(_) => Workload { batch: workload.batch / (par.dp * par.microbatches), ..workload.clone() },
    };
    let micro = graph::build(model, &micro_workload)?;
    let layout = Layout::new(&par, sys.node.gpus as u64);
    let low = lower::lower(&micro, spec, par, layout, attention);

    // Memory: the busiest stage must fit.
    let capacity = gpu.hbm.bytes;
    let (worst_stage, worst) = low
        .memory
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total().cmp(&b.1.total()).then(b.0.cmp(&a.0)))
        .map(|(i, m)| (i as u32, *m))
        .unwrap_or((0, StageMemory::default()));
    if worst.total() > capacity {
        return Err(does_not_fit(model, workload, sys, &par, worst_stage, &worst));
    }

    let mut timer = Timer { sys, sustained, boost, memo: BTreeMap::new() };
    let graphs = opts.cuda_graphs;
    let stages = low.stages as usize;
    let m = par.microbatches;
    let of = |stage: usize, passes: &[Pass]| -> Vec<&Kernel> {
        low.kernels.iter().filter(|k| k.stage as usize == stage && passes.contains(&k.pass)).collect()
    };
    let mut fwd = Vec::with_capacity(stages);
    let mut bwd = Vec::with_capacity(stages);
    let mut opt = Vec::with_capacity(stages);
    for s in 0..stages {
        fwd.push(pass_time(sys, &mut timer, &of(s, &[Pass::Forward]), graphs));
        bwd.push(pass_time(sys, &mut timer, &of(s, &[Pass::Backward, Pass::Recompute]), graphs));
        opt.push(pass_time(sys, &mut timer, &of(s, &[Pass::Optimizer]), graphs));
    }
    let train = workload.phase == Phase::Train;
    // ZeRO-3 gathers each stage's weights before its forward and again before its backward, one
    // micro-batch at a time, overlapped with the pass; what does not hide is exposed.
    let mut zero3 = vec![0.0; stages];
    if par.zero == 3 && par.dp > 1 {
        for s in 0..stages {
            let ag =
                time_collective(sys, &CollSpec { op: CollOp::AllGather, bytes: low.weight_bytes[s], group: layout.dp })
                    .seconds;
            let ef = (ag - fwd[s].seconds).max(0.0);
            let eb = (ag - bwd[s].seconds).max(0.0);
            zero3[s] = ef + eb;
            fwd[s].shares.add(Resource::Network, ef);
            fwd[s].seconds += ef;
            bwd[s].shares.add(Resource::Network, eb);
            bwd[s].seconds += eb;
        }
    }
    let f: Vec<f64> = fwd.iter().map(|p| p.seconds).collect();
    let b: Vec<f64> = bwd.iter().map(|p| p.seconds).collect();
    let transfer = if stages > 1 {
        time_collective(
            sys,
            &CollSpec {
                op: CollOp::SendRecv,
                bytes: low.boundary_bytes,
                group: Group { size: 2, nodes: if layout.pp_inter_node { 2 } else { 1 } },
            },
        )
        .seconds
    } else {
        0.0
    };
    let sched = pipeline::one_f_one_b(&f, &b, m, transfer);
    // Data parallelism: each stage all-reduces its gradients, overlapped with its last backward;
    // the last bucket (one layer's gradients) is exposed at least.
    let mut dp_time = vec![0.0; stages];
    let mut dp_exposed = vec![0.0; stages];
    if train && par.dp > 1 {
        for s in 0..stages {
            let t =
                time_collective(sys, &CollSpec { op: CollOp::AllReduce, bytes: low.grad_bytes[s], group: layout.dp })
                    .seconds;
            dp_time[s] = t;
            dp_exposed[s] = (t - b[s]).max(t / low.layers[s].max(1) as f64);
        }
    }
    let ends: Vec<f64> = (0..stages).map(|s| sched.stage_end[s] + dp_exposed[s] + opt[s].seconds).collect();
    let (crit, step) =
        ends.iter().copied().enumerate().fold((0usize, 0.0f64), |acc, (i, e)| if e > acc.1 { (i, e) } else { acc });

    // Attribution along the critical stage.
    let mf = m as f64;
    let mut shares = fwd[crit].shares.scaled(mf);
    shares += bwd[crit].shares.scaled(mf);
    shares += opt[crit].shares;
    shares.add(Resource::Network, dp_exposed[crit]);
    // What the critical stage did not spend on its own work is waiting: the pipeline bubble (float
    // residue of a single stage is not a bubble).
    let idle = step - shares.total();
    if idle > 1e-9 * step {
        shares.add(Resource::Bubble, idle);
    }

    // Whole-machine totals: every stage's GPUs (tp x dp of them) run its kernels.
    let replicas = (par.tp * par.dp) as f64;
    let mut traffic = Traffic::default();
    let mut busy = 0.0;
    let mut nvlink = 0.0;
    let mut network = 0.0;
    let mut launches = 0u64;
    for s in 0..stages {
        let per_gpu_traffic = {
            let mut t = fwd[s].traffic.scaled(m);
            t += bwd[s].traffic.scaled(m);
            t += opt[s].traffic;
            t
        };
        traffic += per_gpu_traffic.scaled(par.tp * par.dp);
        busy += (mf * (fwd[s].busy_s + bwd[s].busy_s) + opt[s].busy_s) * replicas;
        nvlink += mf * (fwd[s].coll_bytes.0 + bwd[s].coll_bytes.0) * replicas;
        network += mf * (fwd[s].coll_bytes.1 + bwd[s].coll_bytes.1) * replicas;
        launches = launches.saturating_add(
            m.saturating_mul(fwd[s].kernels + bwd[s].kernels)
                .saturating_add(opt[s].kernels)
                .saturating_mul(par.tp * par.dp),
        );
    }
    if train && par.dp > 1 {
        for s in 0..stages {
            let ct =
                time_collective(sys, &CollSpec { op: CollOp::AllReduce, bytes: low.grad_bytes[s], group: layout.dp });
            let bytes = ct.bus_bytes * replicas;
            if ct.inter_node {
                network += bytes;
            } else {
                nvlink += bytes;
            }
        }
    }
    if stages > 1 {
        let bytes = low.boundary_bytes as f64 * (stages - 1) as f64 * mf * replicas * if train { 2.0 } else { 1.0 };
        if layout.pp_inter_node {
            network += bytes;
        } else {
            nvlink += bytes;
        }
    }

    let gpus = par.gpus();
    let flops: u64 = full.op_ids().map(|o| full.op(o).cost.flops).sum();
    let peak = gpu.peak_flops_per_s(workload.dtype) * gpus as f64;
    let achieved = if step > 0.0 { flops as f64 / step } else { 0.0 };
    let denom = gpus as f64 * step;
    let utilization = Utilization {
        compute: if denom > 0.0 { busy / denom } else { 0.0 },
        fabric: if denom > 0.0 { traffic.l2 as f64 / (denom * gpu.l2.bytes_per_s) } else { 0.0 },
        io: if denom > 0.0 {
            (traffic.hbm_read + traffic.hbm_write) as f64 / (denom * gpu.hbm.spec_bytes_per_s)
        } else {
            0.0
        },
        memory: worst.total() as f64 / capacity as f64,
    };
    let total_shares = shares.total();
    let mut share_map = BTreeMap::new();
    for r in Resource::ALL {
        let v = shares.get(r);
        if v > 0.0 && total_shares > 0.0 {
            share_map.insert(r.name().to_string(), v / total_shares);
        }
    }
    let bottleneck = Bottleneck { dominant: shares.dominant().name().to_string(), shares: share_map };

    // The kernel table: one model replica (all stages), counted per step.
    let mut rows: Vec<(KernelRow, Resource)> = Vec::new();
    let mut index: BTreeMap<(u8, String, String, String), usize> = BTreeMap::new();
    for k in &low.kernels {
        let (t, clock_hz) = timer.timed(&k.kind);
        let count = if k.pass == Pass::Optimizer { 1 } else { m };
        let key = (k.pass as u8, k.name.clone(), k.kind.label().to_string(), k.kind.shape_text());
        let i = *index.entry(key).or_insert_with(|| {
            rows.push((
                KernelRow {
                    name: format!("{} {}", pass_name(k.pass), k.name),
                    ops: vec![],
                    seconds: 0.0,
                    flops: 0,
                    achieved_flops_per_s: 0.0,
                    bound: bound_of(sys, &t, graphs).name().to_string(),
                    count: 0,
                    kind: k.kind.label().to_string(),
                    shape: k.kind.shape_text(),
                    config: t.config.clone(),
                    clock_hz,
                },
                t.bound(),
            ));
            rows.len() - 1
        });
        let row = &mut rows[i].0;
        row.ops.extend(k.ops.iter().cloned());
        row.seconds += t.seconds * count as f64;
        row.flops += k.flops * count;
        row.count += count;
    }
    let kernels: Vec<KernelRow> = rows
        .into_iter()
        .map(|(mut r, _)| {
            r.achieved_flops_per_s = if r.seconds > 0.0 { r.flops as f64 / r.seconds } else { 0.0 };
            r
        })
        .collect();
    // The breakdown: the same kernels grouped by pass and kind.
    let mut groups: BTreeMap<(u8, String), (OpRow, Shares)> = BTreeMap::new();
    for k in &low.kernels {
        let t = timer.time(&k.kind);
        let count = if k.pass == Pass::Optimizer { 1.0 } else { mf };
        let (row, sh) = groups.entry((k.pass as u8, k.kind.label().to_string())).or_insert_with(|| {
            (
                OpRow {
                    name: format!("{} {}", pass_name(k.pass), k.kind.label()),
                    kind: k.kind.label().to_string(),
                    units: gpu.sm.count as u64,
                    ..Default::default()
                },
                Shares::default(),
            )
        });
        row.flops += (k.flops as f64 * count) as u64;
        row.seconds += t.seconds * count;
        *sh += t.shares.scaled(count);
        let cyc = gpu.sm.clock_hz * gpu.sm.count as f64 * count;
        row.cycles_busy += (t.compute_busy_s * cyc) as u64;
        row.cycles_stalled += ((t.seconds - t.compute_busy_s).max(0.0) * cyc) as u64;
    }
    let breakdown: Vec<OpRow> = groups
        .into_values()
        .map(|(mut r, sh)| {
            r.bound = sh.dominant().name().to_string();
            r
        })
        .collect();

    let mut counters = BTreeMap::new();
    counters.insert("hbm_read_bytes".to_string(), traffic.hbm_read);
    counters.insert("hbm_write_bytes".to_string(), traffic.hbm_write);
    counters.insert("l2_bytes".to_string(), traffic.l2);
    counters.insert("l2_hits".to_string(), traffic.l2_hits);
    counters.insert("l2_misses".to_string(), traffic.l2_misses);
    counters.insert("smem_bytes".to_string(), traffic.smem);
    counters.insert("nvlink_bytes".to_string(), nvlink as u64);
    counters.insert("network_bytes".to_string(), network as u64);
    counters.insert("kernel_launches".to_string(), launches);
    counters.insert("distinct_kernels_simulated".to_string(), timer.memo.len() as u64);

    let levels = vec![
        LevelBytes { level: "hbm".into(), bytes: traffic.hbm_read + traffic.hbm_write },
        LevelBytes { level: "l2".into(), bytes: traffic.l2 },
        LevelBytes { level: "smem".into(), bytes: traffic.smem },
        LevelBytes { level: "nvlink".into(), bytes: nvlink as u64 },
        LevelBytes { level: "network".into(), bytes: network as u64 },
    ];

    let mut notes = Vec::new();
    notes.push(format!(
        "attention: {}; launches: {}",
        match attention {
            AttentionImpl::Fused(FlashVariant::Fa3) =>
                "fused, FlashAttention-3 (wgmma, softmax overlapped with matmuls)",
            AttentionImpl::Fused(FlashVariant::Fa2) =>
                "fused, FlashAttention-2 (mma.sync, softmax serialized with matmuls)",
            AttentionImpl::Unfused => "unfused (batched GEMMs and a softmax kernel that writes the score matrix)",
        },
        if graphs {
            "CUDA graph replay (GPU-side gap per kernel)"
        } else {
            "eager (host launch cost per kernel, GPU-side gap)"
        }
    ));
    if workload.dtype == DType::Fp32 {
        notes.push("fp32 matmuls run on the FP32 pipes (PyTorch's default: TF32 off)".into());
    }
    if workload.dtype == DType::Fp8 {
        notes.push("fp8 GEMMs write bf16 outputs (cuBLASLt FP8 kernels)".into());
    }
    if gpus > 1 {
        notes.push(format!(
            "ranks: tensor-parallel groups of {} on {} node(s), data-parallel groups of {} on {} node(s), {} pipeline stage(s){}",
            layout.tp.size,
            layout.tp.nodes,
            layout.dp.size,
            layout.dp.nodes,
            stages,
            if stages > 1 {
                if layout.pp_inter_node {
                    " linked over the network"
                } else {
                    " linked over NVLink"
                }
            } else {
                ""
            }
        ));
    }
    if let Some(s) = spec {
        if par.tp > s.kv_heads {
            notes.push(format!("{} key/value heads replicated over {} tensor-parallel GPUs", s.kv_heads, par.tp));
        }
    }
    if stages > 1 {
        notes.push(format!(
            "1F1B over {} stages and {} micro-batches: bubble fraction {:.4} (equal stages: (P-1)/(M+P-1) = {:.4})",
            stages,
            m,
            sched.bubble_fraction,
            (stages - 1) as f64 / (m as f64 + stages as f64 - 1.0)
        ));
    }
    if train && par.dp > 1 {
        notes.push(format!(
            "data-parallel gradient all-reduce {} per GPU of stage {crit} overlapped with its last backward; {} exposed",
            human(dp_time[crit], "s"),
            human(dp_exposed[crit], "s")
        ));
    }
    if par.zero > 0 {
        notes.push(format!(
            "ZeRO-{}: {} sharded over {} data-parallel GPUs{}",
            par.zero,
            match par.zero {
                1 => "optimizer state",
                2 => "optimizer state and gradients",
                _ => "optimizer state, gradients and weights",
            },
            par.dp,
            if par.zero == 3 {
                format!("; weight all-gathers before each forward and backward expose {}", human(zero3[crit] * mf, "s"))
            } else {
                String::new()
            }
        ));
    }
    notes.push("L2 contents are simulated within each kernel; they do not carry over between kernels".into());

    let wsum = &full.workload;
    let mode = if gpus > 1 || par.zero > 0 {
        let mut s = format!("tp={} pp={} dp={}", par.tp, par.pp, par.dp);
        if m > 1 {
            s.push_str(&format!(" microbatches={m}"));
        }
        if par.zero > 0 {
            s.push_str(&format!(" zero={}", par.zero));
        }
        s
    } else {
        "single GPU".to_string()
    };
    let description = if sys.kind == "gpu-cluster" {
        format!(
            "{}: {} x {}, {} SMs at {} each",
            sys.description,
            gpus,
            gpu.description,
            gpu.sm.count,
            human(gpu.sm.clock_hz, "Hz")
        )
    } else {
        format!("{}, {} SMs at {}", gpu.description, gpu.sm.count, human(gpu.sm.clock_hz, "Hz"))
    };
    let report = RunReport {
        machine: MachineSummary {
            name: sys.name.clone(),
            kind: "gpu".into(),
            description,
            units: gpus,
            devices: gpus,
            clock_hz: gpu.sm.clock_hz,
            peak_flops_per_s: peak,
        },
        model: full.model.clone(),
        workload: WorkloadSummary {
            phase: wsum.phase.name().to_string(),
            batch: wsum.batch,
            seq: wsum.seq,
            context: wsum.context,
            dtype: wsum.dtype.name().to_string(),
            sparsity: wsum.sparsity,
            recompute: wsum.recompute,
            tokens: wsum.tokens(),
        },
        mode,
        fidelity: "kernel-model".into(),
        cycles: (step * gpu.sm.clock_hz).round() as u64,
        seconds: step,
        flops,
        achieved_flops_per_s: achieved,
        peak_fraction: if peak > 0.0 { achieved / peak } else { 0.0 },
        tokens_per_s: if step > 0.0 { wsum.tokens() as f64 / step } else { 0.0 },
        utilization,
        bottleneck,
        breakdown,
        counters,
        io_channels: Vec::new(),
        notes,
        gpu: Some(GpuDetails {
            levels,
            kernels,
            memory: MemoryFootprint {
                weights_bytes: worst.weights,
                gradients_bytes: worst.gradients,
                optimizer_bytes: worst.optimizer,
                activations_bytes: worst.activations,
                kv_cache_bytes: worst.kv_cache,
                total_bytes: worst.total(),
                capacity_bytes: capacity,
            },
        }),
        host: HostInfo {
            wall_seconds: 0.0,
            threads: 1,
            peak_rss_bytes: peak_rss_bytes(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
    };
    Ok(report)
}

fn does_not_fit(model: &Model, w: &Workload, sys: &GpuSystem, par: &Parallel, stage: u32, m: &StageMemory) -> GpuError {
    let mut parts = Vec::new();
    for (name, v) in [
        ("weights", m.weights),
        ("gradients", m.gradients),
        ("optimizer state", m.optimizer),
        ("activations", m.activations),
        ("KV cache", m.kv_cache),
    ] {
        if v > 0 {
            parts.push(format!("{name} {}", human(v as f64, "B")));
        }
    }
    let mut hint = String::from("spread it over more GPUs (--tp, --pp)");
    if w.phase == Phase::Train {
        if par.zero < 3 && par.dp > 1 {
            hint.push_str(", shard it over data parallelism (--zero 1|2|3)");
        }
        if !w.recompute {
            hint.push_str(", recompute activations (--recompute)");
        }
        hint.push_str(", or use more micro-batches (--microbatches)");
    } else {
        hint.push_str(" or shrink --batch / --context");
    }
    GpuError::DoesNotFit(Box::new(DoesNotFit {
        what: format!("{} ({} {}, {})", model.name(), w.phase.name(), w.dtype.name(), mode_text(par)),
        gpu: format!("{} ({})", sys.gpu.description, sys.name),
        stage,
        need_bytes: m.total(),
        capacity_bytes: sys.gpu.hbm.bytes,
        breakdown: parts.join(", "),
        hint,
    }))
}

fn mode_text(p: &Parallel) -> String {
    format!("tp={} pp={} dp={} zero={}", p.tp, p.pp, p.dp, p.zero)
}

/// Peak resident memory of this process (Linux; 0 elsewhere): host information only.
fn peak_rss_bytes() -> u64 {
    crate::engine::memory::status_bytes("VmHWM:").unwrap_or(0)
}

/// Lowered kernels of a run, for tests and tools that inspect the lowering.
pub fn lowered(model: &Model, workload: &Workload, sys: &GpuSystem, opts: &GpuOptions) -> Result<Lowered, GpuError> {
    let par = resolve_parallel(model, workload, sys, opts)?;
    let attention = resolve_attention(sys, opts.attention)?;
    let spec = match model {
        Model::Transformer(s) => Some(s),
        Model::Op(_) => None,
    };
    let micro_workload = match model {
        Model::Op(_) => workload.clone(),
        Model::Transformer(_) => Workload { batch: workload.batch / (par.dp * par.microbatches), ..workload.clone() },
    };
    let micro = graph::build(model, &micro_workload)?;
    let layout = Layout::new(&par, sys.node.gpus as u64);
    Ok(lower::lower(&micro, spec, par, layout, attention))
}
