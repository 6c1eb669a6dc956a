//! `wafer trace timeline`: one sparkline per region (and per IO port) in the terminal, from the exact
//! series, on a shared absolute scale (a full block is 100%), so rows compare with each other.

use super::{fractions, Counts, Trace, View};
use crate::engine::record::{Metric, METRICS};

/// Eight levels; a space is exactly zero.
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The sparkline character of a fraction in [0, 1].
pub fn bar(v: f64) -> char {
    if v <= 0.0 {
        ' '
    } else {
        BARS[((v * 8.0) as usize).min(7)]
    }
}

/// Consecutive windows grouped into at most `columns` columns: (first window, last window) per column.
pub fn columns(windows: usize, columns: usize) -> Vec<(usize, usize)> {
    let per = windows.div_ceil(columns.max(1)).max(1);
    (0..windows).step_by(per).map(|f| (f, (f + per).min(windows) - 1)).collect()
}

fn sum(s: &[Counts], first: usize, last: usize) -> Counts {
    let mut c = [0u64; METRICS];
    for w in &s[first..=last] {
        for (a, b) in c.iter_mut().zip(w) {
            *a += b;
        }
    }
    c
}

/// The timeline text: a header, then `name |sparkline| mean peak` per region, the mesh, and the ports.
pub fn timeline(t: &Trace, view: View, width: usize) -> String {
    use crate::report::fmt::thousands;
    use std::fmt::Write as _;
    let cols = columns(t.windows as usize, width);
    let n_pes = t.region_pes();
    let span = |c: &(usize, usize)| {
        let (s, _) = t.window_span(c.0);
        let (ls, ll) = t.window_span(c.1);
        (s, ls + ll - s)
    };
    let mut s = String::new();
    let per = cols.first().map_or(1, |c| c.1 - c.0 + 1);
    let _ = writeln!(
        s,
        "{} over {} cycles: {} columns of {} window{} ({} cycles each); scale 0-100% ({}), blank = 0",
        view.name(),
        thousands(t.cycles),
        cols.len(),
        per,
        if per == 1 { "" } else { "s" },
        thousands(per as u64 * t.window_cycles),
        view.unit()
    );
    let name_w =
        t.regions.iter().map(|r| r.name.len()).chain(t.ports.iter().map(|p| p.name.len() + 5)).max().unwrap_or(4);
    let name_w = name_w.clamp(6, 32);
    let row = |s: &mut String, name: &str, values: Vec<f64>, weights: Vec<u64>| {
        let line: String = values.iter().map(|&v| bar(v)).collect();
        let total: u64 = weights.iter().sum();
        let mean = values.iter().zip(&weights).map(|(v, w)| v * *w as f64).sum::<f64>() / total.max(1) as f64;
        let peak = values.iter().copied().fold(0.0, f64::max);
        let name: String = name.chars().take(name_w).collect();
        let _ = writeln!(s, "{name:<name_w$} |{line}| mean {:>5.1}%  peak {:>5.1}%", 100.0 * mean, 100.0 * peak);
    };
    for (r, info) in t.regions.iter().enumerate() {
        let sram = t.region_sram(r);
        let values = cols
            .iter()
            .map(|c| {
                view.of_fractions(&fractions(&sum(&t.region_series[r], c.0, c.1), n_pes[r], span(c).1, t.unit), sram)
            })
            .collect();
        row(&mut s, &info.name, values, cols.iter().map(|c| span(c).1).collect());
    }
    let mut all: Vec<Counts> = vec![[0; METRICS]; t.windows as usize];
    for series in &t.region_series {
        for (a, w) in all.iter_mut().zip(series) {
            for (x, y) in a.iter_mut().zip(w) {
                *x += y;
            }
        }
    }
    let sram_all = (0..t.pes()).map(|pe| t.pe_sram(pe)).sum::<f64>() / t.pes().max(1) as f64;
    let values = cols
        .iter()
        .map(|c| view.of_fractions(&fractions(&sum(&all, c.0, c.1), t.pes() as u64, span(c).1, t.unit), sram_all))
        .collect();
    row(&mut s, "(mesh)", values, cols.iter().map(|c| span(c).1).collect());
    for (p, series) in t.ports.iter().zip(&t.port_series) {
        let values = cols
            .iter()
            .map(|c| {
                let x = sum(series, c.0, c.1);
                let used = x[Metric::Send as usize] + x[Metric::Receive as usize];
                (used as f64 / (p.capacity_units as f64 * span(c).1 as f64)).min(1.0)
            })
            .collect();
        row(&mut s, &format!("port {}", p.name), values, cols.iter().map(|c| span(c).1).collect());
    }
    s
}
