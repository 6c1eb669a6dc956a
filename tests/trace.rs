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

fn small_trace() -> trace::Trace {
    let f = small_fixture();
    let (bytes, _) = trace::encode(&f.header, &f.program, &f.run, &TraceOptions::default()).unwrap();
    trace::read_bytes(&bytes, "small").unwrap()
}

/// Summaries of tiny runs, as YAML (rounded) and as text, in both fidelities.
#[test]
fn summary_snapshots() {
    use waferscale::testing;
    use waferscale::trace::summary::TraceSummary;
    for fidelity in [Fidelity::Detailed, Fidelity::Fast] {
        let f = make_fixture(program(12, 8, 256, 256, 200), fidelity, 1);
        let (bytes, _) = trace::encode(&f.header, &f.program, &f.run, &TraceOptions::default()).unwrap();
        let s = TraceSummary::new(&trace::read_bytes(&bytes, "small").unwrap());
        let name = format!("summary-12x8-{}", fidelity.name());
        testing::settings().bind(|| {
            insta::assert_yaml_snapshot!(name.clone(), testing::rounded(&s, testing::DEFAULT_DIGITS));
            insta::assert_snapshot!(format!("{name}-text"), s.to_text());
        });
        // The summary's region numbers are the engine's own.
        let busy: u64 = f.run.agents[..96].iter().map(|a| a.busy).sum();
        let mesh = s.mesh.compute * 96.0 * f.run.cycles as f64;
        assert!((mesh - busy as f64).abs() < 1e-6 * busy as f64, "{mesh} vs {busy}");
        assert_eq!(s.io_ports.len(), 1);
        assert!(s.io_ports[0].into_mesh > 0.0);
    }
}

/// The heatmap is a picture of the expected size whose map is not uniform: the computing GEMV, the
/// idle PEs and the region outlines all show.
#[test]
fn heatmap_has_the_expected_size_and_is_not_uniform() {
    use waferscale::trace::{heatmap, View};
    let f = fixture(Fidelity::Detailed, 1);
    let (bytes, _) = trace::encode(&f.header, &f.program, &f.run, &TraceOptions::default()).unwrap();
    let t = trace::read_bytes(&bytes, "mem").unwrap();
    let png_bytes = heatmap::png_bytes(&heatmap::render(&t, View::Compute, 0, t.windows as usize - 1)).unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    // 70 x 40 PEs at 11 pixels a PE (800 / 70), plus margins, title, colour bar and legend.
    assert_eq!((info.width, info.height), (8 + 770 + 12 + 16 + 4 + 32 + 8, 8 + 20 + 4 + 440 + 6 + 10 + 8));
    assert_eq!(info.color_type, png::ColorType::Indexed);
    let px = |x: u32, y: u32| buf[(y * info.width + x) as usize];
    let map = |pe_x: u32, pe_y: u32| px(8 + pe_x * 11 + 5, 32 + pe_y * 11 + 5);
    // Over the whole run (the port's stream outlasts the GEMV) GEMV PEs and the consumer computed some of
    // the time (on the colour ramp, indices 16 to 255); a PE that runs nothing is grey (index 3).
    // (The consumer's own cell lies under its region's label, so its value is checked instead.)
    let (gemv, idle) = (map(30, 20), map(68, 30));
    assert!(gemv > 16, "gemv {gemv}");
    assert_eq!(idle, 3);
    let values = heatmap::values(&t, View::Compute, 0, t.windows as usize - 1);
    let consumer = values[66];
    assert!(consumer > 0.0 && consumer != values[20 * 70 + 30], "consumer {consumer}");
    // In the GEMV's busiest window its PEs are near the top of the ramp.
    let busiest = (0..t.windows as usize).max_by_key(|&w| (t.region_series[0][w][0], std::cmp::Reverse(w))).unwrap();
    let pic = heatmap::render(&t, View::Compute, busiest, busiest);
    let at = (32 + 20 * 11 + 5) * pic.width + 8 + 30 * 11 + 5;
    assert!(pic.pixels[at as usize] > 16 + 200, "busiest window: {}", pic.pixels[at as usize]);
    let distinct: std::collections::BTreeSet<u8> = buf.iter().copied().collect();
    assert!(distinct.len() > 20, "a colour bar, outlines, text and the map: {} colours", distinct.len());
    // The animation has one frame per window (at most MAX_FRAMES) of the same size.
    let gif = heatmap::gif_bytes(&t, View::Stall).unwrap();
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::Indexed);
    let mut dec = opts.read_info(std::io::Cursor::new(gif)).unwrap();
    let mut frames = 0;
    let mut differ = false;
    let mut first: Option<Vec<u8>> = None;
    while let Some(fr) = dec.read_next_frame().unwrap() {
        frames += 1;
        match &first {
            None => first = Some(fr.buffer.to_vec()),
            Some(b) => differ |= *b != fr.buffer.to_vec(),
        }
    }
    let expect = if t.windows as usize <= heatmap::MAX_FRAMES {
        t.windows as usize
    } else {
        (t.windows as usize).div_ceil((t.windows as usize).div_ceil(heatmap::MAX_FRAMES))
    };
    assert_eq!(frames, expect, "{} windows", t.windows);
    assert!(differ, "frames change over time");
}

/// The Perfetto export decodes with the official protobuf definitions: the process, per-region and
/// per-port counter tracks with the trace's values, sampled PEs' task slices, and the metadata.
#[test]
fn perfetto_export_decodes_with_the_official_definitions() {
    use perfetto_protos::track_event::track_event::Type;
    use protobuf::Message;
    use std::collections::BTreeMap;
    let t = small_trace();
    let bytes = trace::perfetto::export(&t);
    let decoded = perfetto_protos::trace::Trace::parse_from_bytes(&bytes).unwrap();
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    let mut threads = 0;
    for p in &decoded.packet {
        if p.has_track_descriptor() {
            let td = p.track_descriptor();
            let name = if td.thread.is_some() {
                threads += 1;
                td.thread.thread_name().to_string()
            } else if td.process.is_some() {
                td.process.process_name().to_string()
            } else {
                td.name().to_string()
            };
            names.insert(td.uuid(), name);
        }
    }
    for expect in ["gemv compute %", "gemv stall %", "gemv fabric %", "io.consume compute %", "port mx0 %"] {
        assert!(names.values().any(|n| n == expect), "track {expect} in {names:?}");
    }
    assert!(names.values().any(|n| n.starts_with("wafer wse2: gemv:4096x4096")), "{names:?}");
    assert!(names.values().any(|n| n == "PE (0,0) gemv"), "{names:?}");
    let agents: std::collections::BTreeSet<u32> = t.spans.iter().map(|s| s.agent).collect();
    assert_eq!(threads, agents.len());
    // Counter values: the first window of each region's compute track, from the exact series.
    let pes = t.region_pes();
    let mut counters: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    let mut begins = 0;
    let mut ends = 0;
    let mut meta = None;
    let mut last_ts = 0;
    for p in &decoded.packet {
        if !p.has_track_event() {
            continue;
        }
        assert!(p.timestamp() >= last_ts, "events in time order");
        last_ts = p.timestamp();
        let e = p.track_event();
        match e.type_() {
            Type::TYPE_COUNTER => counters
                .entry(names[&e.track_uuid()].clone())
                .or_default()
                .push((p.timestamp(), e.double_counter_value())),
            Type::TYPE_SLICE_BEGIN => {
                begins += 1;
                assert!(["fmac", "reduce", "tree", "scale", "stream"].contains(&e.name()), "{}", e.name());
            }
            Type::TYPE_SLICE_END => ends += 1,
            Type::TYPE_INSTANT => meta = Some(e.clone()),
            other => panic!("unexpected event type {other:?}"),
        }
    }
    assert_eq!((begins, ends), (t.spans.len(), t.spans.len()));
    for (r, region) in t.regions.iter().enumerate() {
        let series = &counters[&format!("{} compute %", region.name)];
        assert_eq!(series.len(), t.windows as usize + 1, "a value per window and a final 0");
        for (w, (ts, v)) in series.iter().take(t.windows as usize).enumerate() {
            let (start, len) = t.window_span(w);
            let exact = 100.0 * t.region_series[r][w][0] as f64 / (pes[r] * len) as f64;
            assert!((v - exact).abs() < 1e-9, "{} window {w}: {v} vs {exact}", region.name);
            assert_eq!(*ts, (start as f64 * 1e9 / t.header.clock_hz) as u64);
        }
    }
    assert!(counters["port mx0 %"].iter().any(|(_, v)| *v > 0.0));
    let meta = meta.expect("a metadata event");
    let ann: BTreeMap<String, String> = meta
        .debug_annotations
        .iter()
        .map(|a| {
            let v = if a.has_string_value() {
                a.string_value().to_string()
            } else if a.has_uint_value() {
                a.uint_value().to_string()
            } else if a.has_bool_value() {
                a.bool_value().to_string()
            } else {
                a.double_value().to_string()
            };
            (a.name().to_string(), v)
        })
        .collect();
    assert_eq!(ann["model"], "gemv:4096x4096");
    assert_eq!(ann["hardware"], "wse2");
    assert_eq!(ann["window_cycles"], t.window_cycles.to_string());
    assert_eq!(ann["cycles"], t.cycles.to_string());
}

/// `wafer trace ...` on a written file: every command succeeds; bad files and bad questions exit 2 with
/// a message naming the offset or the entity.
#[test]
fn trace_commands_and_their_errors() {
    use std::process::Command;
    use waferscale::testing;
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("trace-cli");
    std::fs::create_dir_all(&dir).unwrap();
    let f = small_fixture();
    let file = dir.join("small.wtrace");
    let info = trace::write(&file, &f.header, &f.program, &f.run, &TraceOptions::default()).unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), info.bytes);
    let file = file.to_str().unwrap().to_string();
    let wafer = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_wafer")).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let out = |name: &str| dir.join(name).to_str().unwrap().to_string();
    for args in [
        vec!["trace", "summary", &file],
        vec!["trace", "summary", &file, "--json"],
        vec!["trace", "timeline", &file, "--metric", "stall"],
        vec!["trace", "slice", &file, "--pe", "0,0"],
        vec!["trace", "slice", &file, "--region", "io.consume", "--json"],
    ] {
        let (code, stdout, stderr) = wafer(&args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(!stdout.is_empty());
    }
    let (png, gif, pf) = (out("c.png"), out("s.gif"), out("t.perfetto-trace"));
    for args in [
        vec!["trace", "heatmap", &file, "-o", &png],
        vec!["trace", "heatmap", &file, "--metric", "stall", "--all", "-o", &gif],
        vec!["trace", "export", &file, "--perfetto", "-o", &pf],
    ] {
        let (code, _, stderr) = wafer(&args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
    }
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    assert!(std::fs::read(&gif).unwrap().starts_with(b"GIF89a"));
    // Bad files and bad questions.
    let bytes = std::fs::read(&file).unwrap();
    let cut = out("cut.wtrace");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let flipped = out("flipped.wtrace");
    let mut b = bytes.clone();
    let i = b.len() - 40;
    b[i] ^= 0x10;
    std::fs::write(&flipped, &b).unwrap();
    let text = out("text.wtrace");
    std::fs::write(&text, "hello, world\n").unwrap();
    let old = out("v9.wtrace");
    let mut b = bytes.clone();
    b[8] = 9;
    std::fs::write(&old, &b).unwrap();
    let missing = out("missing.wtrace");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("truncated", vec!["trace", "summary", &cut]),
        ("corrupt", vec!["trace", "summary", &flipped]),
        ("not-a-trace", vec!["trace", "timeline", &text]),
        ("future-version", vec!["trace", "summary", &old]),
        ("missing-file", vec!["trace", "summary", &missing]),
        ("pe-outside-mesh", vec!["trace", "slice", &file, "--pe", "12,3"]),
        ("unknown-region", vec!["trace", "slice", &file, "--region", "l0.mlp"]),
        ("window-past-the-end", vec!["trace", "heatmap", &file, "--window", "999999", "-o", &png]),
        ("all-needs-gif", vec!["trace", "heatmap", &file, "--all", "-o", &png]),
    ];
    for (name, args) in cases {
        let (code, _, stderr) = wafer(&args);
        assert_eq!(code, Some(2), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        testing::settings().bind(|| insta::assert_snapshot!(format!("cli-error-{name}"), stderr));
    }
}

/// `traces/example-12x8.wtrace` (the tour's example) stays readable by this build: a reader that
/// changes must bump the format version. Regenerate it with `WAFER_WRITE_EXAMPLE_TRACE=1` (and review
/// the summary snapshot) when the version is bumped.
#[test]
fn the_shipped_example_trace_reads() {
    use waferscale::trace::summary::TraceSummary;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/traces/example-12x8.wtrace");
    if std::env::var_os("WAFER_WRITE_EXAMPLE_TRACE").is_some() {
        let f = small_fixture();
        trace::write(path, &f.header, &f.program, &f.run, &TraceOptions::default()).unwrap();
    }
    let t = trace::read(path).unwrap();
    assert_eq!(t.format_version, trace::FORMAT_VERSION);
    waferscale::testing::settings()
        .bind(|| insta::assert_snapshot!("example-12x8-summary", TraceSummary::new(&t).to_text()));
}
