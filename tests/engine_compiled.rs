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
    // Both phases' channels added up, and the step's IO utilisation is theirs together.
    let chans = check_io_channels(&v);
    assert!(chans.iter().any(|c| c["peer"] == "swarmx"), "gradients leave to SwarmX");
}

/// The report's perimeter IO channels (`io_channels`) against its other numbers: each channel's
/// utilisation is bytes / (bytes per cycle x cycles), the run's `utilization.io` is all channels' bytes
/// over all channels' capacity, the bytes add up to the `io_bytes` counter, no channel beats its rate
/// (its link was held at least bytes / rate cycles) and none is used above its capacity. Returns them.
fn check_io_channels(v: &Value) -> Vec<Value> {
    let cycles = v["cycles"].as_u64().unwrap() as f64;
    let chans = v["io_channels"].as_array().expect("io_channels").clone();
    assert!(!chans.is_empty());
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1e-12);
    let (mut bytes, mut cap) = (0u64, 0.0);
    for c in &chans {
        let b = c["bytes"].as_u64().unwrap();
        let rate = c["bytes_per_cycle"].as_f64().unwrap();
        let u = c["utilization"].as_f64().unwrap();
        assert!(rate > 0.0, "{c}");
        assert!(close(u, b as f64 / (rate * cycles)), "{c}");
        assert!(u <= 1.0 + 1e-9, "{c}");
        assert!(c["cycles_busy"].as_u64().unwrap() as f64 >= (b as f64 / rate).floor(), "{c}");
        bytes += b;
        cap += rate;
    }
    assert_eq!(bytes, v["counters"]["io_bytes"].as_u64().unwrap());
    assert!(close(v["utilization"]["io"].as_f64().unwrap(), bytes as f64 / (cap * cycles)), "{}", v["utilization"]);
    chans
}

/// Weight-streaming decode: every channel carries weights from MemoryX, the report lists them all in
/// `--json` and the text names the extremes and the busiest.
#[test]
fn run_report_shows_each_io_channel() {
    let args = ["run", "gpt-tiny", "--hw", "cs2", "--mesh", "32x32", "--mode", "weight-streaming", "--phase", "decode"];
    let mut json = args.to_vec();
    json.push("--json");
    let v = report(&json);
    let chans = check_io_channels(&v);
    assert!(chans.iter().filter(|c| c["peer"] == "memoryx").count() > 1);
    let text = wafer_ok(&args);
    let n = chans.len();
    assert!(text.contains(&format!("\nio channels {n}: ")), "{text}");
    assert!(text.contains("  utilization min "), "{text}");
    let busiest = chans
        .iter()
        .max_by(|a, b| a["utilization"].as_f64().unwrap().total_cmp(&b["utilization"].as_f64().unwrap()))
        .unwrap();
    assert!(text.contains(&format!("  {:<10}", busiest["name"].as_str().unwrap())), "{text}");
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

/// A gradient op that joins a saved forward input with the backward's dy (GELU's, SwiGLU's) is paced by
/// dy, the input that comes last, and keeps the forward input in its receive FIFO: that input arrives a
/// whole forward pass earlier. Paced by it instead, the join took the saved activations only as far as
/// the PE's free SRAM, and fp32 training of 128 tokens on 64 x 64 deadlocked (gpt-tiny at cycle 339,666,
/// the forward GELU's gateway held by `l0.ffn.gelu.grad`); fp16, or 64 tokens, fit in the free SRAM.
#[test]
fn gradient_joins_are_paced_by_the_backward_input() {
    for m in ["gpt-tiny", "llama-tiny", "neox-tiny", "gptj-tiny"] {
        let args = ["run", m, "--hw", "cs2", "--mesh", "64x64", "--phase", "train", "--seq", "128", "--dtype", "fp32"];
        let mut run = args.to_vec();
        run.extend(["--fidelity", "detailed", "--json"]);
        let r = report(&run);
        assert!(r["cycles"].as_u64().is_some_and(|c| c > 0), "{m}: {r}");
    }
}

/// A row reduction whose rows are narrower than its region's columns (a one-token step's attention rows
/// hold one key each) leaves the columns past the row's width idle, and its statistics fan in over the
/// columns that hold values. Before, the fan-in counted the idle columns too: the root waited for
/// statistics no PE sent, and every model's one-token training step deadlocked (gpt-tiny on 64 x 64 at
/// cycle 99,560, in `l1.attn.softmax.grad`) in both modes. The values check the step as well.
#[test]
fn row_reductions_narrower_than_their_region_fan_in_over_their_columns() {
    for (m, mode) in [("gpt-tiny", "pipelined"), ("llama-tiny", "pipelined"), ("gpt-tiny", "weight-streaming")] {
        let args = ["run", m, "--hw", "cs2", "--mesh", "64x64", "--phase", "train", "--seq", "1", "--mode", mode];
        let mut run = args.to_vec();
        run.extend(["--dtype", "fp32", "--json"]);
        let r = report(&run);
        assert!(r["cycles"].as_u64().is_some_and(|c| c > 0), "{m} {mode}: {r}");
    }
    let (code, out, err) =
        support::wafer(&["run", "bert-tiny", "--hw", "cs2", "--mesh", "64x64", "--phase", "train", "--seq", "1"]);
    assert_eq!(code, 0, "bert-tiny: {err}");
    assert!(out.contains("cycles"), "{out}");
    let (code, out, err) = support::wafer(&[
        "run",
        "gpt-tiny",
        "--hw",
        "cs2",
        "--mesh",
        "64x64",
        "--phase",
        "train",
        "--seq",
        "1",
        "--dtype",
        "fp32",
        "--functional",
    ]);
    assert_eq!(code, 0, "functional: {err}");
    assert!(out.contains("every result within its bound"), "{out}");
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

/// The IO-bound closed form of weight streaming: a model whose weights dominate (a llama-tiny widened to
/// hidden 1024, 4 layers, 101.7 MB of fp16 weights; decode of one token, whose compute is a few
/// thousand cycles a layer) streams B bytes through the perimeter, so no step is shorter than
/// B / (1.2 Tb/s / 8 / 850 MHz) = B / 176.5 bytes per cycle (576k cycles here), nor than the most loaded
/// channel's bytes at its own rate (2.82 MB at 3.68 bytes per cycle: 766,512 cycles, 1.33x: column bands
/// of a 21-column region are 2 or 3 columns wide). Measured 2.26x (1,305,319 cycles), held to 2.3x.
/// Through the channels on the regions' rows only it took 5.97x. Every channel carries weights, and the
/// engine's bytes per port are the plan's.
/// FIXME (why not nearer 1.33x): the channels are done streaming at 59% of the step; the rest is the
/// fabric. Each channel's train crosses the mesh to its column band's gateway at ~0.92 of a link for a
/// layer's worth of cycles, and is reserved ahead (the ports run ahead into the gateways' SRAM); a train
/// at a link's full rate finds no room beside it until it ends: the band multicasts whose first row is a
/// channel's row (rows 1 and 22 here) wait up to 288k cycles, and the next layer's band multicast down
/// the columns holds the links the layer's input multicast needs (waits of 175k). With router-to-router
/// links made contention-free (a measurement hack, not committed) the step is 768,264 cycles, the
/// busiest channel's streaming time; with only the ports' trains taking no link time, the same.
#[test]
fn weight_streaming_decode_is_bound_by_the_system_io() {
    use waferscale::compile::{compile_model, CompileOptions, Mode};
    use waferscale::engine::{self, EngineOptions, Fidelity};
    use waferscale::mesh::Peer;
    use waferscale::model::{self, Phase, WorkloadArgs};
    let src = format!("{}/models/tiny/llama-tiny.json", env!("CARGO_MANIFEST_DIR"));
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    for (k, v) in [
        ("hidden_size", 1024),
        ("intermediate_size", 2752),
        ("num_attention_heads", 8),
        ("num_key_value_heads", 8),
        ("num_hidden_layers", 4),
    ] {
        c[k] = serde_json::json!(v);
    }
    let path = std::env::temp_dir().join(format!("waferscale-io-bound-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_string(&c).unwrap()).unwrap();
    let m = model::load(path.to_str().unwrap()).unwrap();
    let w = WorkloadArgs { phase: Some(Phase::Decode), context: Some(16), ..Default::default() }.resolve(&m).unwrap();
    let doc = waferscale::hw::load_with_overrides("cs2", &[]).unwrap();
    let hw = waferscale::hw::WaferHw::from_doc(&doc).unwrap().with_mesh(64, 64).unwrap();
    let o = CompileOptions {
        mode: Some(Mode::WeightStreaming),
        wafers: 1,
        verify: true,
        micro_batches: None,
        layer_iters: None,
    };
    let (_, compiled) = compile_model(&m, &w, &hw, &o).unwrap();
    let p = compiled.program();
    let run = engine::run(p, &EngineOptions::new(Fidelity::Detailed, 2)).unwrap();
    let mx: Vec<usize> = (0..p.ports.len()).filter(|&i| p.ports[i].peer == Peer::MemoryX).collect();
    assert_eq!(mx.len(), 48, "channels carrying weights");
    for &i in &mx {
        assert!(run.totals.io_bytes[i] > 0, "{} carries nothing", p.ports[i].name);
        assert_eq!(run.totals.io_bytes[i], p.ports[i].planned_bytes, "{}", p.ports[i].name);
    }
    let bytes: u64 = mx.iter().map(|&i| run.totals.io_bytes[i]).sum();
    assert!(bytes > 100_000_000, "{bytes} bytes of weights");
    let io = hw.io.unwrap();
    let bytes_per_cycle = io.system_bits_per_s / 8.0 / hw.clock_hz;
    let bound = bytes as f64 / bytes_per_cycle;
    let ratio = run.cycles as f64 / bound;
    println!("io-bound decode: {} cycles, {bytes} bytes at the system IO: {bound:.0} cycles, {ratio:.3}x", run.cycles);
    assert!(ratio >= 1.0, "faster than the system's IO: {ratio}");
    assert!(ratio <= 2.3, "{ratio}x the IO bound");
    // No channel beats its own rate: the step is at least the most loaded channel's bytes at its rate.
    let rate = |i: usize| p.ports[i].wavelets as f64 * 4.0 / p.ports[i].per_cycles as f64;
    let slowest = mx.iter().map(|&i| run.totals.io_bytes[i] as f64 / rate(i)).fold(0.0, f64::max);
    assert!(run.cycles as f64 >= slowest, "{} cycles, the busiest channel needs {slowest:.0}", run.cycles);
    // FIXME (see above): the channels finish well before the step does; the fabric sets the pace.
    let busiest = mx.iter().map(|&i| run.totals.io_busy[i]).max().unwrap();
    assert!(busiest as f64 >= slowest.floor(), "a channel's link was held {busiest} cycles, less than it needs");
    assert!((busiest as f64) < 0.65 * run.cycles as f64, "channels busy {busiest} of {} cycles", run.cycles);
}

/// Spread weights that run out of router colors come through their regions' rows with less of the
/// system's IO: `wafer compile` and `wafer run` say so on stderr and in the plan's and the report's
/// notes, with the channels and bandwidth lost (llama-tiny decode on 32x32 with 9 colors per router;
/// with the shipped 24 colors the same compile keeps every channel and warns of nothing).
#[test]
fn weights_that_run_out_of_colors_warn_of_the_lost_bandwidth() {
    let base = ["llama-tiny", "--hw", "cs2", "--mesh", "32x32", "--mode", "weight-streaming", "--phase", "decode"];
    let few = [&base[..], &["--set", "fabric.colors=9"]].concat();
    let marker = "warning: weights spread over every IO channel ran out of router colors";
    let (code, out, err) = support::wafer(&[&["compile"], &few[..], &["--json"]].concat());
    assert_eq!(code, 0, "{err}");
    let warning = err.lines().find(|l| l.starts_with(marker)).unwrap_or_else(|| panic!("no warning: {err}"));
    // `N of the 48 channels (R/s of 150.00 GB/s; M channels and L/s lost)`.
    let (used, rest) = warning.split_once(" of the 48 channels (").expect(warning);
    let used: usize = used.rsplit(' ').next().unwrap().parse().expect(warning);
    assert!(used < 48, "{warning}");
    assert!(rest.contains(&format!("of 150.00 GB/s; {} channels and ", 48 - used)), "{warning}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    assert!(plan["notes"].as_array().unwrap().iter().any(|n| n == warning), "{}", plan["notes"]);
    let (code, out, err) = support::wafer(&[&["run"], &few[..], &["--json"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(err.lines().any(|l| l == warning), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["notes"].as_array().unwrap().iter().any(|n| n == warning), "{}", v["notes"]);
    // Fewer channels carry the weights in the run too.
    let carrying = v["io_channels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["peer"] == "memoryx" && c["bytes"].as_u64() > Some(0))
        .count();
    assert_eq!(carrying, used);
    let (code, _, err) = support::wafer(&[&["compile"], &base[..]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning:"), "{err}");
}
