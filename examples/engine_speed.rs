//! Quick engine speed probe on the synthetic GEMV: `cargo run --release --example engine_speed -- 64 64`.
use std::time::Instant;
use waferscale::engine::{self, synth, EngineOptions, Fidelity};
use waferscale::hw::{load_with_overrides, WaferHw};

fn main() {
    let args: Vec<u32> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (w, h) = (args.first().copied().unwrap_or(64), args.get(1).copied().unwrap_or(64));
    let k = args.get(2).copied().unwrap_or(16384) as u64;
    let threads = args.get(3).copied().unwrap_or(1) as usize;
    let hw = WaferHw::from_doc(&load_with_overrides("wse2", &[]).unwrap()).unwrap().with_mesh(w, h).unwrap();
    let t0 = Instant::now();
    let group = args.get(4).copied().unwrap_or(0);
    let prog = if group > 0 { synth::gemv_tree(&hw, k, k, w, h, group) } else { synth::gemv(&hw, k, k, w, h) };
    let t1 = Instant::now();
    let run = engine::run(&prog, &EngineOptions { fidelity: Fidelity::Detailed, threads, trace: None, progress: None })
        .unwrap();
    let t2 = Instant::now();
    let secs = (t2 - t1).as_secs_f64();
    let totals = &run.totals;
    println!(
        "  totals: flops {} sent {} delivered {} hops {}",
        totals.flops, totals.wavelets_sent, totals.wavelets_delivered, totals.wavelet_hops
    );
    let pe_cycles = run.cycles as f64 * (w as f64 * h as f64);
    println!(
        "{w}x{h} gemv {k}x{k} threads {threads}: {} cycles ({:.3} us at 850 MHz), {} events, build {:.3}s, run {:.3}s, {:.1} M PE-cycles/s, {:.2} M events/s",
        run.cycles,
        run.cycles as f64 / 850.0,
        run.totals.events,
        (t1 - t0).as_secs_f64(),
        secs,
        pe_cycles / secs / 1e6,
        run.totals.events as f64 / secs / 1e6
    );
}
