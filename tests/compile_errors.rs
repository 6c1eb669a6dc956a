//! Compiler errors: each case exits 2 with a message that names what does not fit and what to do;
//! snapshots hold the exit code and stderr together.

mod support;

use support::{wafer_exit, wafer_ok};

fn check(name: &str, args: &[&str]) {
    let got = wafer_exit(args);
    assert!(got.starts_with("exit: 2\n"), "{name}: expected exit code 2, got:\n{got}");
    assert!(!got.contains("panicked"), "{name}: panicked:\n{got}");
    insta::assert_snapshot!(name, got);
}

#[test]
fn sram_overflow() {
    // A single op whose tile cannot fit any PE of the mesh: names the op, the PE class, the bytes.
    check("compile-sram-single-op", &["compile", "gemv:16384x16384", "--hw", "wse2", "--mesh", "16x16"]);
    // A model forced pipelined on a wafer that cannot hold its weights: suggests weight streaming.
    check(
        "compile-sram-pipelined",
        &["compile", "llama-2-70b", "--hw", "cs2", "--phase", "decode", "--mode", "pipelined"],
    );
    // Less SRAM per PE through an override: a tiny model's training step no longer fits pipelined.
    check(
        "compile-sram-override",
        &[
            "compile",
            "gpt-tiny",
            "--hw",
            "cs2",
            "--mesh",
            "64x64",
            "--phase",
            "train",
            "--mode",
            "pipelined",
            "--set",
            "pe.sram_bytes=8192",
            "--set",
            "pe.code_reserve_bytes=4096",
        ],
    );
    // Pipelined does not fit a small mesh at all.
    check(
        "compile-mesh-too-small-pipelined",
        &["compile", "gpt-tiny", "--hw", "cs2", "--mesh", "24x24", "--phase", "train", "--mode", "pipelined"],
    );
}

#[test]
fn too_many_colors() {
    // An op whose every algorithm needs more colors than a router has.
    check(
        "compile-colors-op",
        &["compile", "gpt-tiny", "--hw", "cs2", "--mesh", "16x16", "--phase", "decode", "--set", "fabric.colors=4"],
    );
    // A stream that finds no color along its path (relays cannot help at its ends). 13 colors: every
    // op fits (its gathers in token chunks take a credit color each), the streams do not.
    check(
        "compile-colors-stream",
        &[
            "compile",
            "llama-tiny",
            "--hw",
            "cs2",
            "--mesh",
            "64x64",
            "--phase",
            "train",
            "--mode",
            "pipelined",
            "--set",
            "fabric.colors=13",
        ],
    );
}

#[test]
fn mesh_too_small() {
    check("compile-mesh-too-small-op", &["compile", "gpt-tiny", "--hw", "cs2", "--mesh", "2x2", "--phase", "decode"]);
    check(
        "compile-mesh-too-small-ws",
        &["compile", "llama-tiny", "--hw", "cs2", "--mesh", "16x16", "--phase", "train", "--mode", "weight-streaming"],
    );
}

#[test]
fn bad_hardware_values() {
    check("compile-hw-zero-sram", &["compile", "gpt-tiny", "--hw", "cs2", "--set", "pe.sram_bytes=0"]);
    check("compile-hw-negative-colors", &["compile", "gpt-tiny", "--hw", "cs2", "--set", "fabric.colors=-2"]);
    check("compile-hw-unknown-key", &["compile", "gpt-tiny", "--hw", "cs2", "--set", "pe.sram_byts=4096"]);
    check(
        "compile-hw-reserve-exceeds-sram",
        &["compile", "gpt-tiny", "--hw", "cs2", "--set", "pe.code_reserve_bytes=65536"],
    );
    check("compile-hw-unknown", &["compile", "gpt-tiny", "--hw", "models/hardware/wse9.toml"]);
    check("compile-mesh-too-wide", &["compile", "gpt-tiny", "--hw", "cs2", "--mesh", "800x10"]);
    check("compile-mesh-zero", &["compile", "gpt-tiny", "--hw", "cs2", "--mesh", "0x10"]);
    check("compile-mesh-bad-form", &["compile", "gpt-tiny", "--hw", "cs2", "--mesh", "16by16"]);
}

#[test]
fn bad_requests() {
    check("compile-fp8", &["compile", "gpt-tiny", "--hw", "cs2", "--mesh", "16x16", "--dtype", "fp8"]);
    check(
        "compile-wafers-training",
        &["compile", "gpt-tiny", "--hw", "cs2", "--mesh", "16x16", "--phase", "train", "--wafers", "2"],
    );
    check(
        "compile-wafers-beyond-layers",
        &["compile", "gpt-tiny", "--hw", "cs2", "--mesh", "16x16", "--phase", "decode", "--wafers", "3"],
    );
    check(
        "compile-single-op-streaming",
        &["compile", "gemm:64x64x64", "--hw", "wse2", "--mesh", "8x8", "--mode", "weight-streaming"],
    );
    check("compile-bad-mode", &["compile", "gpt-tiny", "--hw", "cs2", "--mode", "fast"]);
}

#[test]
fn bad_plan_files() {
    let dir = std::env::temp_dir().join(format!("wafer-bad-plans-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.json");
    let good_path = good.display().to_string();
    wafer_ok(&["compile", "gpt-tiny", "--hw", "cs2", "--mesh", "16x16", "--phase", "decode", "-o", &good_path]);
    let text = std::fs::read_to_string(&good).unwrap();
    let cases = [
        ("plan-truncated", text[..text.len() / 2].to_string()),
        ("plan-wrong-version", text.replacen("\"version\": 1", "\"version\": 99", 1)),
        ("plan-not-json", "hello\n".to_string()),
        ("plan-no-version", "{\"inputs\": {}}\n".to_string()),
        ("plan-edited", text.replacen("sram_bytes = 49152", "sram_bytes = 98304", 1)),
    ];
    for (name, body) in cases {
        assert_ne!(body, text, "{name}: the fixture must differ from the good file");
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, body).unwrap();
        let got = wafer_exit(&["plan", path.to_str().unwrap()]);
        let got = got.replace(path.to_str().unwrap(), "PLAN");
        assert!(got.starts_with("exit: 2\n"), "{name}: {got}");
        insta::assert_snapshot!(name, got);
    }
    let got = wafer_exit(&["plan", dir.join("missing.json").to_str().unwrap()]).replace(dir.to_str().unwrap(), "DIR");
    assert!(got.starts_with("exit: 2\n"), "{got}");
    insta::assert_snapshot!("plan-missing", got);
    std::fs::remove_dir_all(&dir).ok();
}
