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

/// Independent programs run side by side (`engine::run_each`: a step's phases, fast fidelity's cut
/// loops) give, in their order, exactly what running them one after the other gives; a failing one
/// fails alone.
#[test]
fn programs_run_side_by_side_agree_with_runs_one_after_the_other() {
    let hw = WaferHw::from_doc(&load_with_overrides("wse2", &[]).unwrap()).unwrap();
    let small = hw.clone().with_mesh(70, 40).unwrap();
    let large = hw.with_mesh(130, 70).unwrap();
    let mut broken = synth::gemv_tree(&small, 1024, 1024, 70, 40, 6);
    broken.tiles.clear(); // no PE runs anything: the program's trains have nowhere to go
    let progs = [
        synth::gemv_tree(&large, 4096, 4096, 130, 70, 12),
        synth::gemv_tree(&small, 2048, 1024, 70, 40, 6),
        broken,
        synth::gemv(&small, 1024, 2048, 70, 40),
    ];
    let opts = |threads| EngineOptions { fidelity: Fidelity::Detailed, threads, trace: None, progress: None };
    let alone: Vec<_> = progs.iter().map(|p| engine::run(p, &opts(1))).collect();
    let refs: Vec<&_> = progs.iter().collect();
    for threads in [1, 2, 3, 5] {
        let together = engine::run_each(&refs, &|_| opts(threads));
        assert_eq!(together.len(), progs.len());
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            match (a, t) {
                (Ok(a), Ok(t)) => {
                    assert_eq!((a.cycles, &a.totals, &a.agents), (t.cycles, &t.totals, &t.agents), "{i}, {threads}");
                    assert_eq!(a.critical_path, t.critical_path, "{i}, {threads}");
                }
                (Err(a), Err(t)) => assert_eq!(a.to_string(), t.to_string(), "{i}, {threads}"),
                _ => panic!("program {i} with {threads} threads: {:?} alone, {:?} side by side", a.is_ok(), t.is_ok()),
            }
        }
    }
    assert!(alone[2].is_err() && alone.iter().filter(|r| r.is_ok()).count() == 3);
    // A progress bar side by side shows the furthest run's cycle, whichever run published last.
    let shown = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let with_bar = |_: &_| EngineOptions { progress: Some(std::sync::Arc::clone(&shown)), ..opts(2) };
    engine::run_each(&refs, &with_bar);
    let longest = alone.iter().flatten().map(|r| r.cycles).max().unwrap();
    let reached = shown.load(std::sync::atomic::Ordering::Relaxed);
    assert!(reached > longest / 2 && reached <= longest, "progress {reached} of {longest} cycles");
}
