//! Running the `wafer` binary from integration tests, as users do: from the crate root, with a fixed
//! terminal width.
#![allow(dead_code)]

use std::process::Command;

/// Runs `wafer args`; returns (exit code, or -1 on a signal; stdout; stderr).
pub fn wafer(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wafer"))
        .args(args)
        .env("COLUMNS", "100")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run wafer");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `wafer args`, asserting success; returns stdout.
pub fn wafer_ok(args: &[&str]) -> String {
    let (code, out, err) = wafer(args);
    assert_eq!(code, 0, "wafer {} failed:\n{err}", args.join(" "));
    out
}

/// Runs `wafer args`; returns its exit code and stderr as error snapshots hold them.
pub fn wafer_exit(args: &[&str]) -> String {
    let (code, _, err) = wafer(args);
    let code = if code < 0 { "signal".to_string() } else { code.to_string() };
    format!("exit: {code}\n{err}")
}

/// `wafer run ARGS --json` (ARGS without `run`), asserting success: the report without its `host` key
/// (the only part that differs between runs of the same program), and stderr.
pub fn run_json(args: &[&str]) -> (serde_json::Value, String) {
    let mut a = vec!["run"];
    a.extend_from_slice(args);
    a.push("--json");
    let (code, stdout, stderr) = wafer(&a);
    assert_eq!(code, 0, "wafer {} failed:\n{stderr}", a.join(" "));
    let mut v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    v.as_object_mut().expect("object").remove("host");
    (v, stderr)
}

/// The first number after "max relative error" on the first line of `text` that contains `marker`.
pub fn check_error(text: &str, marker: &str) -> f64 {
    let line = text.lines().find(|l| l.contains(marker)).unwrap_or_else(|| panic!("no `{marker}` line in:\n{text}"));
    line.split("max relative error")
        .nth(1)
        .and_then(|v| v.split_whitespace().find_map(|w| w.parse().ok()))
        .unwrap_or_else(|| panic!("no error value in `{line}`"))
}

/// The check line of `wafer run --functional`.
pub const CHECK_LINE: &str = "functional: max relative error vs the reference";

/// `wafer run ARGS --functional --json`: the timing report without `host`, the check line's max
/// relative error (the line goes to stderr beside JSON), and stderr.
pub fn functional_json(args: &[&str]) -> (serde_json::Value, f64, String) {
    let mut a = args.to_vec();
    a.push("--functional");
    let (v, stderr) = run_json(&a);
    let err = check_error(&stderr, CHECK_LINE);
    (v, err, stderr)
}

/// A seeded training step: the model, the step's programs, the reference's run, numerics.
pub type SeededStep = (
    waferscale::model::Model,
    Vec<(String, waferscale::mesh::MeshProgram)>,
    waferscale::functional::Run<f32>,
    waferscale::functional::Numerics,
);

/// One seeded training step of `name` (batch 1 x `seq`, `dtype`) on a `mesh` x `mesh` WSE-2 rectangle,
/// compiled in `mode` (None: the compiler's choice), with the reference's run of the same step
/// (tokens seeded 3, weights seeded 7; fp16/bf16 rounded as stored): (model, the step's programs,
/// the reference's run, numerics).
pub fn seeded_train_step(
    name: &str,
    mesh: u32,
    seq: u64,
    dtype: waferscale::model::DType,
    mode: Option<waferscale::compile::Mode>,
) -> SeededStep {
    seeded_train_step_with(name, mesh, &[], seq, dtype, mode)
}

/// `seeded_train_step` on WSE-2 with `sets` overriding its description (`--set KEY=VALUE`).
pub fn seeded_train_step_with(
    name: &str,
    mesh: u32,
    sets: &[&str],
    seq: u64,
    dtype: waferscale::model::DType,
    mode: Option<waferscale::compile::Mode>,
) -> SeededStep {
    use waferscale::functional::{self, Options, Precision, Tokens, WeightSource};
    use waferscale::model::{self, DType, Model, Phase, WorkloadArgs};
    let model = model::load(name).expect("model");
    let args = WorkloadArgs {
        phase: Some(Phase::Train),
        seq: Some(seq),
        dtype: Some(dtype),
        batch: Some(1),
        ..Default::default()
    };
    let w = args.resolve(&model).expect("workload");
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let doc = waferscale::hw::load_with_overrides("wse2", &sets).expect("wse2");
    let hw = waferscale::hw::WaferHw::from_doc(&doc).expect("wafer").with_mesh(mesh, mesh).expect("mesh");
    let opts = waferscale::compile::CompileOptions { mode, ..Default::default() };
    let (_, c) = waferscale::compile::compile_model(&model, &w, &hw, &opts).expect("compile");
    let programs = c.step_programs().expect("programs");
    let Model::Transformer(spec) = &model else { panic!("{name}: not a transformer") };
    let tokens = Tokens::seeded(3, 1, seq as usize, spec.vocab);
    let precision = if dtype == DType::Fp32 { Precision::Exact } else { Precision::Storage };
    let fopts = Options { precision, ..Options::default() };
    let run = functional::run::<f32>(&model, &w, &WeightSource::Seeded(7), &tokens, &fopts).expect("reference");
    let numerics = functional::numerics_of(&model).expect("numerics");
    (model, programs, run, numerics)
}
