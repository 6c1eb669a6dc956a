//! Snapshot testing of emulator output with insta, for your own `cargo test` (enable the `testing`
//! feature) and for waferscale's own tests, which use the same helpers.
//!
//! Reports and trace summaries are plain serde types; what makes their snapshots stable is:
//! - `settings()`: insta settings that sort maps and redact what differs between machines and builds
//!   (`host.wall_seconds`, `host.peak_rss_bytes`, `host.threads`, versions) and, in text snapshots,
//!   absolute paths and version strings;
//! - `rounded(value, digits)`: the value as JSON with every float that is not a whole number rounded to
//!   `digits` significant digits, so a change in the last bit of a ratio does not show as a diff, while any
//!   change a person would notice does.
//!
//! ```no_run
//! # use waferscale::report::RunReport;
//! # fn report() -> RunReport { unimplemented!() }
//! let _scope = waferscale::testing::settings().bind_to_scope();
//! insta::assert_yaml_snapshot!("gemv-report", waferscale::testing::rounded(&report(), 6));
//! ```
//!
//! Only this module depends on insta; it never reads the engine or the trace format.

use serde::Serialize;
use serde_json::Value;

/// Significant digits `rounded` keeps when asked for the default.
pub const DEFAULT_DIGITS: u32 = 6;

/// Fields that depend on the machine, the build or the run's wall clock, never on the inputs.
pub const VOLATILE_FIELDS: [(&str, &str); 6] = [
    (".host.wall_seconds", "[wall seconds]"),
    (".host.peak_rss_bytes", "[peak rss]"),
    (".host.threads", "[threads]"),
    (".host.version", "[version]"),
    (".version", "[version]"),
    (".header.version", "[version]"),
];

/// Text patterns that differ between checkouts and builds (regex, replacement), for text snapshots.
pub const TEXT_FILTERS: [(&str, &str); 3] = [
    // `waferscale 0.1.0`, `waferscale 0.1.0-dev+abc`
    (r"waferscale \d+\.\d+\.\d+[0-9A-Za-z.+-]*", "waferscale [version]"),
    // Absolute Unix paths (two components at least, after a space, a quote or the start of a line) and
    // Windows drive paths.
    (r#"(?m)(^|[\s"'(=])(?:/[^\s/:"']+){2,}/?"#, "${1}[path]"),
    (r#"(^|[\s"'(=])[A-Za-z]:\\[^\s:"']+"#, "${1}[path]"),
];

/// insta settings for waferscale output: sorted maps, volatile fields redacted, paths and versions
/// filtered out of text. Bind them around your assertions (`settings().bind(|| ...)` or
/// `let _s = settings().bind_to_scope();`).
pub fn settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_sort_maps(true);
    for (selector, replacement) in VOLATILE_FIELDS {
        s.add_redaction(selector, replacement);
    }
    for (re, replacement) in TEXT_FILTERS {
        s.add_filter(re, replacement);
    }
    s
}

/// The same replacements as `settings()`'s text filters, for text compared without insta.
pub fn redact_text(text: &str) -> String {
    let mut out = text.to_string();
    for (re, replacement) in TEXT_FILTERS {
        if let Ok(r) = regex::Regex::new(re) {
            out = r.replace_all(&out, replacement).into_owned();
        }
    }
    out
}

/// `value` as JSON, with every float that is not a whole number rounded to `digits` significant digits
/// (whole numbers, integers, strings and the order of fields are kept as they are).
pub fn rounded<T: Serialize>(value: &T, digits: u32) -> Value {
    let mut v = serde_json::to_value(value).unwrap_or_else(|e| Value::String(format!("<not serialisable: {e}>")));
    round_in_place(&mut v, digits.clamp(1, 17));
    v
}

fn round_in_place(v: &mut Value, digits: u32) {
    match v {
        Value::Number(n) if n.is_f64() => {
            if let Some(x) = n.as_f64() {
                let r = round_significant(x, digits);
                if let Some(num) = serde_json::Number::from_f64(r) {
                    *n = num;
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| round_in_place(x, digits)),
        Value::Object(o) => o.values_mut().for_each(|x| round_in_place(x, digits)),
        _ => {}
    }
}

/// `x` rounded to `digits` significant digits (whole numbers and non-finite values unchanged).
pub fn round_significant(x: f64, digits: u32) -> f64 {
    if x == 0.0 || !x.is_finite() || x.fract() == 0.0 {
        return x;
    }
    let magnitude = x.abs().log10().floor() as i32;
    let scale = 10f64.powi(digits as i32 - 1 - magnitude);
    let r = (x * scale).round() / scale;
    // Print-stable: parse back the shortest decimal of the rounded value.
    format!("{r:.*e}", (digits - 1) as usize).parse().unwrap_or(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_keeps_whole_numbers_and_rounds_ratios() {
        assert_eq!(round_significant(0.759_347_826_086_956_5, 4), 0.7593);
        assert_eq!(round_significant(123_456_789.0, 3), 123_456_789.0);
        assert_eq!(round_significant(1.0 / 3.0, 6), 0.333_333);
        assert_eq!(round_significant(-2.468_281_828, 3), -2.47);
        let v = rounded(&serde_json::json!({"a": 0.123_456_789, "b": [1.5e-7_f64 / 3.0], "c": 7, "d": "x"}), 3);
        assert_eq!(v, serde_json::json!({"a": 0.123, "b": [5e-8], "c": 7, "d": "x"}));
    }

    #[test]
    fn text_redaction_hides_paths_and_versions() {
        let t = redact_text("error: /home/me/run.wtrace: truncated\nwaferscale 0.1.0 (x)\n");
        assert_eq!(t, "error: [path]: truncated\nwaferscale [version] (x)\n");
    }
}
