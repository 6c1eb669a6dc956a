//! The README's snapshot-testing example, kept compiling and passing: a GEMV on a 32 x 32 WSE-2 mesh,
//! its run report snapshotted with `waferscale::testing`. Change one hardware parameter (say
//! `fabric.hop_cycles=2` in `OVERRIDES`) and `cargo insta review` shows what moved.

use std::time::Instant;

use waferscale::engine::report::{build, ReportContext};
use waferscale::engine::{self, synth, EngineOptions, Fidelity};
use waferscale::hw::{load_with_overrides, WaferHw};
use waferscale::model::DType;
use waferscale::report::{HostInfo, RunReport, WorkloadSummary};
use waferscale::testing;

/// The hardware parameters under study, as `wafer --set KEY=VALUE` takes them.
const OVERRIDES: &[&str] = &[];

fn gemv_report(overrides: &[&str]) -> RunReport {
    let sets: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let hw = WaferHw::from_doc(&load_with_overrides("wse2", &sets).unwrap()).unwrap().with_mesh(32, 32).unwrap();
    let program = synth::gemv_tree(&hw, 4096, 4096, 32, 32, 8);
    let t0 = Instant::now();
    let run = engine::run(&program, &EngineOptions::new(Fidelity::Detailed, 2)).unwrap();
    let workload = WorkloadSummary {
        phase: "decode".into(),
        batch: 1,
        seq: 1,
        context: 0,
        dtype: "fp16".into(),
        sparsity: 0.0,
        recompute: false,
        tokens: 1,
    };
    let host = HostInfo {
        wall_seconds: t0.elapsed().as_secs_f64(),
        threads: 2,
        peak_rss_bytes: 0,
        version: waferscale::trace::version_string(),
    };
    let ctx = ReportContext {
        hw: &hw,
        model: "gemv:4096x4096".into(),
        workload,
        dtype: DType::Fp16,
        mode: "pipelined".into(),
        notes: vec![],
        host,
    };
    build(&program, &run, ctx)
}

#[test]
fn gemv_report_on_wse2() {
    let report = gemv_report(OVERRIDES);
    testing::settings().bind(|| {
        insta::assert_yaml_snapshot!("gemv-32x32-wse2", testing::rounded(&report, 6));
    });
}

/// The README shows this file (after its module comment) verbatim, so the example there cannot drift.
#[test]
fn readme_shows_this_example() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let this = include_str!("snapshot_example.rs");
    let start = this.find("use std::time::Instant;").unwrap();
    let end = this.find("\n/// The README shows this file").unwrap();
    let example = &this[start..end];
    assert!(readme.contains(example.trim_end()), "README.md must show tests/snapshot_example.rs's example verbatim");
}
