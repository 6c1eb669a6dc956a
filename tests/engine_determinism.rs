//! Determinism: the same program gives bit-identical results for any thread count, on meshes large
//! enough to be cut into several partitions (trains cross partition boundaries).

use waferscale::engine::{self, synth, EngineOptions, Fidelity};
use waferscale::hw::{load_with_overrides, WaferHw};

#[test]
fn one_and_many_threads_agree_exactly() {
    for (w, h) in [(130u32, 70u32), (200, 200)] {
        let hw = WaferHw::from_doc(&load_with_overrides("wse2", &[]).unwrap())
            .unwrap()
            .with_mesh(w, h)
            .unwrap();
        let prog = synth::gemv(&hw, 4096, 4096, w, h);
        let run = |threads| {
            engine::run(
                &prog,
                &EngineOptions {
                    fidelity: Fidelity::Detailed,
                    threads,
                },
            )
            .unwrap()
        };
        let one = run(1);
        for threads in [2, 3, 8] {
            let many = run(threads);
            assert_eq!(one.cycles, many.cycles, "{w}x{h}, {threads} threads");
            assert_eq!(one.totals, many.totals, "{w}x{h}, {threads} threads");
            assert_eq!(one.agents, many.agents, "{w}x{h}, {threads} threads");
        }
        assert_eq!(one.totals.flops, prog.graph_flops);
    }
}
