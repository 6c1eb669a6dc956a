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
