//! Turns an engine run into the shared `RunReport`.

use std::collections::BTreeMap;

use super::{EngineRun, Res};
use crate::hw::{SimdOp, WaferHw};
use crate::mesh::MeshProgram;
use crate::mesh::Peer;
use crate::model::DType;
use crate::report::{
    channel_utilization, io_utilization, Bottleneck, HostInfo, IoChannel, MachineSummary, OpRow, RunReport,
    Utilization, WorkloadSummary,
};

/// What the report needs besides the run: who ran what, how.
pub struct ReportContext<'a> {
    pub hw: &'a WaferHw,
    pub model: String,
    pub workload: WorkloadSummary,
    pub dtype: DType,
    /// `pipelined`, `weight-streaming`, `multi-wafer`.
    pub mode: String,
    pub notes: Vec<String>,
    pub host: HostInfo,
}

/// Dense peak FLOP/s of the mesh in use for `dtype` (a multiply-accumulate is two FLOPs).
pub fn peak_flops_per_s(hw: &WaferHw, dtype: DType) -> f64 {
    let op = match dtype {
        DType::Fp32 => SimdOp::FmacF32,
        _ => SimdOp::FmacF16,
    };
    let (n, per) = hw.pe.rate(op);
    hw.mesh.pes() as f64 * 2.0 * n as f64 / per as f64 * hw.clock_hz
}

/// How a step's programs relate: wafers side by side (their peak adds up), and micro-batches run one
/// after the other through the same programs.
#[derive(Clone, Copy, Debug)]
pub struct StepShape {
    pub wafers: u64,
    pub micro_batches: u64,
}

/// The report of one step from the runs of its programs in order (`compile::Compiled::step_programs`):
/// each program's report, the phases added up (`RunReport::in_sequence`), micro-batches counted
/// (`RunReport::repeated`), and several wafers' peak. `None` when there are no runs.
pub fn build_step(
    programs: &[(String, MeshProgram)],
    runs: &[EngineRun],
    ctx: ReportContext,
    shape: StepShape,
) -> Option<RunReport> {
    let phases: Vec<(String, RunReport)> = programs
        .iter()
        .zip(runs)
        .map(|((name, program), run)| {
            let c = ReportContext {
                hw: ctx.hw,
                model: ctx.model.clone(),
                workload: ctx.workload.clone(),
                dtype: ctx.dtype,
                mode: ctx.mode.clone(),
                notes: ctx.notes.clone(),
                host: ctx.host.clone(),
            };
            (name.clone(), build(program, run, c))
        })
        .collect();
    let mut report = RunReport::in_sequence(phases)?.repeated(shape.micro_batches);
    if shape.wafers > 1 {
        report.machine.devices = shape.wafers;
        report.machine.peak_flops_per_s *= shape.wafers as f64;
        report.peak_fraction /= shape.wafers as f64;
    }
    Some(report)
}

pub fn build(program: &MeshProgram, run: &EngineRun, ctx: ReportContext) -> RunReport {
    let hw = ctx.hw;
    let cycles = run.cycles.max(1);
    let seconds = run.cycles as f64 / hw.clock_hz;
    let flops = run.totals.flops;
    let achieved = if seconds > 0.0 { flops as f64 / seconds } else { 0.0 };
    let peak = peak_flops_per_s(hw, ctx.dtype);
    let pes = program.mesh.pes();
    let n_pes = pes as usize;
    let busy: u64 = run.agents[..n_pes].iter().map(|a| a.busy).sum();
    let io_channels: Vec<IoChannel> = program
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let bytes = run.totals.io_bytes.get(i).copied().unwrap_or(0);
            let bytes_per_cycle = p.wavelets as f64 * 4.0 / p.per_cycles as f64;
            IoChannel {
                name: p.name.clone(),
                peer: match p.peer {
                    Peer::Host => "host".into(),
                    Peer::MemoryX => "memoryx".into(),
                    Peer::SwarmX => "swarmx".into(),
                    Peer::Wafer(w) => format!("wafer{w}"),
                },
                bytes,
                bytes_per_cycle,
                cycles_busy: run.totals.io_busy.get(i).copied().unwrap_or(0),
                utilization: channel_utilization(bytes, bytes_per_cycle, cycles),
            }
        })
        .collect();
    let io_bytes: u64 = run.totals.io_bytes.iter().sum();
    let sram_used = program.sram_bytes();
    let utilization = Utilization {
        compute: busy as f64 / (pes as f64 * cycles as f64),
        fabric: run.fabric_utilization,
        io: io_utilization(&io_channels, cycles),
        memory: sram_used as f64 / (pes as f64 * program.timing.sram_bytes as f64),
    };
    let total_path = run.critical_path.total().max(1) as f64;
    let shares: BTreeMap<String, f64> =
        Res::ALL.iter().map(|r| (r.name().to_string(), run.critical_path.0[*r as usize] as f64 / total_path)).collect();
    let dominant = Res::ALL
        .iter()
        .max_by_key(|r| (run.critical_path.0[**r as usize], std::cmp::Reverse(**r as usize)))
        .map_or("compute", |r| r.name())
        .to_string();
    let breakdown = regions(program, run);
    let tokens = ctx.workload.tokens as f64;
    let mut counters = BTreeMap::new();
    counters.insert("wavelets".to_string(), run.totals.wavelets_sent);
    counters.insert("wavelets_delivered".to_string(), run.totals.wavelets_delivered);
    counters.insert("wavelet_hops".to_string(), run.totals.wavelet_hops);
    counters.insert("io_bytes".to_string(), io_bytes);
    counters.insert("relays".to_string(), run.totals.relays);
    counters.insert("sram_bytes".to_string(), sram_used);
    RunReport {
        machine: MachineSummary {
            name: hw.name.clone(),
            kind: "wafer".into(),
            description: format!(
                "{} PEs ({} x {}) at {:.0} MHz{}",
                pes,
                program.mesh.width,
                program.mesh.height,
                hw.clock_hz / 1e6,
                hw.io.map_or(String::new(), |io| format!(
                    ", {} IO ports, {:.1} Tb/s",
                    io.ports,
                    io.system_bits_per_s / 1e12
                ))
            ),
            units: pes,
            devices: 1,
            clock_hz: hw.clock_hz,
            peak_flops_per_s: peak,
        },
        model: ctx.model,
        workload: ctx.workload,
        mode: ctx.mode,
        fidelity: run.fidelity.name().to_string(),
        cycles: run.cycles,
        seconds,
        flops,
        achieved_flops_per_s: achieved,
        peak_fraction: if peak > 0.0 { achieved / peak } else { 0.0 },
        tokens_per_s: if seconds > 0.0 { tokens / seconds } else { 0.0 },
        utilization,
        bottleneck: Bottleneck { dominant, shares },
        breakdown,
        counters,
        io_channels,
        notes: ctx.notes,
        gpu: None,
        host: ctx.host,
    }
}

/// Per region: PEs, FLOPs, busy / stalled / idle cycles, span, and what bounds it.
fn regions(program: &MeshProgram, run: &EngineRun) -> Vec<OpRow> {
    let width = program.mesh.width;
    let mut rows: Vec<OpRow> = program
        .regions
        .iter()
        .map(|r| OpRow { name: r.name.clone(), kind: r.kind.clone(), ..Default::default() })
        .collect();
    let mut span: Vec<(u64, u64)> = vec![(u64::MAX, 0); rows.len()];
    for tile in &program.tiles {
        let region = program.templates[tile.template.0 as usize].region.0 as usize;
        let Some(row) = rows.get_mut(region) else { continue };
        let r = tile.rect;
        for y in r.y..r.y + r.h {
            for x in r.x..r.x + r.w {
                let a = &run.agents[(y * width + x) as usize];
                row.units += 1;
                row.flops += a.flops;
                row.cycles_busy += a.busy;
                row.cycles_stalled += a.stalled;
                if a.runs > 0 {
                    span[region].0 = span[region].0.min(a.first_start);
                    span[region].1 = span[region].1.max(a.last_finish);
                }
            }
        }
    }
    let clock = program.timing.clock_hz;
    for (row, (first, last)) in rows.iter_mut().zip(span) {
        row.cycles_idle = (row.units * run.cycles).saturating_sub(row.cycles_busy + row.cycles_stalled);
        row.seconds = if last > first { (last - first) as f64 / clock } else { 0.0 };
        row.bound = if row.cycles_stalled > row.cycles_busy { "fabric".into() } else { "compute".into() };
    }
    rows
}
