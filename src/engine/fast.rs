//! Fast fidelity: the weight-streaming layer loop aggregated.
//!
//! Under weight streaming the layers fold into one loop: every region runs once per layer, on the same
//! PEs, with the same tiles, routes and IO channels, the layer's weights streaming in from MemoryX
//! while earlier layers compute. Iterations are alike but not independent: weights run ahead into the
//! fabric's buffers until they fill, and double buffering, the ports' turn-taking and the gathers' credits
//! make the steady state periodic over a few layers rather than constant. So fast fidelity emulates, in
//! full detail, two programs cut from the whole one (`compile::CompileOptions::layer_iters`): the loop
//! run `CUT[0]` and `CUT[1]` times (the first layers and the last; every decision taken as for all
//! layers), and extrapolates every quantity of the run by their difference over `P = CUT[1] - CUT[0]`
//! layers: `X(L) = X(b) + (L - b) (X(b) - X(a)) / P`. The loop's start, its transient and its end are
//! emulated, never assumed; counts (FLOPs, wavelets, hops, IO bytes) are linear in the layers and come
//! out exact, timing within the sweep's 2% (`tests/fast_fidelity.rs`; see `CUT` for what was measured).
//!
//! The extrapolated run is checked exactly against the whole program where the answer is known without
//! emulating it: its FLOPs equal the program's graph FLOPs and the bytes through every IO port equal the
//! plan's. A difference that shrinks (a loop that is not yet periodic) refuses the extrapolation, and the
//! caller runs the whole program instead.
//!
//! Everything else (pipelined programs, short loops, traces, values) runs the detailed engine.

use super::{AgentStats, EngineError, EngineRun, Fidelity, Path, Totals};
use crate::mesh::MeshProgram;

/// A step's runs in fast fidelity and the report's note on what was aggregated (or why not).
pub struct FastStep {
    pub runs: Vec<EngineRun>,
    pub note: String,
}

/// Why fast fidelity runs a program that is not weight streaming whole.
pub const ONLY_LOOPS: &str = "only a weight-streaming layer loop is aggregated";

/// Why fast fidelity runs a step whose weight-streaming loop has `layers` (None: not weight
/// streaming) whole before trying to cut it, if it does.
pub fn not_aggregated(layers: Option<u32>) -> Option<String> {
    match layers {
        None => Some(ONLY_LOOPS.into()),
        Some(l) if !aggregates(l) => {
            Some(format!("a loop of {l} layers is too short to aggregate (at least {MIN_LAYERS})"))
        }
        Some(_) => None,
    }
}

/// The report's note on a fast-fidelity run emulated whole.
pub fn whole_note(why: &str) -> String {
    format!("fast fidelity emulated this program whole, as detailed: {why}")
}

/// The programs of a step cut to `keep` loop iterations (`compile::CompileOptions::layer_iters`), or
/// why they cannot be.
pub type CutFn<'a> = &'a dyn Fn(u32) -> Result<Vec<(String, MeshProgram)>, String>;

/// Runs independent programs in detail, results in their order (`engine::run_each`: side by side when
/// threads allow).
pub type RunFn<'a> = &'a dyn Fn(&[&MeshProgram]) -> Vec<Result<EngineRun, EngineError>>;

/// Runs a step's `programs` (in order) in fast fidelity. `layers`: the weight-streaming loop's length
/// (None: not weight streaming). `cut` compiles the step with the loop cut; `run` runs programs in
/// detail. A loop of at least `MIN_LAYERS` is emulated cut to `CUT[0]` and `CUT[1]` iterations and
/// extrapolated; anything else, or a cut that does not lay out or extrapolate like the whole, runs whole.
/// The cut programs (every phase of both cuts) are independent and go to `run` together, the longer
/// cut first, so that runs side by side finish close together.
pub fn run_step(
    programs: &[(String, MeshProgram)],
    layers: Option<u32>,
    cut: CutFn,
    run: RunFn,
) -> Result<FastStep, EngineError> {
    let whole = |why: String| -> Result<FastStep, EngineError> {
        let progs: Vec<&MeshProgram> = programs.iter().map(|(_, p)| p).collect();
        let runs = run(&progs).into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(FastStep { runs, note: whole_note(&why) })
    };
    if let Some(why) = not_aggregated(layers) {
        return whole(why);
    }
    let layers = layers.unwrap_or(0);
    let mut cuts = Vec::new();
    for keep in CUT {
        let c = match cut(keep) {
            Ok(c) => c,
            Err(e) => return whole(format!("the loop cut to {keep} layers does not compile ({e})")),
        };
        if c.len() != programs.len() {
            return whole(format!("the loop cut to {keep} layers has other phases"));
        }
        for ((_, w), (_, x)) in programs.iter().zip(&c) {
            if let Some(why) = same_layout(w, x) {
                return whole(format!("the loop cut to {keep} layers is laid out differently: {why}"));
            }
        }
        cuts.push(c);
    }
    // The longer cut's programs first, then the shorter's: `ran[j * n + i]` is cut `CUT[1 - j]`'s phase i.
    let n = programs.len();
    let progs: Vec<&MeshProgram> = cuts.iter().rev().flat_map(|c| c.iter().map(|(_, p)| p)).collect();
    let mut ran = Vec::with_capacity(progs.len());
    for (k, r) in run(&progs).into_iter().enumerate() {
        // A cut that fails (a deadlock the whole loop would not have) leaves the answer to the whole.
        match r {
            Ok(r) => ran.push(r),
            Err(e) => return whole(format!("the loop cut to {} layers did not run ({e})", CUT[1 - k / n])),
        }
    }
    let mut runs = Vec::with_capacity(n);
    for (i, (_, whole_prog)) in programs.iter().enumerate() {
        let (a, b) = (&ran[n + i], &ran[i]);
        match extrapolate(a, b, layers, whole_prog) {
            Ok(r) => runs.push(r),
            Err(why) => return whole(format!("the cut loops do not extrapolate ({why})")),
        }
    }
    let [a, b] = CUT;
    let note = format!(
        "fast fidelity: the loop of {layers} layers was emulated for {a} and for {b} layers (the first ones and the \
         last, every PE, task run and train) and extrapolated by their difference; its FLOPs and IO bytes match the \
         whole program exactly"
    );
    Ok(FastStep { runs, note })
}

/// Iterations of the two cut programs (each the first `n - 1` layers and the last). Measured on tiny
/// models of 40 layers (gpt, llama, neox; train, prefill, decode; every cut from 2 to 40 layers), the
/// per-layer time of training and prefill settles after up to eight layers into a period of up to
/// four, while weight-streaming decode (tiny layers, timing set by the weights' arrival) wanders
/// without a period: cuts (3, 4) were off by up to 11%, (8, 16) by up to 3.5% (decode; under 1% for
/// the rest), (12, 24) by up to 1.9% (2.05% on the sweep's 48-layer decode); (16, 32) on the sweep's
/// 64-layer models by at most 1.03% (decode; training and prefill within 0.75%). Once weights streamed
/// through every IO channel and residual adds were paced by their branch, (16, 32) put the 64-layer
/// decode at +3.48%, and (20, 40) the 80-layer gpt-tiny training at +2.27% (its period of 4 to 8
/// layers does not divide 20); (24, 48) holds the sweep's 96-layer models within 0.87% (decode -0.04%).
pub const CUT: [u32; 2] = [24, 48];

/// Loops at least this long are aggregated (the two cuts emulate `CUT[0] + CUT[1]` layers).
pub const MIN_LAYERS: u32 = 2 * CUT[1];

/// Whether fast fidelity aggregates a loop of `layers` iterations.
pub fn aggregates(layers: u32) -> bool {
    layers >= MIN_LAYERS
}

/// Layers between the two cuts.
const P: u64 = (CUT[1] - CUT[0]) as u64;

/// `b + more * (b - a) / P`, or None when `b < a` (not a loop that grows).
fn ext(a: u64, b: u64, more: u64) -> Option<u64> {
    b.checked_sub(a).map(|d| b + (more as u128 * d as u128 / P as u128) as u64)
}

/// Like `ext`, for quantities that need not grow (a stall that one cut has and the other not): never
/// below `b`.
fn ext_sat(a: u64, b: u64, more: u64) -> u64 {
    ext(a, b, more).unwrap_or(b)
}

/// Why the cut program `cut` is not the whole program `whole` with a shorter loop (None: it is): the
/// same regions on the same rectangles with the same algorithms, the same tiles and IO ports.
pub fn same_layout(whole: &MeshProgram, cut: &MeshProgram) -> Option<String> {
    let regions = |p: &MeshProgram| -> Vec<(String, crate::mesh::Rect, String)> {
        p.regions.iter().map(|r| (r.name.clone(), r.rect, r.algorithm.clone())).collect()
    };
    let ports = |p: &MeshProgram| -> Vec<(crate::mesh::Coord, u64, u64)> {
        p.ports.iter().map(|x| (x.at, x.wavelets, x.per_cycles)).collect()
    };
    let tiles = |p: &MeshProgram| -> Vec<crate::mesh::Rect> { p.tiles.iter().map(|t| t.rect).collect() };
    if regions(whole) != regions(cut) {
        Some("its regions differ".into())
    } else if ports(whole) != ports(cut) {
        Some("its IO ports differ".into())
    } else if tiles(whole) != tiles(cut) {
        Some("its tiles differ".into())
    } else {
        None
    }
}

/// The run of the whole loop of `layers` iterations from the runs of the cut programs of `CUT[0]`
/// (`a`) and `CUT[1]` (`b`) iterations, checked against `whole` (the program of every layer): FLOPs and
/// each port's bytes must come out exactly as the whole program's.
/// Err names what does not extrapolate.
pub fn extrapolate(a: &EngineRun, b: &EngineRun, layers: u32, whole: &MeshProgram) -> Result<EngineRun, String> {
    let more = u64::from(layers.saturating_sub(CUT[1]));
    let lin = |what: &str, x: u64, y: u64| {
        ext(x, y, more).ok_or_else(|| format!("{what} shrinks from {x} to {y} with one more layer"))
    };
    if a.agents.len() != b.agents.len() || a.totals.io_bytes.len() != b.totals.io_bytes.len() {
        return Err("the cut programs have different agents".into());
    }
    let cycles = lin("cycles", a.cycles, b.cycles)?;
    let io_bytes = a
        .totals
        .io_bytes
        .iter()
        .zip(&b.totals.io_bytes)
        .map(|(&x, &y)| lin("port bytes", x, y))
        .collect::<Result<Vec<u64>, String>>()?;
    let io_busy = a.totals.io_busy.iter().zip(&b.totals.io_busy).map(|(&x, &y)| ext_sat(x, y, more)).collect();
    let totals = Totals {
        events: ext_sat(a.totals.events, b.totals.events, more),
        flops: lin("FLOPs", a.totals.flops, b.totals.flops)?,
        wavelets_sent: lin("wavelets sent", a.totals.wavelets_sent, b.totals.wavelets_sent)?,
        wavelets_delivered: lin("wavelets delivered", a.totals.wavelets_delivered, b.totals.wavelets_delivered)?,
        wavelet_hops: lin("wavelet hops", a.totals.wavelet_hops, b.totals.wavelet_hops)?,
        relays: lin("relays", a.totals.relays, b.totals.relays)?,
        io_bytes,
        io_busy,
    };
    if whole.graph_flops != 0 && totals.flops != whole.graph_flops {
        return Err(format!(
            "the extrapolated FLOPs {} differ from the whole program's {}",
            totals.flops, whole.graph_flops
        ));
    }
    for (port, &bytes) in whole.ports.iter().zip(&totals.io_bytes) {
        if bytes != port.planned_bytes {
            return Err(format!(
                "port {} would carry {bytes} bytes, the whole program's plan says {}",
                port.name, port.planned_bytes
            ));
        }
    }
    let agents = a
        .agents
        .iter()
        .zip(&b.agents)
        .map(|(x, y)| AgentStats {
            busy: ext_sat(x.busy, y.busy, more),
            stalled: ext_sat(x.stalled, y.stalled, more),
            runs: ext_sat(x.runs, y.runs, more),
            flops: ext_sat(x.flops, y.flops, more),
            first_start: y.first_start,
            last_finish: if y.runs == 0 { y.last_finish } else { ext_sat(x.last_finish, y.last_finish, more) },
        })
        .collect();
    // Link-busy cycles are additive; the utilisation is their share of the longer run.
    let busy_links = |r: &EngineRun| r.fabric_utilization * r.cycles as f64;
    let (la, lb) = (busy_links(a), busy_links(b));
    let link_cycles = lb + more as f64 * (lb - la).max(0.0) / P as f64;
    let fabric_utilization = if cycles == 0 { 0.0 } else { link_cycles / cycles as f64 };
    let mut path = Path::default();
    for (i, p) in path.0.iter_mut().enumerate() {
        *p = ext_sat(a.critical_path.0[i], b.critical_path.0[i], more);
    }
    Ok(EngineRun {
        cycles,
        totals,
        agents,
        fabric_utilization,
        critical_path: path,
        recording: None,
        fidelity: Fidelity::Fast,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::synth;

    /// A run with `layers` iterations of a loop that costs `per` cycles, 10 FLOPs and 4 port bytes per
    /// layer after a start of 100 cycles.
    fn run(layers: u64, per: u64) -> EngineRun {
        let agent = AgentStats {
            busy: 5 * layers,
            stalled: 0,
            runs: layers,
            flops: 10 * layers,
            first_start: 3,
            last_finish: 100 + per * layers,
        };
        EngineRun {
            cycles: 100 + per * layers,
            totals: Totals { events: layers, flops: 10 * layers, io_bytes: vec![4 * layers], ..Totals::default() },
            agents: vec![agent],
            fabric_utilization: 0.5,
            critical_path: Path([100 + per * layers, 0, 0, 0, 0, 0]),
            recording: None,
            fidelity: Fidelity::Detailed,
        }
    }

    fn whole(layers: u64) -> MeshProgram {
        let hw = crate::hw::WaferHw::from_doc(&crate::hw::load_with_overrides("wse2", &[]).unwrap()).unwrap();
        let mut p = synth::gemv(&hw.with_mesh(4, 4).unwrap(), 64, 64, 4, 4);
        p.graph_flops = 10 * layers;
        p.ports.truncate(0);
        p
    }

    #[test]
    fn a_steady_loop_extrapolates_exactly() {
        let (a, b) = (run(CUT[0] as u64, 7), run(CUT[1] as u64, 7));
        let (r, want) = (extrapolate(&a, &b, 100, &whole(100)).unwrap(), run(100, 7));
        assert_eq!(
            (r.cycles, &r.totals, &r.agents, r.critical_path),
            (want.cycles, &want.totals, &want.agents, want.critical_path)
        );
        assert_eq!(r.fidelity, Fidelity::Fast);
        assert!((r.fabric_utilization - 0.5).abs() < 0.01, "{}", r.fabric_utilization);
    }

    #[test]
    fn a_loop_that_shrinks_or_misses_the_whole_programs_flops_is_refused() {
        let (a, b) = (run(CUT[0] as u64, 7), run(CUT[1] as u64, 7));
        assert!(extrapolate(&b, &a, 100, &whole(100)).unwrap_err().contains("shrinks"));
        assert!(extrapolate(&a, &b, 100, &whole(99)).unwrap_err().contains("FLOPs"));
    }
}
