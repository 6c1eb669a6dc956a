//! Traces: the file round-trips what the engine recorded, is byte-identical for any thread count and
//! fidelity-independent in shape, fits its budget by widening the window, and a damaged file gets an
//! error naming the offset, never a panic. Viewers: summary snapshots, heatmap pictures, the Perfetto
//! export decoded with the official protobuf definitions, and the `wafer trace` commands.

mod common;

use common::*;
use waferscale::engine::record::{Metric, METRICS};
use waferscale::engine::{Fidelity, UNIT};
use waferscale::trace::{self, TraceError, TraceOptions};

/// Every PE's quantised value is its exact fraction of the window to within half a step (or 1 for a
/// tiny nonzero one); the exact series sum the recording; spans are the engine's.
#[test]
fn write_read_round_trip_matches_the_recording() {
    let f = fixture(Fidelity::Detailed, 1);
    let opts = TraceOptions::default();
    let (bytes, info) = trace::encode(&f.header, &f.program, &f.run, &opts).unwrap();
    assert!(!info.adapted);
    let t = trace::read_bytes(&bytes, "mem").unwrap();
    let rec = f.run.recording.as_ref().unwrap();
    assert_eq!(t.header, f.header);
    assert_eq!(t.cycles, f.run.cycles);
    assert_eq!(t.window_cycles, rec.window_cycles);
    assert_eq!(t.windows as u64, f.run.cycles.div_ceil(rec.window_cycles));
    assert_eq!(info.bytes, bytes.len() as u64);
    let pes = t.pes();
    assert_eq!(pes, (f.program.mesh.width * f.program.mesh.height) as usize);
    // Frames against the recording, PE by PE.
    let mut checked = 0;
    for (pe, bins) in rec.bins[..pes].iter().enumerate() {
        let mut expect = vec![[0u64; METRICS]; t.windows as usize];
        for (idx, c) in bins {
            for m in 0..METRICS {
                expect[*idx as usize][m] += c[m];
            }
        }
        for (w, c) in expect.iter().enumerate() {
            let got = t.frames[w].get(pe);
            let (_, len) = t.window_span(w);
            for m in 0..METRICS {
                let scale = match Metric::ALL[m] {
                    Metric::Send | Metric::Receive => UNIT,
                    Metric::Fabric => 4 * UNIT,
                    _ => 1,
                };
                let exact = c[m] as f64 / (len * scale) as f64;
                let q = got[m] as f64 / 255.0;
                assert_eq!(c[m] > 0, got[m] > 0, "PE {pe} window {w} metric {m}: activity");
                assert!(
                    (q - exact.min(1.0)).abs() <= 0.5 / 255.0 + 1e-12 || (got[m] == 1 && exact < 1.0 / 255.0),
                    "PE {pe} window {w} metric {m}: stored {q}, exact {exact}"
                );
                checked += (c[m] > 0) as u32;
            }
        }
    }
    assert!(checked > 1000, "the fixture exercises the frames ({checked} nonzero values)");
    // Exact series: per region, compute cycles add up to the engine's per-PE busy cycles.
    for (r, _) in f.program.regions.iter().enumerate() {
        let busy: u64 = t.region_series[r].iter().map(|c| c[Metric::Compute as usize]).sum();
        let expect: u64 = (0..pes).filter(|&pe| t.pe_region(pe) == Some(r)).map(|pe| f.run.agents[pe].busy).sum();
        assert_eq!(busy, expect, "region {r}");
        assert!(busy > 0);
    }
    // The port streamed everything the plan says (4 bytes a wavelet, UNIT per wavelet-cycle).
    let sent: u64 = t.port_series[0].iter().map(|c| c[Metric::Send as usize]).sum();
    assert_eq!(sent / UNIT * 4, f.program.ports[0].planned_bytes);
    assert_eq!(t.spans, rec.spans);
    assert_eq!(t.spans_dropped, 0);
    assert!(t.spans.iter().any(|s| s.agent as usize >= pes), "port spans are kept");
}

/// The same run gives the same bytes for any thread count.
#[test]
fn identical_bytes_for_one_and_many_threads() {
    let opts = TraceOptions::default();
    let one = fixture(Fidelity::Detailed, 1);
    let a = trace::encode(&one.header, &one.program, &one.run, &opts).unwrap().0;
    for threads in [2, 3] {
        let many = fixture(Fidelity::Detailed, threads);
        let b = trace::encode(&many.header, &many.program, &many.run, &opts).unwrap().0;
        assert!(a == b, "{threads} threads");
    }
}

/// Fast fidelity keeps every PE: its trace reads back with the same geometry and its own numbers.
#[test]
fn fast_fidelity_traces_read_back() {
    let f = fixture(Fidelity::Fast, 2);
    let (bytes, _) = trace::encode(&f.header, &f.program, &f.run, &TraceOptions::default()).unwrap();
    let t = trace::read_bytes(&bytes, "fast").unwrap();
    assert_eq!(t.header.fidelity, "fast");
    assert_eq!(t.cycles, f.run.cycles);
    let busy: u64 = t.region_series.iter().flatten().map(|c| c[Metric::Compute as usize]).sum();
    assert_eq!(busy, f.run.agents.iter().map(|a| a.busy).sum::<u64>());
}

/// A budget below the full-resolution size widens the window (exactly: bins merge) and says so; a
/// budget below one window is an error that names the size needed.
#[test]
fn the_window_adapts_to_the_budget() {
    let f = fixture(Fidelity::Detailed, 1);
    let (full, info) = trace::encode(&f.header, &f.program, &f.run, &TraceOptions::default()).unwrap();
    let budget = full.len() as u64 / 3;
    let opts = TraceOptions { budget_bytes: budget, window_cycles: None };
    let (small, info2) = trace::encode(&f.header, &f.program, &f.run, &opts).unwrap();
    assert!(info2.adapted && small.len() as u64 <= budget, "{info2:?}");
    assert!(info2.window_cycles >= 2 * info.window_cycles);
    assert!(info2.message().contains("widened from"), "{}", info2.message());
    let t = trace::read_bytes(&small, "small").unwrap();
    assert!(t.adapted);
    let t_full = trace::read_bytes(&full, "full").unwrap();
    // Merging is exact: the series hold the same totals.
    let total = |t: &trace::Trace| -> Vec<u64> {
        (0..METRICS).map(|m| t.region_series.iter().flatten().map(|c| c[m]).sum()).collect()
    };
    assert_eq!(total(&t), total(&t_full));
    let tiny = TraceOptions { budget_bytes: 200, window_cycles: None };
    match trace::encode(&f.header, &f.program, &f.run, &tiny) {
        Err(TraceError::Budget { budget_bytes: 200, needed_bytes }) => assert!(needed_bytes > 200),
        other => panic!("expected a budget error, got {other:?}"),
    }
    // A requested window is a whole multiple of the recording's.
    let asked = TraceOptions { budget_bytes: trace::DEFAULT_BUDGET_BYTES, window_cycles: Some(3 * info.window_cycles) };
    let (_, info3) = trace::encode(&f.header, &f.program, &f.run, &asked).unwrap();
    assert_eq!(info3.window_cycles, 3 * info.window_cycles);
    assert!(!info3.adapted);
}

/// Every truncation and every single-byte change of a file is an error naming an offset, never a panic.
#[test]
fn truncated_and_corrupt_files_are_errors_with_offsets() {
    let f = small_fixture();
    let opts = TraceOptions { window_cycles: Some(f.run.cycles / 10 + 1), ..TraceOptions::default() };
    let (bytes, _) = trace::encode(&f.header, &f.program, &f.run, &opts).unwrap();
    assert!(bytes.len() < 8_000, "keep this test fast: {} bytes", bytes.len());
    for n in 0..bytes.len() {
        let e = trace::read_bytes(&bytes[..n], "t.wtrace").unwrap_err().to_string();
        assert!(e.contains("offset") || n < 8, "cut at {n}: {e}");
    }
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            let e = trace::read_bytes(&b, "t.wtrace").unwrap_err().to_string();
            assert!(e.contains("offset") || e.contains("not a waferscale trace"), "byte {i}: {e}");
        }
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(trace::read_bytes(&longer, "t.wtrace").is_err());
}
