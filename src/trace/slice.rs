//! `wafer trace slice`: the history of one PE (from the frames, and its task runs if it was sampled) or
//! of one region (from the exact series), window by window, as text or JSON.

use serde::Serialize;

use super::summary::Busy;
use super::{fractions, Trace, TraceError};
use crate::engine::record::METRICS;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SliceRow {
    pub window: u32,
    pub start_cycle: u64,
    pub cycles: u64,
    pub busy: Busy,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SpanRow {
    pub task: String,
    pub start_cycle: u64,
    pub finish_cycle: u64,
    pub compute_cycles: u64,
}

/// One PE's history. Values are quantised to 1/255 per window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeSlice {
    pub x: u32,
    pub y: u32,
    pub region: Option<String>,
    pub template: Option<String>,
    pub sram_bytes: u64,
    pub sram: f64,
    pub windows: Vec<SliceRow>,
    /// Whether its task runs were recorded (sampled PEs only).
    pub sampled: bool,
    pub spans: Vec<SpanRow>,
}

/// One region's history, exact.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RegionSlice {
    pub name: String,
    pub kind: String,
    pub algorithm: String,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub pes: u64,
    pub sram: f64,
    pub windows: Vec<SliceRow>,
    /// Task runs of its sampled PEs.
    pub spans: Vec<(String, SpanRow)>,
}

fn spans_of(t: &Trace, agent: u32) -> Vec<SpanRow> {
    let tpl = t.agent_template(agent);
    t.spans
        .iter()
        .filter(|s| s.agent == agent)
        .map(|s| SpanRow {
            task: tpl
                .and_then(|tp| tp.tasks.get(s.task as usize))
                .cloned()
                .unwrap_or_else(|| format!("task {}", s.task)),
            start_cycle: s.start,
            finish_cycle: s.finish,
            compute_cycles: s.compute,
        })
        .collect()
}

impl PeSlice {
    pub fn new(t: &Trace, x: u32, y: u32) -> Result<PeSlice, TraceError> {
        let pe = t.pe_index(x, y)?;
        let windows = t
            .frames
            .iter()
            .enumerate()
            .map(|(w, f)| {
                let (start, len) = t.window_span(w);
                let q = f.get(pe);
                let mut fr = [0.0; METRICS];
                for (a, b) in fr.iter_mut().zip(q) {
                    *a = b as f64 / 255.0;
                }
                SliceRow { window: w as u32, start_cycle: start, cycles: len, busy: Busy::from_fractions(&fr) }
            })
            .collect();
        let spans = spans_of(t, pe as u32);
        Ok(PeSlice {
            x,
            y,
            region: t.pe_region(pe).map(|r| t.regions[r].name.clone()),
            template: t.agent_template(pe as u32).map(|tp| tp.name.clone()),
            sram_bytes: t.pe_sram_bytes(pe),
            sram: t.pe_sram(pe),
            windows,
            sampled: !spans.is_empty(),
            spans,
        })
    }

    pub fn to_text(&self) -> String {
        let mut s = format!(
            "PE ({},{})  region {}  template {}  SRAM {} bytes ({:.1}%)\n",
            self.x,
            self.y,
            self.region.as_deref().unwrap_or("(none)"),
            self.template.as_deref().unwrap_or("(none)"),
            self.sram_bytes,
            100.0 * self.sram
        );
        s.push_str("(per window, quantised to 1/255)\n");
        s.push_str(&rows_text(&self.windows));
        if self.sampled {
            s.push_str(&spans_text(self.spans.iter().map(|r| (None, r))));
        } else {
            s.push_str("\nno task runs: this PE was not sampled (corners and centre of each region are)\n");
        }
        s
    }
}

impl RegionSlice {
    pub fn new(t: &Trace, name: &str) -> Result<RegionSlice, TraceError> {
        let r = t.region_index(name)?;
        let info = &t.regions[r];
        let n = t.region_pes()[r];
        let windows = t.region_series[r]
            .iter()
            .enumerate()
            .map(|(w, c)| {
                let (start, len) = t.window_span(w);
                SliceRow {
                    window: w as u32,
                    start_cycle: start,
                    cycles: len,
                    busy: Busy::from_fractions(&fractions(c, n, len, t.unit)),
                }
            })
            .collect();
        let mut agents: Vec<u32> = t.spans.iter().map(|s| s.agent).collect();
        agents.dedup();
        let spans = agents
            .into_iter()
            .filter(|&a| (a as usize) < t.pes() && t.pe_region(a as usize) == Some(r))
            .flat_map(|a| spans_of(t, a).into_iter().map(move |row| (a, row)))
            .map(|(a, row)| (t.agent_name(a), row))
            .collect();
        Ok(RegionSlice {
            name: info.name.clone(),
            kind: info.kind.clone(),
            algorithm: info.algorithm.clone(),
            x: info.rect.x,
            y: info.rect.y,
            width: info.rect.w,
            height: info.rect.h,
            pes: n,
            sram: t.region_sram(r),
            windows,
            spans,
        })
    }

    pub fn to_text(&self) -> String {
        let mut s = format!(
            "region {}  {} ({})  {} x {} at ({},{}), {} PEs, SRAM {:.1}%\n",
            self.name,
            self.kind,
            self.algorithm,
            self.width,
            self.height,
            self.x,
            self.y,
            self.pes,
            100.0 * self.sram
        );
        s.push_str("(per window, exact, averaged over its PEs)\n");
        s.push_str(&rows_text(&self.windows));
        if !self.spans.is_empty() {
            s.push_str(&spans_text(self.spans.iter().map(|(a, r)| (Some(a.as_str()), r))));
        }
        s
    }
}

fn rows_text(rows: &[SliceRow]) -> String {
    use crate::report::fmt::thousands;
    use std::fmt::Write as _;
    let mut s = String::from("window        start   compute  st.data  st.back  st.io    send    recv  fabric\n");
    let p = |f: f64| format!("{:.1}%", 100.0 * f);
    for r in rows {
        let b = &r.busy;
        let _ = writeln!(
            s,
            "{:>6} {:>12} {:>9} {:>8} {:>8} {:>6} {:>7} {:>7} {:>7}",
            r.window,
            thousands(r.start_cycle),
            p(b.compute),
            p(b.stall_data),
            p(b.stall_backpressure),
            p(b.stall_io),
            p(b.send),
            p(b.receive),
            p(b.fabric)
        );
    }
    s
}

fn spans_text<'a>(spans: impl Iterator<Item = (Option<&'a str>, &'a SpanRow)>) -> String {
    use crate::report::fmt::thousands;
    use std::fmt::Write as _;
    let mut s = String::from("\ntask runs                         start       finish    compute\n");
    for (agent, r) in spans {
        let name = match agent {
            Some(a) => format!("{a} {}", r.task),
            None => r.task.clone(),
        };
        let _ = writeln!(
            s,
            "  {:<26} {:>12} {:>12} {:>10}",
            name,
            thousands(r.start_cycle),
            thousands(r.finish_cycle),
            thousands(r.compute_cycles)
        );
    }
    s
}
