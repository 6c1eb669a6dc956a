//! Number formatting shared by every printer.

/// `1234567` -> `1,234,567`.
pub fn thousands(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1.5e12` with unit `FLOP` -> `1.50 TFLOP`; decimal prefixes.
pub fn human(v: f64, unit: &str) -> String {
    const PREFIXES: [(f64, &str); 6] = [(1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (scale, p) in PREFIXES {
        if v.abs() >= scale {
            return format!("{:.2} {p}{unit}", v / scale);
        }
    }
    if unit.is_empty() {
        format!("{v}")
    } else {
        format!("{v} {unit}")
    }
}

/// Seconds with a unit that keeps three to four significant digits: `1.234 s`, `12.35 ms`, `123.5 us`.
pub fn duration(seconds: f64) -> String {
    let a = seconds.abs();
    let (v, unit) = if a >= 1.0 {
        (seconds, "s")
    } else if a >= 1e-3 {
        (seconds * 1e3, "ms")
    } else if a >= 1e-6 || a == 0.0 {
        (seconds * 1e6, "us")
    } else {
        (seconds * 1e9, "ns")
    };
    let decimals = if v.abs() >= 100.0 {
        1
    } else if v.abs() >= 10.0 {
        2
    } else {
        3
    };
    format!("{v:.decimals$} {unit}")
}

/// A fraction as a percentage with one decimal: `0.1234` -> `12.3%`.
pub fn percent(f: f64) -> String {
    format!("{:.1}%", 100.0 * f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(124_439_808), "124,439,808");
        assert_eq!(thousands(u64::MAX), "18,446,744,073,709,551,615");
    }

    #[test]
    fn duration_picks_unit() {
        assert_eq!(duration(1.5), "1.500 s");
        assert_eq!(duration(0.01234), "12.34 ms");
        assert_eq!(duration(123.46e-6), "123.5 us");
        assert_eq!(duration(0.0), "0.000 us");
        assert_eq!(percent(0.1234), "12.3%");
    }

    #[test]
    fn human_picks_prefix() {
        assert_eq!(human(1.5e12, "FLOP"), "1.50 TFLOP");
        assert_eq!(human(124_439_808.0, ""), "124.44 M");
        assert_eq!(human(12.0, "B"), "12 B");
    }
}
