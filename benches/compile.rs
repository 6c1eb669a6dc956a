//! Compile speed (targets, wafer compiler issue: each under 5 s on 2 cores): llama-3-8b pipelined
//! for decode over the full WSE-3, and llama-3.1-405b weight-streaming for training. Graph building
//! is outside the timed loop (see `benches/graph.rs`); the verifier is off, as in release builds.

use criterion::{criterion_group, criterion_main, Criterion};
use waferscale::compile::{self, CompileOptions, Mode};
use waferscale::graph;
use waferscale::hw::{load_with_overrides, WaferHw};
use waferscale::model::{self, Phase, WorkloadArgs};

fn bench_compile(c: &mut Criterion) {
    let hw = WaferHw::from_doc(&load_with_overrides("wse3", &[]).unwrap()).unwrap();
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    for (name, phase, mode) in
        [("llama-3-8b", Phase::Decode, Mode::Pipelined), ("llama-3.1-405b", Phase::Train, Mode::WeightStreaming)]
    {
        let m = model::load(name).unwrap();
        let w = WorkloadArgs { phase: Some(phase), ..Default::default() }.resolve(&m).unwrap();
        let g = graph::build(&m, &w).unwrap();
        let opts =
            CompileOptions { mode: Some(mode), wafers: 1, verify: false, micro_batches: None, layer_iters: None };
        group.bench_function(format!("{name} {} {mode} wse3", phase.name()), |b| {
            b.iter(|| compile::compile(&g, &hw, &opts).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench_compile);
criterion_main!(benches);
