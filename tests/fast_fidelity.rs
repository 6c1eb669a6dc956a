//! Fast fidelity against detailed. Fast fidelity aggregates a weight-streaming layer loop: it emulates
//! the loop cut to `CUT[0]` and `CUT[1]` layers and extrapolates (`engine::fast`). The tiny models have
//! two layers, too few to aggregate, so the sweep deepens them to `fast::MIN_LAYERS` layers (the same
//! layer, repeated), runs every layer in detail, and holds fast fidelity to 2% of the detailed cycles and
//! to the exact counts. Programs fast fidelity does not aggregate run whole: their reports equal detailed.

mod support;

use std::path::PathBuf;

use support::wafer_ok;
use waferscale::compile::{compile_model, CompileOptions, Mode};
use waferscale::engine::{self, fast, EngineOptions, EngineRun, Fidelity};
use waferscale::hw::WaferHw;
use waferscale::mesh::MeshProgram;
use waferscale::model::{self, Phase, WorkloadArgs};

/// A tiny model's config with `layers` layers, written once per test process.
fn deep(name: &str, layers: u32) -> PathBuf {
    let src = format!("{}/models/tiny/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    let key = if c.get("n_layer").is_some() { "n_layer" } else { "num_hidden_layers" };
    c[key] = serde_json::json!(layers);
    let path = std::env::temp_dir().join(format!("waferscale-fast-{}-{name}-{layers}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    path
}

/// Batch 1 of `seq` tokens (the context, in decode) in `phase`.
fn workload(m: &model::Model, phase: Phase, seq: u64) -> waferscale::model::Workload {
    WorkloadArgs { phase: Some(phase), batch: Some(1), seq: Some(seq), ..Default::default() }.resolve(m).unwrap()
}

fn hw(mesh: u32) -> WaferHw {
    let doc = waferscale::hw::load_with_overrides("wse2", &[]).unwrap();
    WaferHw::from_doc(&doc).unwrap().with_mesh(mesh, mesh).unwrap()
}

fn opts(layer_iters: Option<u32>, micro_batches: Option<u32>) -> CompileOptions {
    CompileOptions { mode: Some(Mode::WeightStreaming), wafers: 1, verify: false, micro_batches, layer_iters }
}

fn detailed(p: &MeshProgram) -> Result<EngineRun, engine::EngineError> {
    engine::run(p, &EngineOptions::new(Fidelity::Detailed, 2))
}

struct Case {
    model: &'static str,
    phase: Phase,
    seq: u64,
    mesh: u32,
}

/// (detailed runs, fast step) of one case.
fn both(c: &Case, layers: u32) -> (Vec<EngineRun>, fast::FastStep) {
    let m = model::load(deep(c.model, layers).to_str().unwrap()).unwrap();
    let w = workload(&m, c.phase, c.seq);
    let hw = hw(c.mesh);
    let (_, whole) = compile_model(&m, &w, &hw, &opts(None, None)).unwrap();
    assert_eq!(whole.plan.layers_folded, layers);
    let programs = whole.step_programs().unwrap();
    let det: Vec<EngineRun> = programs.iter().map(|(_, p)| detailed(p).unwrap()).collect();
    let cut = |keep: u32| -> Result<Vec<(String, MeshProgram)>, String> {
        let (_, c) =
            compile_model(&m, &w, &hw, &opts(Some(keep), Some(whole.micro_batches))).map_err(|e| e.to_string())?;
        c.step_programs().map_err(|e| e.to_string())
    };
    let run = |progs: &[&MeshProgram]| progs.iter().map(|p| detailed(p)).collect();
    let step = fast::run_step(&programs, Some(layers), &cut, &run).unwrap();
    (det, step)
}

#[test]
fn fast_fidelity_is_within_two_percent_of_detailed_on_deep_weight_streaming_loops() {
    let cases = [
        Case { model: "gpt-tiny", phase: Phase::Train, seq: 16, mesh: 32 },
        Case { model: "llama-tiny", phase: Phase::Train, seq: 16, mesh: 32 },
        Case { model: "neox-tiny", phase: Phase::Train, seq: 32, mesh: 48 },
        Case { model: "gpt-tiny", phase: Phase::Prefill, seq: 64, mesh: 32 },
        Case { model: "llama-tiny", phase: Phase::Decode, seq: 16, mesh: 24 },
    ];
    let mut worst: f64 = 0.0;
    for c in &cases {
        let (det, step) = both(c, fast::MIN_LAYERS);
        assert!(
            step.note.contains(&format!("emulated for {} and for {} layers", fast::CUT[0], fast::CUT[1])),
            "{}: {}",
            c.model,
            step.note
        );
        let d: u64 = det.iter().map(|r| r.cycles).sum();
        let f: u64 = step.runs.iter().map(|r| r.cycles).sum();
        let err = (f as f64 - d as f64) / d as f64;
        println!(
            "{} {:?} seq {} on {}x{}: detailed {d} cycles, fast {f} ({:+.2}%)",
            c.model,
            c.phase,
            c.seq,
            c.mesh,
            c.mesh,
            100.0 * err
        );
        assert!(err.abs() <= 0.02, "{}: fast fidelity off by {:.2}%", c.model, 100.0 * err);
        worst = worst.max(err.abs());
        for (x, y) in det.iter().zip(&step.runs) {
            // Counts are linear in the layers: exact.
            assert_eq!(x.totals.flops, y.totals.flops, "{}", c.model);
            assert_eq!(x.totals.wavelets_sent, y.totals.wavelets_sent, "{}", c.model);
            assert_eq!(x.totals.wavelets_delivered, y.totals.wavelets_delivered, "{}", c.model);
            assert_eq!(x.totals.wavelet_hops, y.totals.wavelet_hops, "{}", c.model);
            assert_eq!(x.totals.io_bytes, y.totals.io_bytes, "{}", c.model);
            let busy = |r: &EngineRun| r.agents.iter().map(|a| a.busy).sum::<u64>();
            assert_eq!(busy(x), busy(y), "{}: busy cycles", c.model);
            assert_eq!(y.fidelity, Fidelity::Fast);
        }
    }
    println!("worst: {:.2}%", 100.0 * worst);
    assert!(worst <= 0.02, "fast fidelity off by {:.2}%", 100.0 * worst);
}

#[test]
fn a_loop_cut_to_every_layer_is_the_whole_program_and_shorter_cuts_drop_whole_layers() {
    let m = model::load(deep("gpt-tiny", 10).to_str().unwrap()).unwrap();
    let w = workload(&m, Phase::Train, 16);
    let hw = hw(32);
    let (_, whole) = compile_model(&m, &w, &hw, &opts(None, None)).unwrap();
    let (_, same) = compile_model(&m, &w, &hw, &opts(Some(10), None)).unwrap();
    assert_eq!(whole.programs, same.programs);
    let flops = |k: u32| -> Vec<u64> {
        let (_, c) = compile_model(&m, &w, &hw, &opts(Some(k), None)).unwrap();
        for (p, q) in whole.programs.iter().zip(&c.programs) {
            assert_eq!(fast::same_layout(p, q), None, "cut to {k}");
        }
        c.programs.iter().map(|p| p.graph_flops).collect()
    };
    let (f2, f3, f9) = (flops(2), flops(3), flops(9));
    for i in 0..whole.programs.len() {
        let layer = f3[i] - f2[i];
        assert!(layer > 0);
        assert_eq!(f9[i], f2[i] + 7 * layer, "phase {i}");
        assert_eq!(whole.programs[i].graph_flops, f2[i] + 8 * layer, "phase {i}");
    }
}

#[test]
fn cut_loops_run_where_equal_repeats_once_grouped_unrelated_port_streams() {
    // Cut to 2 or 16 layers, a 24-layer loop's MemoryX port had send tasks of equal repeats over
    // different iterations (every layer's tensor, and all but one layer's at two runs each); taking
    // turns between them deadlocked.
    let m = model::load(deep("gpt-tiny", 24).to_str().unwrap()).unwrap();
    let w = workload(&m, Phase::Train, 16);
    let hw = hw(32);
    for k in [2, 16] {
        let (_, c) = compile_model(&m, &w, &hw, &opts(Some(k), None)).unwrap();
        for (name, p) in c.step_programs().unwrap() {
            detailed(&p).unwrap_or_else(|e| panic!("cut to {k}, {name}: {e}"));
        }
    }
}

#[test]
fn fast_fidelity_says_what_it_did_and_runs_what_it_cannot_aggregate_whole() {
    let report = |args: &[&str]| -> serde_json::Value { serde_json::from_str(&wafer_ok(args)).unwrap() };
    let strip = |mut v: serde_json::Value| {
        let o = v.as_object_mut().unwrap();
        o.remove("host");
        o.remove("fidelity");
        o.remove("notes");
        v
    };
    // Two layers (pipelined, or weight streaming): run whole, the numbers are detailed's.
    for mode in ["pipelined", "weight-streaming"] {
        let args =
            ["run", "gpt-tiny", "--hw", "wse2", "--mesh", "32x32", "--phase", "train", "--seq", "16", "--mode", mode];
        let f = report(&[&args[..], &["--fidelity", "fast", "--json"]].concat());
        let d = report(&[&args[..], &["--fidelity", "detailed", "--json"]].concat());
        let notes = f["notes"].as_array().unwrap();
        assert!(
            notes.iter().any(|n| n.as_str().unwrap().contains("fast fidelity emulated this program whole")),
            "{mode}"
        );
        assert_eq!(f["fidelity"], "fast");
        assert_eq!(strip(f), strip(d), "{mode}");
    }
    // A deep loop is aggregated, and the report says how.
    let path = deep("gpt-tiny", fast::MIN_LAYERS);
    let f = report(&[
        "run",
        path.to_str().unwrap(),
        "--hw",
        "wse2",
        "--mesh",
        "32x32",
        "--phase",
        "prefill",
        "--seq",
        "16",
        "--mode",
        "ws",
        "--json",
    ]);
    let notes = f["notes"].as_array().unwrap();
    assert!(
        notes.iter().any(|n| n.as_str().unwrap().contains(&format!(
            "loop of {} layers was emulated for {} and for {} layers",
            fast::MIN_LAYERS,
            fast::CUT[0],
            fast::CUT[1]
        ))),
        "{notes:?}"
    );
    assert_eq!(f["fidelity"], "fast");
}
