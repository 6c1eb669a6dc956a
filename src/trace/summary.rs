//! `wafer trace summary`: utilization by region and over time, the idlest and hottest PEs and regions,
//! link and IO hotspots, and stall causes. A serde type (for `--json` and snapshots) with a text printer.
//!
//! Region, port and over-time numbers come from the exact series; per-PE rankings from the quantised
//! frames (each value within half of 1/255 of its window's exact fraction).

use serde::Serialize;

use super::{fractions, metric_scale, side_name, Counts, Trace};
use crate::engine::record::{Metric, METRICS};
use crate::report::WorkloadSummary;

/// How many PEs, routers and regions each ranking lists.
pub const TOP: usize = 5;
/// Rows of the over-time table: windows are grouped into at most this many.
pub const TIME_ROWS: usize = 16;

/// Fractions of capacity, per metric: compute and stalls of cycles, send and receive of the ramps, fabric
/// of the four outgoing links.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Busy {
    pub compute: f64,
    pub send: f64,
    pub receive: f64,
    pub fabric: f64,
    pub stall_data: f64,
    pub stall_backpressure: f64,
    pub stall_io: f64,
}

impl Busy {
    pub fn from_fractions(f: &[f64; METRICS]) -> Busy {
        Busy {
            compute: f[Metric::Compute as usize],
            send: f[Metric::Send as usize],
            receive: f[Metric::Receive as usize],
            fabric: f[Metric::Fabric as usize],
            stall_data: f[Metric::StallData as usize],
            stall_backpressure: f[Metric::StallBackpressure as usize],
            stall_io: f[Metric::StallIo as usize],
        }
    }
    pub fn stalled(&self) -> f64 {
        self.stall_data + self.stall_backpressure + self.stall_io
    }
    /// Neither computing nor stalled in a task.
    pub fn idle(&self) -> f64 {
        (1.0 - self.compute - self.stalled()).max(0.0)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RegionRow {
    pub name: String,
    pub kind: String,
    pub algorithm: String,
    pub pes: u64,
    pub busy: Busy,
    pub idle: f64,
    /// SRAM allocated on its PEs over their capacity.
    pub sram: f64,
    /// The window in which it computed most.
    pub busiest_window: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimeRow {
    pub first_window: u32,
    pub last_window: u32,
    pub start_cycle: u64,
    pub end_cycle: u64,
    /// Over all PEs of the mesh.
    pub busy: Busy,
    /// The region that computed most (busy fraction of its PEs), if any did.
    pub busiest_region: Option<String>,
}

/// A PE and a value over the whole run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeRow {
    pub x: u32,
    pub y: u32,
    pub region: String,
    pub value: f64,
}

/// A region and its compute fraction over the run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RegionRank {
    pub name: String,
    pub compute: f64,
    pub stalled: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PortRow {
    pub name: String,
    pub side: String,
    pub peer: String,
    /// Fraction of the port's rate used carrying data into the mesh and out of it.
    pub into_mesh: f64,
    pub out_of_mesh: f64,
    /// Wavelets carried (32 bits each), both directions.
    pub wavelets: u64,
    /// The window in which it was busiest.
    pub busiest_window: u32,
}

/// Stalled cycles summed over all PEs, by cause.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stalls {
    pub data_cycles: u64,
    pub backpressure_cycles: u64,
    pub io_cycles: u64,
    /// The region with the most stalled cycles per PE, and its dominant cause.
    pub worst_region: Option<String>,
    pub worst_region_cause: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TraceSummary {
    pub model: String,
    pub workload: WorkloadSummary,
    pub hardware: String,
    pub fidelity: String,
    pub mode: String,
    pub version: String,
    pub width: u32,
    pub height: u32,
    pub cycles: u64,
    pub seconds: f64,
    pub window_cycles: u64,
    pub windows: u32,
    /// The window was widened to fit the trace's budget.
    pub adapted: bool,
    /// Over every PE of the mesh and the whole run.
    pub mesh: Busy,
    pub regions: Vec<RegionRow>,
    /// PEs in no region, if any.
    pub unassigned_pes: u64,
    pub over_time: Vec<TimeRow>,
    /// PEs of regions, by compute over the run.
    pub hottest_pes: Vec<PeRow>,
    pub idlest_pes: Vec<PeRow>,
    pub hottest_regions: Vec<RegionRank>,
    pub idlest_regions: Vec<RegionRank>,
    /// Routers by the busy fraction of their four outgoing links.
    pub link_hotspots: Vec<PeRow>,
    /// Ports, busiest first.
    pub io_ports: Vec<PortRow>,
    pub stalls: Stalls,
}

fn add(a: &mut Counts, b: &Counts) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

impl TraceSummary {
    pub fn new(t: &Trace) -> TraceSummary {
        let cycles = t.cycles.max(1);
        let n_pes = t.region_pes();
        let pes = t.pes() as u64;
        // Whole-run totals per region group (regions, then unassigned).
        let totals: Vec<Counts> = t
            .region_series
            .iter()
            .map(|s| {
                let mut c = [0; METRICS];
                s.iter().for_each(|w| add(&mut c, w));
                c
            })
            .collect();
        let mut all = [0; METRICS];
        totals.iter().for_each(|c| add(&mut all, c));
        let mesh = Busy::from_fractions(&fractions(&all, pes, cycles, t.unit));
        let mut sram = vec![0u64; t.regions.len() + 1];
        for pe in 0..t.pes() {
            sram[t.pe_region(pe).unwrap_or(t.regions.len())] += t.pe_sram_bytes(pe);
        }
        let regions: Vec<RegionRow> = t
            .regions
            .iter()
            .enumerate()
            .map(|(r, info)| {
                let busy = Busy::from_fractions(&fractions(&totals[r], n_pes[r], cycles, t.unit));
                let busiest_window =
                    argmax(t.region_series[r].iter().enumerate().map(|(w, c)| t.pe_fractions(c, n_pes[r], w)[0]));
                RegionRow {
                    name: info.name.clone(),
                    kind: info.kind.clone(),
                    algorithm: info.algorithm.clone(),
                    pes: n_pes[r],
                    idle: busy.idle(),
                    busy,
                    sram: if n_pes[r] == 0 || t.sram_capacity_bytes == 0 {
                        0.0
                    } else {
                        sram[r] as f64 / (n_pes[r] as f64 * t.sram_capacity_bytes as f64)
                    },
                    busiest_window,
                }
            })
            .collect();

        // Over time: consecutive windows grouped into at most TIME_ROWS rows.
        let per_row = (t.windows as usize).div_ceil(TIME_ROWS).max(1);
        let mut over_time = Vec::new();
        for first in (0..t.windows as usize).step_by(per_row) {
            let last = (first + per_row).min(t.windows as usize) - 1;
            let start = t.window_span(first).0;
            let (ls, ll) = t.window_span(last);
            let end = (ls + ll).min(t.cycles.max(ls + ll));
            let len = end - start;
            let mut sum = [0; METRICS];
            let mut best: Option<(f64, usize)> = None;
            for (r, s) in t.region_series.iter().enumerate() {
                let mut c = [0; METRICS];
                s[first..=last].iter().for_each(|w| add(&mut c, w));
                add(&mut sum, &c);
                if r < t.regions.len() && n_pes[r] > 0 {
                    let f = fractions(&c, n_pes[r], len, t.unit)[0];
                    if f > 0.0 && best.is_none_or(|(b, _)| f > b) {
                        best = Some((f, r));
                    }
                }
            }
            over_time.push(TimeRow {
                first_window: first as u32,
                last_window: last as u32,
                start_cycle: start,
                end_cycle: end,
                busy: Busy::from_fractions(&fractions(&sum, pes, len, t.unit)),
                busiest_region: best.map(|(_, r)| t.regions[r].name.clone()),
            });
        }

        // Per PE over the run, from the frames: compute and fabric.
        let mut compute = vec![0u64; t.pes()];
        let mut fabric = vec![0u64; t.pes()];
        for (w, f) in t.frames.iter().enumerate() {
            let (_, len) = t.window_span(w);
            for (pe, v) in f.iter() {
                compute[pe] += v[Metric::Compute as usize] as u64 * len;
                fabric[pe] += v[Metric::Fabric as usize] as u64 * len;
            }
        }
        let denom = 255.0 * cycles as f64;
        let row = |pe: usize, v: u64| {
            let c = t.coord(pe);
            PeRow {
                x: c.x,
                y: c.y,
                region: t.pe_region(pe).map_or("(no region)".to_string(), |r| t.regions[r].name.clone()),
                value: v as f64 / denom,
            }
        };
        let mut in_regions: Vec<usize> = (0..t.pes()).filter(|&pe| t.pe_region(pe).is_some()).collect();
        in_regions.sort_by_key(|&pe| (std::cmp::Reverse(compute[pe]), pe));
        let hottest_pes = in_regions.iter().take(TOP).map(|&pe| row(pe, compute[pe])).collect();
        in_regions.sort_by_key(|&pe| (compute[pe], pe));
        let idlest_pes = in_regions.iter().take(TOP).map(|&pe| row(pe, compute[pe])).collect();
        let mut routers: Vec<usize> = (0..t.pes()).filter(|&pe| fabric[pe] > 0).collect();
        routers.sort_by_key(|&pe| (std::cmp::Reverse(fabric[pe]), pe));
        let link_hotspots = routers.iter().take(TOP).map(|&pe| row(pe, fabric[pe])).collect();

        let mut ranks: Vec<RegionRank> = regions
            .iter()
            .filter(|r| r.pes > 0)
            .map(|r| RegionRank { name: r.name.clone(), compute: r.busy.compute, stalled: r.busy.stalled() })
            .collect();
        ranks.sort_by(|a, b| b.compute.total_cmp(&a.compute).then(a.name.cmp(&b.name)));
        let hottest_regions = ranks.iter().take(TOP).cloned().collect();
        ranks.sort_by(|a, b| a.compute.total_cmp(&b.compute).then(a.name.cmp(&b.name)));
        let idlest_regions = ranks.iter().take(TOP).cloned().collect();

        let mut io_ports: Vec<PortRow> = t
            .ports
            .iter()
            .zip(&t.port_series)
            .map(|(p, s)| {
                let mut c = [0; METRICS];
                s.iter().for_each(|w| add(&mut c, w));
                let cap = p.capacity_units as f64 * cycles as f64;
                let (snd, rcv) = (Metric::Send as usize, Metric::Receive as usize);
                PortRow {
                    name: p.name.clone(),
                    side: side_name(p.side).to_string(),
                    peer: p.peer.clone(),
                    into_mesh: c[snd] as f64 / cap,
                    out_of_mesh: c[rcv] as f64 / cap,
                    wavelets: (c[snd] + c[rcv]) / metric_scale(snd, t.unit),
                    busiest_window: argmax(s.iter().map(|w| (w[snd] + w[rcv]) as f64)),
                }
            })
            .collect();
        io_ports.sort_by(|a, b| {
            (b.into_mesh + b.out_of_mesh).total_cmp(&(a.into_mesh + a.out_of_mesh)).then(a.name.cmp(&b.name))
        });

        let (sd, sb, si) = (Metric::StallData as usize, Metric::StallBackpressure as usize, Metric::StallIo as usize);
        let worst = (0..t.regions.len())
            .filter(|&r| n_pes[r] > 0)
            .map(|r| (totals[r][sd] + totals[r][sb] + totals[r][si], r))
            .filter(|(s, _)| *s > 0)
            .max_by(|a, b| {
                let (fa, fb) = (a.0 as f64 / n_pes[a.1] as f64, b.0 as f64 / n_pes[b.1] as f64);
                fa.total_cmp(&fb).then(b.1.cmp(&a.1))
            });
        let stalls = Stalls {
            data_cycles: all[sd],
            backpressure_cycles: all[sb],
            io_cycles: all[si],
            worst_region: worst.map(|(_, r)| t.regions[r].name.clone()),
            worst_region_cause: worst.map(|(_, r)| {
                let c = &totals[r];
                let cause = [(c[sd], "data"), (c[sb], "backpressure"), (c[si], "io")]
                    .into_iter()
                    .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(a.1)))
                    .map_or("data", |x| x.1);
                cause.to_string()
            }),
        };

        let h = &t.header;
        TraceSummary {
            model: h.model.clone(),
            workload: h.workload.clone(),
            hardware: h.hardware.clone(),
            fidelity: h.fidelity.clone(),
            mode: h.mode.clone(),
            version: h.version.clone(),
            width: t.width,
            height: t.height,
            cycles: t.cycles,
            seconds: t.cycles as f64 / h.clock_hz,
            window_cycles: t.window_cycles,
            windows: t.windows,
            adapted: t.adapted,
            mesh,
            regions,
            unassigned_pes: *n_pes.last().unwrap_or(&0),
            over_time,
            hottest_pes,
            idlest_pes,
            hottest_regions,
            idlest_regions,
            link_hotspots,
            io_ports,
            stalls,
        }
    }

    /// The text `wafer trace summary` prints.
    pub fn to_text(&self) -> String {
        use crate::report::fmt::thousands;
        use std::fmt::Write as _;
        let pct = |f: f64| format!("{:.1}%", 100.0 * f);
        let mut s = String::new();
        let w = &self.workload;
        let _ = writeln!(
            s,
            "trace       {}  {} batch {} seq {}, {}  on {} ({} x {} PEs), {}, {} fidelity",
            self.model,
            w.phase,
            w.batch,
            w.seq,
            w.dtype,
            self.hardware,
            self.width,
            self.height,
            self.mode,
            self.fidelity
        );
        let _ = writeln!(
            s,
            "run         {} cycles ({}) in {} windows of {} cycles{}",
            thousands(self.cycles),
            super::seconds_text(self.seconds),
            self.windows,
            thousands(self.window_cycles),
            if self.adapted { " (widened to fit the trace budget)" } else { "" }
        );
        let m = &self.mesh;
        let _ = writeln!(
            s,
            "mesh        compute {}  send {}  receive {}  fabric {}  stalled {} (data {}, backpressure {}, io {})",
            pct(m.compute),
            pct(m.send),
            pct(m.receive),
            pct(m.fabric),
            pct(m.stalled()),
            pct(m.stall_data),
            pct(m.stall_backpressure),
            pct(m.stall_io)
        );
        let _ = writeln!(
            s,
            "\nregions                            PEs  compute  stalled   idle   send   recv  fabric   sram  busiest window"
        );
        for r in &self.regions {
            let b = &r.busy;
            let _ = writeln!(
                s,
                "  {:<28} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>7} {:>6}  {}",
                r.name,
                r.pes,
                pct(b.compute),
                pct(b.stalled()),
                pct(r.idle),
                pct(b.send),
                pct(b.receive),
                pct(b.fabric),
                pct(r.sram),
                r.busiest_window
            );
        }
        if self.unassigned_pes > 0 {
            let _ = writeln!(
                s,
                "  {:<28} {:>8}  (PEs in no tile: they run no task, their routers may forward)",
                "(no region)", self.unassigned_pes
            );
        }
        let _ = writeln!(s, "\nover time (mesh)                       compute  stalled  fabric  busiest region");
        for r in &self.over_time {
            let win = if r.first_window == r.last_window {
                format!("w{}", r.first_window)
            } else {
                format!("w{}-{}", r.first_window, r.last_window)
            };
            let _ = writeln!(
                s,
                "  {:<10} cycles {:>10}..{:<10} {:>8} {:>8} {:>7}  {}",
                win,
                thousands(r.start_cycle),
                thousands(r.end_cycle),
                pct(r.busy.compute),
                pct(r.busy.stalled()),
                pct(r.busy.fabric),
                r.busiest_region.as_deref().unwrap_or("-")
            );
        }
        let pes = |rows: &[PeRow]| -> String {
            if rows.is_empty() {
                return "-".to_string();
            }
            rows.iter()
                .map(|p| format!("({},{}) {} {}", p.x, p.y, p.region, pct(p.value)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let regs = |rows: &[RegionRank]| -> String {
            if rows.is_empty() {
                return "-".to_string();
            }
            rows.iter().map(|r| format!("{} {}", r.name, pct(r.compute))).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(s, "\nhottest PEs      {}", pes(&self.hottest_pes));
        let _ = writeln!(s, "idlest PEs       {}", pes(&self.idlest_pes));
        let _ = writeln!(s, "hottest regions  {}", regs(&self.hottest_regions));
        let _ = writeln!(s, "idlest regions   {}", regs(&self.idlest_regions));
        let _ = writeln!(s, "link hotspots    {}  (router's 4 outgoing links)", pes(&self.link_hotspots));
        if self.io_ports.is_empty() {
            let _ = writeln!(s, "io ports         none");
        } else {
            let _ = writeln!(
                s,
                "\nio ports                side   peer        into mesh  out of mesh      wavelets  busiest window"
            );
            for p in &self.io_ports {
                let _ = writeln!(
                    s,
                    "  {:<20}  {:<6} {:<10} {:>10} {:>12} {:>13}  {}",
                    p.name,
                    p.side,
                    p.peer,
                    pct(p.into_mesh),
                    pct(p.out_of_mesh),
                    thousands(p.wavelets),
                    p.busiest_window
                );
            }
        }
        let st = &self.stalls;
        let total = (st.data_cycles + st.backpressure_cycles + st.io_cycles).max(1) as f64;
        let _ = writeln!(
            s,
            "\nstall causes     waiting for data {} cycles ({}), backpressure {} ({}), io {} ({})",
            thousands(st.data_cycles),
            pct(st.data_cycles as f64 / total),
            thousands(st.backpressure_cycles),
            pct(st.backpressure_cycles as f64 / total),
            thousands(st.io_cycles),
            pct(st.io_cycles as f64 / total)
        );
        if let (Some(r), Some(c)) = (&st.worst_region, &st.worst_region_cause) {
            let _ = writeln!(s, "most stalled     {r} (mostly {c})");
        }
        s
    }
}

/// Index of the largest value (the first on ties); 0 for none.
fn argmax(values: impl Iterator<Item = f64>) -> u32 {
    let mut best: Option<(f64, u32)> = None;
    for (i, v) in values.enumerate() {
        if best.is_none_or(|(b, _)| v > b) {
            best = Some((v, i as u32));
        }
    }
    best.map_or(0, |(_, i)| i)
}
