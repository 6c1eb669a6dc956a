//! Graph construction speed: the largest shipped model's training step (target: under 1 s).

use criterion::{criterion_group, criterion_main, Criterion};
use waferscale::graph;
use waferscale::model::{self, Phase, WorkloadArgs};

fn bench_graph(c: &mut Criterion) {
    let m = model::load("llama-3.1-405b").unwrap();
    let w = WorkloadArgs { phase: Some(Phase::Train), ..Default::default() }.resolve(&m).unwrap();
    c.bench_function("graph llama-3.1-405b train", |b| b.iter(|| graph::build(&m, &w).unwrap()));
    let m = model::load("gpt2-small").unwrap();
    let w = WorkloadArgs { phase: Some(Phase::Train), batch: Some(8), ..Default::default() }.resolve(&m).unwrap();
    c.bench_function("graph gpt2-small train", |b| b.iter(|| graph::build(&m, &w).unwrap()));
}

criterion_group!(benches, bench_graph);
criterion_main!(benches);
