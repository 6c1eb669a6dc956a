//! The compiled all-reduce against its closed form: the program `wafer compile allreduce:N` emits,
//! run on the engine. Rows reduce toward the centre column from both sides, the centre column toward
//! the centre PE, and the centre multicasts the sum back, so the whole costs about one mesh diameter
//! (Rocki et al. SC20: about 1.1x the diameter, shared/reference/wafer.md).

use waferscale::compile::{self, CompileOptions};
use waferscale::engine::{self, EngineOptions, Fidelity};
use waferscale::graph;
use waferscale::hw::{load_with_overrides, WaferHw};
use waferscale::model::{self, WorkloadArgs};

/// Engine cycles of `allreduce:bytes` on a w x h WSE-2 mesh, and (hop, ramp, pick) of the machine.
fn run(bytes: u64, w: u32, h: u32) -> (u64, (u64, u64, u64)) {
    let m = model::load(&format!("allreduce:{bytes}")).unwrap();
    let wl = WorkloadArgs::default().resolve(&m).unwrap();
    let g = graph::build(&m, &wl).unwrap();
    let hw = WaferHw::from_doc(&load_with_overrides("wse2", &[]).unwrap()).unwrap().with_mesh(w, h).unwrap();
    let c = compile::compile(
        &g,
        &hw,
        &CompileOptions { mode: None, wafers: 1, verify: true, micro_batches: None, layer_iters: None },
    )
    .unwrap();
    let p = c.program();
    let t = &p.timing;
    let r = engine::run(p, &EngineOptions::new(Fidelity::Detailed, 2)).unwrap();
    (r.cycles, (t.hop_cycles as u64, t.ramp_cycles as u64, t.pick_cycles as u64))
}

/// One wavelet (4 bytes): diameter D = (w - 1) + (h - 1) hops, plus four reduction stages (a member's
/// train into its leader and the leader's into the centre, in each of the two phases) of
/// 2 ramp + pick + 1 add each, plus the broadcast's ramps and the receiving pick:
///   S = D x hop + 4 x (2 ramp + pick + 1) + 2 ramp + pick.
/// Tolerance: one-wavelet trains that meet at a leader or at the centre go through one link and one
/// ramp one after another, at most about 2 sqrt(D) cycles; so S <= cycles <= S + 2 sqrt(D). On
/// 420 x 420 (WaferLLM's and Rocki's scale) this is within 1.1x the diameter.
#[test]
fn one_wavelet_allreduce_is_about_one_diameter() {
    for (w, h) in [(20u32, 20u32), (33, 17), (100, 100), (420, 420)] {
        let (cycles, (hop, ramp, pick)) = run(4, w, h);
        let d = (w + h - 2) as u64;
        let s = d * hop + 4 * (2 * ramp + pick + 1) + 2 * ramp + pick;
        let slack = 2.0 * (d as f64).sqrt();
        println!(
            "allreduce:4 {w}x{h}: {cycles} cycles, closed form {s} (+{slack:.0}), {:.3}x the diameter",
            cycles as f64 / d as f64
        );
        assert!(cycles >= s && (cycles as f64) <= s as f64 + slack, "{w}x{h}: {cycles} vs {s} + {slack:.0}");
        if w == 420 {
            assert!(cycles as f64 <= 1.1 * d as f64, "{cycles} cycles for diameter {d}");
        }
    }
}

/// A long vector (4096 bytes, 1024 wavelets of fp16 pairs) pipelines along the chains: each PE adds
/// the running sum as it arrives and streams it on, so the buffer's length is paid a fixed number of
/// times, not once per hop. The meeting PE takes in at least one row chain, one column chain and its
/// own broadcast through its one ramp (3 x wavelets); at most both sides of both (a meeting point off the
/// middle lets the nearer side's buffer in while the farther side's head is on its way) and the
/// broadcast, 5 x wavelets, plus, per chain stage, a hop, two ramps, a pick and an add of the head's
/// latency:
///   3 x wl <= cycles <= 5 x wl + D x (hop + 2 ramp + pick + 1) + 100.
/// (The reduce-to-a-corner tree it replaces took 96,655 cycles on 420 x 420, 40,194 on 100 x 100.)
#[test]
fn long_vector_allreduce_pipelines() {
    for (w, h) in [(3u32, 3u32), (100, 100), (420, 420)] {
        let (cycles, (hop, ramp, pick)) = run(4096, w, h);
        let (d, wl) = ((w + h - 2) as u64, 1024u64);
        let hi = 5 * wl + d * (hop + 2 * ramp + pick + 1) + 100;
        println!("allreduce:4096 {w}x{h}: {cycles} cycles, bounds [{}, {hi}]", 3 * wl);
        assert!(cycles >= 3 * wl && cycles <= hi, "{w}x{h}: {cycles} not in [{}, {hi}]", 3 * wl);
    }
}
