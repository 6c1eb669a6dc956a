//! Micro-batching (gradient accumulation) of training steps: the compile of one micro-batch describes the
//! whole step, and the engine's report of the step is the micro-batch's run counted once per micro-batch.

mod support;

use support::{wafer_exit, wafer_ok};
use waferscale::compile::{compile_model, CompileOptions, Mode};
use waferscale::hw;
use waferscale::model::{self, Phase, WorkloadArgs};

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&wafer_ok(args)).expect("json")
}

const TINY_WS: [&str; 11] =
    ["run", "gpt-tiny", "--hw", "cs2", "--mesh", "32x32", "--phase", "train", "--seq", "32", "--mode=weight-streaming"];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    TINY_WS.iter().copied().chain(extra.iter().copied()).collect()
}

#[test]
fn the_plan_of_micro_batches_has_the_steps_flops() {
    // Every op on the wafer is linear in the batch: m micro-batches execute the step graph's wafer FLOPs,
    // and what runs off the wafer is the rest of the step graph (the optimizer once).
    let m = model::load("gpt-tiny").unwrap();
    let w = WorkloadArgs { phase: Some(Phase::Train), batch: Some(4), seq: Some(32), ..Default::default() }
        .resolve(&m)
        .unwrap();
    let hw = hw::WaferHw::from_doc(&hw::load_with_overrides("cs2", &[]).unwrap()).unwrap().with_mesh(32, 32).unwrap();
    let opts = |mb| CompileOptions {
        mode: Some(Mode::WeightStreaming),
        wafers: 1,
        verify: true,
        micro_batches: mb,
        layer_iters: None,
    };
    let (g, whole) = compile_model(&m, &w, &hw, &opts(None)).unwrap();
    assert_eq!(whole.micro_batches, 1, "the batch fits: one batch");
    let graph_flops: u64 = g.op_ids().map(|o| g.op(o).cost.flops).sum();
    assert_eq!(whole.plan.wafer_flops + whole.plan.offload_flops, graph_flops);
    for mb in [2, 4] {
        let (g2, c) = compile_model(&m, &w, &hw, &opts(Some(mb))).unwrap();
        assert_eq!(g2.workload.batch, 4, "the graph returned is the step's");
        assert_eq!(c.micro_batches, mb);
        assert_eq!(c.plan.micro_batches, mb);
        assert_eq!(c.plan.wafer_flops, whole.plan.wafer_flops, "{mb} micro-batches");
        assert_eq!(c.plan.offload_flops, whole.plan.offload_flops, "{mb} micro-batches");
        // The program is one micro-batch's.
        let micro: u64 = c.programs.iter().map(|p| p.graph_flops).sum();
        assert_eq!(micro * mb as u64, c.plan.wafer_flops);
    }
}

#[test]
fn the_run_of_a_micro_batched_step_counts_each_micro_batch() {
    let step = json(&args(&["--batch", "4", "--micro-batches", "2", "--json"]));
    let one = json(&args(&["--batch", "2", "--json"]));
    let u = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}"));
    // The same program (one micro-batch of 2 sequences) runs twice from an idle wafer.
    assert_eq!(u(&step, "cycles"), 2 * u(&one, "cycles"));
    assert_eq!(u(&step, "flops"), 2 * u(&one, "flops"));
    assert_eq!(step["counters"]["wavelets"], serde_json::json!(2 * u(&one["counters"], "wavelets")));
    // Tokens per second: the step's 128 tokens over the step's time.
    let tps = step["tokens_per_s"].as_f64().unwrap();
    let secs = step["seconds"].as_f64().unwrap();
    assert!((tps * secs - 128.0).abs() < 1e-6, "{tps} tokens/s x {secs} s");
    assert!(step["notes"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().contains("2 micro-batches")));
}

/// `wafer compile gpt-tiny` on a 32 x 32 CS-2 mesh with `extra` flags; returns stdout (`ok`) or the
/// exit code and stderr.
fn compile_tiny(extra: &str, ok: bool) -> String {
    let args = format!("compile gpt-tiny --hw cs2 --mesh 32x32 {extra}");
    let args: Vec<&str> = args.split_whitespace().collect();
    if ok {
        wafer_ok(&args)
    } else {
        wafer_exit(&args)
    }
}

#[test]
fn a_batch_that_does_not_fit_runs_in_micro_batches() {
    // gpt-tiny training at 64 x 128 overflows a 32 x 32 mesh; 16 sequences at a time fit.
    let plan = compile_tiny("--phase train --batch 64", true);
    assert!(plan.contains("in 4 micro-batches of 16 x 128 tokens"), "{plan}");
    assert!(plan.contains("micro       4 micro-batches per step"), "{plan}");
    // A plan file keeps --micro-batches and recompiles to the same plan.
    let dir = std::env::temp_dir().join(format!("wafer-micro-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tiny.plan.json");
    let file = file.to_str().unwrap();
    let mut args: Vec<&str> =
        "compile gpt-tiny --hw cs2 --mesh 32x32 --phase train --batch 8 --seq 32 --micro-batches 4 -o"
            .split_whitespace()
            .collect();
    args.push(file);
    wafer_ok(&args);
    let shown = wafer_ok(&["plan", file]);
    assert!(shown.contains("micro       4 micro-batches per step"), "{shown}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn micro_batch_errors_name_the_flag() {
    for (name, flags) in [
        ("micro-batches-not-dividing", "--phase train --batch 4 --micro-batches 3"),
        ("micro-batches-inference", "--phase decode --micro-batches 2"),
        ("micro-batches-pipelined", "--phase train --batch 4 --micro-batches 2 --mode pipelined"),
        ("micro-batches-zero", "--phase train --micro-batches 0"),
    ] {
        insta::assert_snapshot!(name, compile_tiny(flags, false));
    }
}
