//! Bad input: every case gets exit code 2 and a message naming the file and the key, never a panic.
//! Snapshots hold the exit code and stderr together.

mod support;

use support::{wafer_exit, wafer_ok};

fn check(name: &str, args: &[&str]) {
    let got = wafer_exit(args);
    assert!(got.starts_with("exit: 2\n"), "{name}: expected exit code 2, got:\n{got}");
    assert!(!got.contains("panicked"), "{name}: panicked:\n{got}");
    insta::assert_snapshot!(name, got);
}

#[test]
fn bad_model_configs() {
    let dir = "tests/fixtures/bad";
    for (name, file) in [
        ("unreadable-json", "not-json.json"),
        ("unknown-family", "unknown-family.json"),
        ("no-family", "no-family.json"),
        ("missing-key", "missing-key.json"),
        ("hidden-not-divisible-by-heads", "heads-not-dividing.json"),
        ("kv-heads-not-dividing-heads", "kv-heads-not-dividing.json"),
        ("zero-layers", "zero-layers.json"),
        ("negative-size", "negative.json"),
        ("count-overflows-u64", "overflow.json"),
        ("moe-capacity-factor-zero", "moe-capacity-zero.json"),
    ] {
        check(name, &["graph", &format!("{dir}/{file}")]);
    }
    check("missing-file", &["graph", "tests/fixtures/bad/no-such-file.json"]);
    check("unknown-model", &["graph", "gpt5-ultra"]);
}

#[test]
fn bad_single_ops() {
    check("op-bad-form", &["graph", "gemm:64x64"]);
    check("op-zero", &["graph", "gemv:0x64"]);
    check("op-unknown-kind", &["graph", "conv:3x3"]);
    check("op-allreduce-odd-bytes", &["graph", "allreduce:3", "--dtype", "fp16"]);
    check("op-phase-train", &["graph", "gemm:8x8x8", "--phase", "train"]);
}

#[test]
fn bad_workloads() {
    check("seq-beyond-positions", &["graph", "gpt2-small", "--seq", "2048"]);
    check("decode-context-beyond-positions", &["graph", "gpt-tiny", "--phase", "decode", "--context", "128"]);
    check("decode-on-encoder", &["graph", "bert-tiny", "--phase", "decode"]);
    check("sparsity-out-of-range", &["graph", "gpt-tiny", "--sparsity", "1.5"]);
    check("zero-batch", &["graph", "gpt-tiny", "--batch", "0"]);
    check("context-without-decode", &["graph", "gpt-tiny", "--context", "16"]);
    check("recompute-without-train", &["graph", "gpt-tiny", "--phase", "prefill", "--recompute"]);
    check("bad-workload-file", &["graph", "gpt-tiny", "--workload", "tests/fixtures/bad/bad-workload.toml"]);
    check("absurd-tokens", &["graph", "gpt2-small", "--batch", "4294967296", "--seq", "1024"]);
    check("bad-dtype-flag", &["graph", "gpt-tiny", "--dtype", "fp64"]);
}

#[test]
fn good_commands_exit_zero() {
    for args in [
        &["graph", "gpt-tiny"][..],
        &["graph", "gpt-tiny", "--json"],
        &["graph", "gpt-tiny", "--dot"],
        &["graph", "models/tiny/llama-tiny.json", "--phase", "decode"],
        &["models"],
    ] {
        let got = wafer_exit(args);
        assert!(got.starts_with("exit: 0\n"), "{args:?}: {got}");
    }
}

/// `--json` carries at least the integer keys the issue names.
#[test]
fn graph_json_keys() {
    let v: serde_json::Value = serde_json::from_str(&wafer_ok(&["graph", "gpt-tiny", "--json"])).unwrap();
    for key in ["params", "flops", "matmul_flops", "weight_bytes", "activation_bytes", "ops"] {
        assert!(v[key].is_u64(), "key {key} missing or not an integer in {v}");
    }
}

/// `-o FILE` writes the whole output; a failing write leaves nothing behind.
#[test]
fn output_file_is_written_whole_or_not_at_all() {
    let dir = std::env::temp_dir().join(format!("wafer-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dot = dir.join("g.dot");
    let got = wafer_exit(&["graph", "gpt-tiny", "--dot", "-o", dot.to_str().unwrap()]);
    assert!(got.starts_with("exit: 0"), "{got}");
    let text = std::fs::read_to_string(&dot).unwrap();
    assert!(text.starts_with("digraph") && text.trim_end().ends_with('}'));
    let bad = dir.join("missing-dir").join("g.dot");
    let got = wafer_exit(&["graph", "gpt-tiny", "--dot", "-o", bad.to_str().unwrap()]);
    assert!(got.starts_with("exit: 2"), "{got}");
    assert!(!bad.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

/// `wafer run`, `compare` and `demo` refuse bad engine options before doing any work.
#[test]
fn bad_run_options() {
    check("run-threads-zero", &["run", "gpt-tiny", "--mesh", "16x16", "--threads", "0"]);
    check(
        "run-trace-window-zero",
        &["run", "gpt-tiny", "--mesh", "16x16", "--trace", "x.wtrace", "--trace-window", "0"],
    );
    check("run-trace-into-missing-dir", &["run", "gpt-tiny", "--mesh", "16x16", "--trace", "no-such-dir/x.wtrace"]);
    check("compare-output-into-missing-dir", &["compare", "gpt-tiny", "--mesh", "16x16", "-o", "no-such-dir/c.txt"]);
    check("demo-threads-zero", &["demo", "--model", "gpt-tiny", "--mesh", "16x16", "--threads", "0"]);
}

/// A run that outgrows the memory limit (`--max-memory`; by default 90% of what the host had
/// available) stops with exit code 2 and says why, instead of being killed by the OOM killer; it
/// writes no report or trace. A limit below what the process holds at its first window stops it there.
#[test]
fn a_run_over_the_memory_limit_stops_with_exit_2() {
    let dir = std::env::temp_dir().join(format!("wafer-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (out, trace) = (dir.join("r.json"), dir.join("r.wtrace"));
    let (o, t) = (out.to_str().unwrap(), trace.to_str().unwrap());
    for functional in [false, true] {
        let mut args = vec!["run", "gpt-tiny", "--mesh", "32x32", "--max-memory", "1MB", "-o", o, "--trace", t];
        if functional {
            args.extend(["--dtype", "fp32", "--functional"]);
        }
        let (code, _, err) = support::wafer(&args);
        assert_eq!(code, 2, "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains("the emulation stopped at cycle") && err.contains("over the limit of 1 MB"), "{err}");
        assert_eq!(err.contains("a functional run keeps every value each PE stores"), functional, "{err}");
        assert!(!out.exists() && !trace.exists(), "{err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
