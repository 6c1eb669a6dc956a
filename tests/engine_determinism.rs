//! Determinism: the same program gives bit-identical results for any thread count, on meshes large
//! enough to be cut into several partitions (trains cross partition boundaries).

use waferscale::engine::{self, synth, EngineOptions, Fidelity};
use waferscale::hw::{load_with_overrides, WaferHw};

#[test]
fn one_and_many_threads_agree_exactly() {
    for (w, h) in [(130u32, 70u32), (200, 140)] {
        let hw = WaferHw::from_doc(&load_with_overrides("wse2", &[]).unwrap()).unwrap().with_mesh(w, h).unwrap();
        let prog = synth::gemv_tree(&hw, 4096, 4096, w, h, 12);
        let run = |threads| {
            engine::run(&prog, &EngineOptions { fidelity: Fidelity::Detailed, threads, trace: None, progress: None })
                .unwrap()
        };
        let one = run(1);
        for threads in [2, 3] {
            let many = run(threads);
            assert_eq!(one.cycles, many.cycles, "{w}x{h}, {threads} threads");
            assert_eq!(one.totals, many.totals, "{w}x{h}, {threads} threads");
            assert_eq!(one.agents, many.agents, "{w}x{h}, {threads} threads");
        }
        assert_eq!(one.totals.flops, prog.graph_flops);
    }
}

/// Traces record the same bins and spans for any thread count, and their busy cycles add up to the
/// engine's own per-PE statistics.
#[test]
fn recordings_agree_across_threads_and_with_stats() {
    use waferscale::engine::record::{Metric, TraceSpec};
    let hw = WaferHw::from_doc(&load_with_overrides("wse2", &[]).unwrap()).unwrap().with_mesh(150, 80).unwrap();
    let prog = synth::gemv_tree(&hw, 4096, 4096, 150, 80, 9);
    let spec = TraceSpec { max_windows: 16, sample: vec![0, 75, 150 * 80 - 1] };
    let run = |threads| {
        engine::run(
            &prog,
            &EngineOptions { fidelity: Fidelity::Detailed, threads, trace: Some(spec.clone()), progress: None },
        )
        .unwrap()
    };
    let one = run(1);
    let two = run(2);
    assert_eq!(one.recording, two.recording);
    let rec = one.recording.as_ref().unwrap();
    assert!(rec.windows <= 16 && rec.window_cycles * rec.windows as u64 > one.cycles);
    for (pe, stats) in one.agents.iter().enumerate() {
        let busy: u64 = rec.bins[pe].iter().map(|b| b.1[Metric::Compute as usize]).sum();
        assert_eq!(busy, stats.busy, "PE {pe}");
    }
    assert_eq!(rec.spans.iter().filter(|s| s.agent == 0).count() as u64, one.agents[0].runs);
}
