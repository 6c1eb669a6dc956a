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
