//! The engine on compiled programs, through `wafer run` as users run it: reports identical for any
//! thread count, the two fidelities within 2% of each other, weight-streaming training as two phases,
//! and a reduced demo end to end.

mod support;

use serde_json::Value;
use support::wafer_ok;

/// The report without its `host` section (wall time, threads, memory: facts about the emulator's run).
fn report(args: &[&str]) -> Value {
    let mut v: Value = serde_json::from_str(&wafer_ok(args)).expect("JSON report");
    v.as_object_mut().expect("object").remove("host");
    v
}

/// Compiled programs on meshes cut into several engine partitions (64x64 PEs each): 1, 2 and 3
/// threads give byte-identical reports.
#[test]
fn compiled_runs_are_identical_for_any_thread_count() {
    for (model, phase, mesh, mode) in [
        ("gpt-tiny", "prefill", "160x96", "pipelined"),
        ("llama-tiny", "decode", "130x130", "pipelined"),
        ("gpt-tiny", "train", "140x70", "weight-streaming"),
    ] {
        let base = ["run", model, "--hw", "cs2", "--mesh", mesh, "--phase", phase, "--seq", "16", "--mode", mode];
        let runs: Vec<String> = ["1", "2", "3"]
            .iter()
            .map(|t| {
                let mut a = base.to_vec();
                a.extend(["--threads", t, "--json"]);
                report(&a).to_string()
            })
            .collect();
        assert_eq!(runs[0], runs[1], "{model} {phase} {mesh}: 1 vs 2 threads");
        assert_eq!(runs[0], runs[2], "{model} {phase} {mesh}: 1 vs 3 threads");
    }
}

/// Fast fidelity within 2% of detailed in total cycles on every case detailed runs: tiny models, both
/// modes, several meshes and phases. Prints both numbers. (Fast runs the detailed engine today: this
/// sweep is the guard any aggregation added to fast fidelity must pass.)
#[test]
fn fast_fidelity_tracks_detailed() {
    let mut rows = Vec::new();
    for (model, mesh) in [("gpt-tiny", "32x32"), ("llama-tiny", "64x64"), ("bert-tiny", "48x48")] {
        for mode in ["pipelined", "weight-streaming"] {
            for phase in ["prefill", "decode", "train"] {
                if model == "bert-tiny" && phase == "decode" {
                    continue; // an encoder has no decode
                }
                let cycles = |fidelity: &str| {
                    let v = report(&[
                        "run",
                        model,
                        "--hw",
                        "cs2",
                        "--mesh",
                        mesh,
                        "--mode",
                        mode,
                        "--phase",
                        phase,
                        "--seq",
                        "16",
                        "--fidelity",
                        fidelity,
                        "--json",
                    ]);
                    assert_eq!(v["fidelity"], fidelity);
                    v["cycles"].as_u64().expect("cycles")
                };
                let (fast, detailed) = (cycles("fast"), cycles("detailed"));
                let err = (fast as f64 - detailed as f64).abs() / detailed as f64;
                rows.push(format!("{model:<11}{mesh:>7}  {mode:<17}{phase:<8}{detailed:>10}{fast:>10}{err:>9.4}"));
                assert!(err <= 0.02, "{model} {mesh} {mode} {phase}: fast {fast} vs detailed {detailed}");
            }
        }
    }
    println!("model        mesh  mode             phase     detailed      fast  rel.err");
    for r in rows {
        println!("{r}");
    }
}

/// Weight-streaming training runs its forward and then its backward program on the same wafer: the
/// step's cycles are the sum of the phases' (each named in the notes), never their overlap.
#[test]
fn weight_streaming_training_runs_its_phases_in_sequence() {
    let v = report(&[
        "run",
        "neox-tiny",
        "--hw",
        "cs2",
        "--mesh",
        "64x64",
        "--mode",
        "weight-streaming",
        "--phase",
        "train",
        "--seq",
        "16",
        "--json",
    ]);
    let total = v["cycles"].as_u64().unwrap();
    let phases: Vec<u64> = v["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str()?.strip_prefix("phase ")?.split_once(": ").map(|(_, rest)| rest.to_string()))
        .map(|rest| rest.split(' ').next().unwrap().replace(',', "").parse::<u64>().unwrap())
        .collect();
    assert_eq!(phases.len(), 2, "forward and backward: {:?}", v["notes"]);
    assert!(phases.iter().all(|&c| c > 0));
    assert_eq!(phases.iter().sum::<u64>(), total);
    assert!(v["breakdown"].as_array().unwrap().iter().any(|r| r["name"].as_str().unwrap().starts_with("backward/")));
}

/// A reduced demo (gpt-tiny on 64x64 PEs): every stage runs, the comparison is printed, the trace and
/// the heatmap are written and can be read back.
#[test]
fn reduced_demo_runs_end_to_end() {
    let dir = std::env::temp_dir().join(format!("waferscale-demo-{}", std::process::id()));
    let d = dir.display().to_string();
    let out = wafer_ok(&["demo", "--model", "gpt-tiny", "--mesh", "64x64", "--out-dir", &d]);
    for stage in ["[1/5] model", "[2/5] graph", "[3/5] compile", "[4/5] emulate", "[5/5] GPU model"] {
        assert!(out.contains(stage), "{stage} missing:\n{out}");
    }
    assert!(out.contains("cs2 (wafer)") && out.contains("h100 (gpu)"), "{out}");
    assert!(out.contains("Try next"), "{out}");
    let png = std::fs::read(dir.join("demo-heatmap.png")).expect("heatmap written");
    assert_eq!(&png[1..4], b"PNG");
    let summary = wafer_ok(&["trace", "summary", &format!("{d}/demo.wtrace")]);
    assert!(summary.contains("gpt-tiny") && summary.contains("l0.attn.qkv"), "{summary}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A compiled tiny model traced through `wafer run --trace`: the file is byte-identical for 1 and 3
/// threads, and its summary (what `wafer trace summary` prints) is snapshotted.
#[test]
fn traces_of_compiled_runs_are_identical_across_threads() {
    let dir = std::env::temp_dir().join(format!("waferscale-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files: Vec<String> = ["1", "3"]
        .iter()
        .map(|threads| {
            let f = dir.join(format!("t{threads}.wtrace")).display().to_string();
            wafer_ok(&[
                "run",
                "gpt-tiny",
                "--hw",
                "cs2",
                "--mesh",
                "96x80",
                "--phase",
                "prefill",
                "--seq",
                "16",
                "--threads",
                threads,
                "--trace",
                &f,
                "--trace-window",
                "512",
            ]);
            f
        })
        .collect();
    let (a, b) = (std::fs::read(&files[0]).unwrap(), std::fs::read(&files[1]).unwrap());
    assert!(a == b, "trace bytes differ between 1 and 3 threads");
    let summary = wafer_ok(&["trace", "summary", &files[0]]);
    insta::assert_snapshot!("gpt-tiny-prefill-96x80-trace-summary", summary);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A residual add's skip input runs ahead of the branch it skips by the whole branch (attention takes
/// every token before it gives its first result), so the add keeps it in the receive FIFO its tiling
/// allocates and is paced by the branch. gpt-tiny widened to 256 and trained on 512 tokens (32 runs per
/// layer) under weight streaming on 64 x 64 is the gpt3-175b step's deadlock in small: before the fix the
/// adds were paced by the skip and buffered the branch, the skip filled the fabric back to the norm's
/// gateway, and the step deadlocked at cycle 347,190 with the embedding sum's gateways held.
#[test]
fn residual_skips_wait_in_their_fifos() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}/models/tiny/gpt-tiny.json")).unwrap()).unwrap();
    for (k, v) in [("n_embd", 256), ("n_positions", 1024), ("n_ctx", 1024)] {
        cfg[k] = v.into();
    }
    let dir = std::env::temp_dir().join(format!("wafer-skip-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gpt-tiny-256.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let path = path.to_str().unwrap();
    let common = ["--hw", "cs2", "--mesh", "64x64", "--phase", "train", "--seq", "512", "--mode", "weight-streaming"];
    let mut run = vec!["run", path];
    run.extend(common);
    run.extend(["--fidelity", "detailed", "--json"]);
    let r = report(&run);
    assert!(r["cycles"].as_u64().expect("cycles") > 0);
    let notes = r["notes"].as_array().expect("notes");
    assert_eq!(notes.iter().filter(|n| n.as_str().is_some_and(|n| n.starts_with("phase "))).count(), 2, "{notes:?}");
    // Every residual add is paced by its branch and keeps the skip for a whole layer (32 runs).
    let mut compile = vec!["compile", path];
    compile.extend(common);
    compile.extend(["--dump-after", "lower"]);
    let lower = wafer_ok(&compile);
    let mut adds = 0;
    let mut lines = lower.lines();
    while let Some(l) = lines.next() {
        if !(l.contains("attn.residual.ew ") || l.contains("ffn.residual.ew ")) {
            continue;
        }
        let fifo = l.split(" fifo ").nth(1).unwrap_or_else(|| panic!("no FIFO: {l}"));
        let (color, runs) = fifo.split_once(" x").unwrap();
        assert_eq!(runs, "32", "{l}");
        let ew = lines.next().unwrap();
        assert!(ew.contains(" paced ") && !ew.contains(&format!("paced {color} ")), "{l}\n{ew}");
        adds += 1;
    }
    assert_eq!(adds, 8, "the two residual adds' four PE classes:\n{lower}");
    let _ = std::fs::remove_dir_all(&dir);
}
