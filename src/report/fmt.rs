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
    fn human_picks_prefix() {
        assert_eq!(human(1.5e12, "FLOP"), "1.50 TFLOP");
        assert_eq!(human(124_439_808.0, ""), "124.44 M");
        assert_eq!(human(12.0, "B"), "12 B");
    }
}
