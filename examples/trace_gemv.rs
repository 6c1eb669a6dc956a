//! Writes the trace of the synthetic GEMV with a two-level tree reduction (`engine::synth::gemv_tree`)
//! on a W x H mesh of WSE-2: the benchmark of trace writing (BENCHMARKS.md) and a quick way to get a
//! trace to look at, until `wafer run --trace` exists.
//!
//!   cargo run --release --example trace_gemv -- OUT.wtrace [W H [K [THREADS [fast|detailed [BUDGET_BYTES]]]]]
//!   cargo run --release --example trace_gemv -- full.wtrace 757 996 16384 2 fast
use std::time::Instant;

use waferscale::engine::{self, synth, EngineOptions, Fidelity};
use waferscale::hw::{load_with_overrides, WaferHw};
use waferscale::report::WorkloadSummary;
use waferscale::trace::{self, TraceHeader, TraceOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: u64| args.get(i).map_or(d, |a| a.parse().expect("a number"));
    let out = args.first().cloned().unwrap_or_else(|| "gemv.wtrace".into());
    let (w, h) = (arg(1, 64) as u32, arg(2, 64) as u32);
    let k = arg(3, 4096);
    let threads = arg(4, 1) as usize;
    let fidelity = match args.get(5).map(String::as_str) {
        Some("fast") => Fidelity::Fast,
        _ => Fidelity::Detailed,
    };
    let opts = TraceOptions { budget_bytes: arg(6, trace::DEFAULT_BUDGET_BYTES), window_cycles: None };
    let hw = WaferHw::from_doc(&load_with_overrides("wse2", &[]).unwrap()).unwrap().with_mesh(w, h).unwrap();
    let prog = synth::gemv_tree(&hw, k, k, w, h, 32.min(h));
    let spec = trace::spec_for(&prog, &opts);
    let t0 = Instant::now();
    let run =
        engine::run(&prog, &EngineOptions { fidelity, threads, trace: Some(spec.clone()), progress: None }).unwrap();
    let t1 = Instant::now();
    let workload = WorkloadSummary {
        phase: "decode".into(),
        batch: 1,
        seq: 1,
        context: 0,
        dtype: "fp16".into(),
        sparsity: 0.0,
        recompute: false,
        tokens: 1,
    };
    let header = TraceHeader::for_run(&format!("gemv:{k}x{k}"), workload, "wse2", "pipelined", &prog, &run);
    let info = trace::write(&out, &header, &prog, &run, &opts).unwrap();
    let t2 = Instant::now();
    println!("{w}x{h} gemv-tree {k}x{k}, {} fidelity, {threads} threads: {} cycles", fidelity.name(), run.cycles);
    println!("recording: up to {} windows, {} sampled agents", spec.max_windows, spec.sample.len());
    println!("run {:.2} s, trace write {:.2} s", (t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
    println!("{out}: {}", info.message());
}
