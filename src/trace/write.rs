//! From an engine run to trace bytes: geometry from the mesh program, exact per-region and per-port
//! series, quantised per-PE frames, spans, and the window that makes it all fit the budget.

use std::path::Path;

use bitvec::prelude::*;

use super::format::{self, var_len, Enc, FORMAT_VERSION, MAGIC, Q_MAX, SECTION_OVERHEAD};
use super::*;
use crate::engine::record::{Recording, METRICS};
use crate::engine::{EngineRun, UNIT};
use crate::mesh::Peer;

/// What `write` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteInfo {
    /// Bytes in the file.
    pub bytes: u64,
    pub window_cycles: u64,
    pub windows: u32,
    /// The engine's recording window.
    pub recorded_window_cycles: u64,
    pub requested_window_cycles: Option<u64>,
    /// The window was widened beyond the recording's (or the requested) one to fit the budget.
    pub adapted: bool,
    pub budget_bytes: u64,
    pub spans: u64,
    pub spans_dropped: u64,
}

impl WriteInfo {
    /// One line for the user: the size, the window, and why it is what it is.
    pub fn message(&self) -> String {
        use crate::report::fmt::thousands;
        let mut s = format!(
            "trace: {} bytes, {} windows of {} cycles",
            thousands(self.bytes),
            self.windows,
            thousands(self.window_cycles)
        );
        let base = match self.requested_window_cycles {
            Some(r) if r != self.window_cycles && !self.adapted => {
                s.push_str(&format!(
                    " (asked for {}; windows are whole multiples of the recording's {})",
                    thousands(r),
                    thousands(self.recorded_window_cycles)
                ));
                None
            }
            Some(r) => Some(r.max(self.recorded_window_cycles)),
            None => Some(self.recorded_window_cycles),
        };
        if let (true, Some(b)) = (self.adapted, base) {
            s.push_str(&format!(
                " (widened from {} to fit the budget of {} bytes)",
                thousands(b),
                thousands(self.budget_bytes)
            ));
        }
        if self.spans_dropped > 0 {
            s.push_str(&format!("; kept the first {} task spans, dropped {}", self.spans, self.spans_dropped));
        }
        s
    }
}

/// Writes the trace of `run` (which must have been recorded with a `TraceSpec`, see `spec_for`) to
/// `path`, atomically: a temporary file beside it, renamed into place.
pub fn write(
    path: impl AsRef<Path>,
    header: &TraceHeader,
    program: &MeshProgram,
    run: &EngineRun,
    opts: &TraceOptions,
) -> Result<WriteInfo, TraceError> {
    let path = path.as_ref();
    let (bytes, info) = encode(header, program, run, opts)?;
    let name = path.display().to_string();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let res = std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|source| TraceError::Write { path: name, source })?;
    Ok(info)
}

/// Geometry of the program, as the file stores it.
pub(super) fn geometry(program: &MeshProgram) -> (Vec<RegionInfo>, Vec<TemplateInfo>, Vec<TileInfo>, Vec<PortInfo>) {
    let regions = program
        .regions
        .iter()
        .map(|r| RegionInfo {
            name: r.name.clone(),
            kind: r.kind.clone(),
            algorithm: r.algorithm.clone(),
            rect: r.rect,
            flops: r.flops,
        })
        .collect();
    let templates = program
        .templates
        .iter()
        .map(|t| TemplateInfo {
            name: t.name.clone(),
            region: t.region.0,
            sram_bytes: t.sram_bytes,
            tasks: t.tasks.iter().map(|k| k.name.clone()).collect(),
        })
        .collect();
    let tiles = program.tiles.iter().map(|t| TileInfo { rect: t.rect, template: t.template.0 }).collect();
    let ports = program
        .ports
        .iter()
        .map(|p| PortInfo {
            name: p.name.clone(),
            side: p.side,
            at: p.at,
            wavelets: p.wavelets,
            per_cycles: p.per_cycles,
            peer: match p.peer {
                Peer::MemoryX => "memoryx".to_string(),
                Peer::SwarmX => "swarmx".to_string(),
                Peer::Host => "host".to_string(),
                Peer::Wafer(w) => format!("wafer {w}"),
            },
            template: p.template.0,
            // The engine's port capacity (an integer token bucket's rate in capacity units per cycle).
            capacity_units: ((UNIT as u128 * p.wavelets as u128) / p.per_cycles.max(1) as u128).max(1) as u64,
        })
        .collect();
    (regions, templates, tiles, ports)
}

/// Everything `encode` needs at one merge factor.
struct Layout<'a> {
    rec: &'a Recording,
    pes: usize,
    /// Engine windows per trace window.
    k: u64,
    window: u64,
    windows: usize,
    cycles: u64,
}

impl Layout<'_> {
    fn new(rec: &Recording, pes: usize, k: u64, cycles: u64) -> Layout<'_> {
        let window = rec.window_cycles * k;
        let last_bin = rec.bins.iter().filter_map(|b| b.last()).map(|b| b.0 as u64 / k + 1).max().unwrap_or(0);
        let windows = cycles.div_ceil(window).max(last_bin).max(1) as usize;
        Layout { rec, pes, k, window, windows, cycles }
    }

    /// Exact sums per group (`group_of[agent]`, `None` to skip) and window.
    fn series(&self, groups: usize, group_of: impl Fn(usize) -> Option<usize>) -> Vec<Vec<Counts>> {
        let mut s = vec![vec![[0u64; METRICS]; self.windows]; groups];
        for (agent, bins) in self.rec.bins.iter().enumerate() {
            let Some(g) = group_of(agent) else { continue };
            for (idx, c) in bins {
                let w = (*idx as u64 / self.k) as usize;
                for (a, b) in s[g][w].iter_mut().zip(c) {
                    *a += b;
                }
            }
        }
        s
    }

    /// Bytes of the FRMS payload, from which (PE, metric) pairs are nonzero: a quantised value is
    /// nonzero exactly when its count is, so this needs no quantisation.
    fn frames_bytes(&self) -> u64 {
        let mut active = vec![0u64; self.windows];
        let mut nonzero = vec![0u64; self.windows];
        for bins in &self.rec.bins[..self.pes] {
            let mut cur: Option<(usize, u8)> = None;
            for (idx, c) in bins {
                let w = (*idx as u64 / self.k) as usize;
                let mask = c.iter().enumerate().fold(0u8, |m, (i, v)| if *v > 0 { m | 1 << i } else { m });
                cur = match cur {
                    Some((cw, m)) if cw == w => Some((w, m | mask)),
                    Some((cw, m)) => {
                        if m != 0 {
                            active[cw] += 1;
                            nonzero[cw] += m.count_ones() as u64;
                        }
                        Some((w, mask))
                    }
                    None => Some((w, mask)),
                };
            }
            if let Some((cw, m)) = cur {
                if m != 0 {
                    active[cw] += 1;
                    nonzero[cw] += m.count_ones() as u64;
                }
            }
        }
        let bitmap = (self.pes as u64).div_ceil(8);
        active
            .iter()
            .zip(&nonzero)
            .map(|(&a, &nz)| {
                let len = bitmap + METRICS as u64 * a.div_ceil(8) + nz;
                var_len(len) + len
            })
            .sum()
    }

    /// The FRMS payload.
    fn frames(&self) -> Vec<u8> {
        let mut out = Enc::default();
        let mut cursor = vec![0usize; self.pes];
        let mut vals: Vec<(usize, [u8; METRICS])> = Vec::new();
        let mut frame = Enc::default();
        for w in 0..self.windows {
            let (_, len) = window_span(self.window, self.cycles, w);
            vals.clear();
            for (pe, bins) in self.rec.bins[..self.pes].iter().enumerate() {
                let mut c = [0u64; METRICS];
                let mut any = false;
                while let Some((idx, v)) = bins.get(cursor[pe]) {
                    if (*idx as u64 / self.k) as usize != w {
                        break;
                    }
                    for (a, b) in c.iter_mut().zip(v) {
                        *a += b;
                    }
                    any = true;
                    cursor[pe] += 1;
                }
                if any && c.iter().any(|&v| v > 0) {
                    let mut q = [0u8; METRICS];
                    for m in 0..METRICS {
                        q[m] = quantise(c[m], len * metric_scale(m, UNIT));
                    }
                    vals.push((pe, q));
                }
            }
            frame.buf.clear();
            let mut active: BitVec<u8, Lsb0> = BitVec::repeat(false, self.pes);
            for (pe, _) in &vals {
                active.set(*pe, true);
            }
            frame.bytes(active.as_raw_slice());
            for m in 0..METRICS {
                let mut has: BitVec<u8, Lsb0> = BitVec::repeat(false, vals.len());
                for (i, (_, q)) in vals.iter().enumerate() {
                    has.set(i, q[m] > 0);
                }
                frame.bytes(has.as_raw_slice());
                for (_, q) in &vals {
                    if q[m] > 0 {
                        frame.u8(q[m]);
                    }
                }
            }
            out.var(frame.buf.len() as u64);
            out.bytes(&frame.buf);
        }
        out.buf
    }
}

/// `count / denom` as a fraction of 255, rounded to nearest, at least 1 when `count > 0`, at most 255.
pub(super) fn quantise(count: u64, denom: u64) -> u8 {
    if count == 0 {
        return 0;
    }
    let d = denom.max(1) as u128;
    let q = (2 * Q_MAX as u128 * count as u128 + d) / (2 * d);
    q.clamp(1, Q_MAX as u128) as u8
}

/// The trace of `run` as bytes, and what was chosen; `write` puts them in a file.
pub fn encode(
    header: &TraceHeader,
    program: &MeshProgram,
    run: &EngineRun,
    opts: &TraceOptions,
) -> Result<(Vec<u8>, WriteInfo), TraceError> {
    let rec = run.recording.as_ref().ok_or(TraceError::NoRecording)?;
    let pes = program.mesh.pes() as usize;
    let n_agents = pes + program.ports.len();
    if rec.bins.len() != n_agents {
        return Err(TraceError::Mismatch(format!(
            "{} agents recorded, the program has {} PEs and {} ports",
            rec.bins.len(),
            pes,
            program.ports.len()
        )));
    }
    if rec.window_cycles == 0 {
        return Err(TraceError::Mismatch("a recording window of 0 cycles".into()));
    }
    let (regions, templates, tiles, ports) = geometry(program);
    let pe_template = pe_templates(program.mesh.width, program.mesh.height, &tiles);
    let group_of_pe: Vec<usize> = pe_template
        .iter()
        .map(|&t| if t == NO_TEMPLATE { regions.len() } else { templates[t as usize].region as usize })
        .collect();
    if let Some(t) = templates.iter().find(|t| t.region as usize >= regions.len()) {
        return Err(TraceError::Mismatch(format!("template {} names region {}", t.name, t.region)));
    }
    let geom = encode_geometry(program, &regions, &templates, &tiles, &ports);
    let (spans, spans_dropped) = kept_spans(&rec.spans, opts.budget_bytes / SPAN_BUDGET_DIVISOR);
    let span_payload = encode_spans(&spans, spans_dropped);

    let requested = opts.window_cycles.filter(|&w| w > 0);
    let k0 = requested.map_or(1, |w| w.div_ceil(rec.window_cycles).max(1));
    let mut k = k0;
    loop {
        let layout = Layout::new(rec, pes, k, run.cycles);
        let adapted = k != k0;
        let info = WriteInfo {
            bytes: 0,
            window_cycles: layout.window,
            windows: layout.windows as u32,
            recorded_window_cycles: rec.window_cycles,
            requested_window_cycles: requested,
            adapted,
            budget_bytes: opts.budget_bytes,
            spans: spans.len() as u64,
            spans_dropped,
        };
        let head = encode_head(header, program, run.cycles, &info);
        let n_groups = regions.len() + 1;
        let region_series = layout.series(n_groups, |a| group_of_pe.get(a).copied());
        let port_series = layout.series(ports.len(), |a| a.checked_sub(pes));
        let mut sers = Enc::default();
        for s in region_series.iter().chain(port_series.iter()) {
            for c in s {
                for &v in c {
                    sers.var(v);
                }
            }
        }
        let frames_bytes = layout.frames_bytes();
        let total = MAGIC.len() as u64
            + 2
            + 6 * SECTION_OVERHEAD
            + head.len() as u64
            + geom.len() as u64
            + sers.buf.len() as u64
            + frames_bytes
            + span_payload.len() as u64
            + 8;
        if total > opts.budget_bytes {
            if layout.windows == 1 {
                return Err(TraceError::Budget { budget_bytes: opts.budget_bytes, needed_bytes: total });
            }
            k *= 2;
            continue;
        }
        let frames = layout.frames();
        debug_assert_eq!(frames.len() as u64, frames_bytes);
        let mut out = Enc { buf: Vec::with_capacity(total as usize) };
        out.bytes(&MAGIC);
        out.u16(FORMAT_VERSION);
        out.section(format::SECTIONS[0], &head);
        out.section(format::SECTIONS[1], &geom);
        out.section(format::SECTIONS[2], &sers.buf);
        out.section(format::SECTIONS[3], &frames);
        out.section(format::SECTIONS[4], &span_payload);
        let len = out.buf.len() as u64 + SECTION_OVERHEAD + 8;
        out.section(format::SECTIONS[5], &len.to_le_bytes());
        debug_assert_eq!(out.buf.len() as u64, total);
        return Ok((out.buf, WriteInfo { bytes: len, ..info }));
    }
}

fn encode_head(h: &TraceHeader, program: &MeshProgram, cycles: u64, info: &WriteInfo) -> Vec<u8> {
    let mut e = Enc::default();
    e.str(&h.model);
    e.str(&h.hardware);
    e.str(&h.fidelity);
    e.str(&h.mode);
    e.str(&h.version);
    let w = &h.workload;
    e.str(&w.phase);
    e.var(w.batch);
    e.var(w.seq);
    e.var(w.context);
    e.str(&w.dtype);
    e.f64(w.sparsity);
    e.u8(w.recompute as u8);
    e.var(w.tokens);
    e.f64(h.clock_hz);
    e.var(program.mesh.width as u64);
    e.var(program.mesh.height as u64);
    e.var(cycles);
    e.var(info.window_cycles);
    e.var(info.windows as u64);
    e.var(info.recorded_window_cycles);
    e.var(info.requested_window_cycles.unwrap_or(0));
    e.u8(info.adapted as u8);
    e.var(info.budget_bytes);
    e.var(program.timing.sram_bytes);
    e.var(UNIT);
    e.buf
}

fn encode_rect(e: &mut Enc, r: &Rect) {
    e.var(r.x as u64);
    e.var(r.y as u64);
    e.var(r.w as u64);
    e.var(r.h as u64);
}

fn encode_geometry(
    _program: &MeshProgram,
    regions: &[RegionInfo],
    templates: &[TemplateInfo],
    tiles: &[TileInfo],
    ports: &[PortInfo],
) -> Vec<u8> {
    let mut e = Enc::default();
    e.var(regions.len() as u64);
    for r in regions {
        e.str(&r.name);
        e.str(&r.kind);
        e.str(&r.algorithm);
        encode_rect(&mut e, &r.rect);
        e.var(r.flops);
    }
    e.var(templates.len() as u64);
    for t in templates {
        e.str(&t.name);
        e.var(t.region as u64);
        e.var(t.sram_bytes);
        e.var(t.tasks.len() as u64);
        for k in &t.tasks {
            e.str(k);
        }
    }
    e.var(tiles.len() as u64);
    for t in tiles {
        encode_rect(&mut e, &t.rect);
        e.var(t.template as u64);
    }
    e.var(ports.len() as u64);
    for p in ports {
        e.str(&p.name);
        e.u8(side_code(p.side));
        e.var(p.at.x as u64);
        e.var(p.at.y as u64);
        e.var(p.wavelets);
        e.var(p.per_cycles);
        e.str(&p.peer);
        e.var(p.template as u64);
        e.var(p.capacity_units);
    }
    e.buf
}

/// The earliest spans (by start, then agent, then task) whose encoding fits `budget` bytes, back in
/// (agent, start, task) order, and how many were dropped.
fn kept_spans(spans: &[Span], budget: u64) -> (Vec<Span>, u64) {
    let size = |s: &Span| {
        var_len(s.agent as u64)
            + var_len(s.task as u64)
            + var_len(s.start)
            + var_len(s.finish - s.start)
            + var_len(s.compute)
    };
    let total: u64 = spans.iter().map(size).sum();
    if total + 20 <= budget {
        return (spans.to_vec(), 0);
    }
    let mut by_time: Vec<Span> = spans.to_vec();
    by_time.sort_by_key(|s| (s.start, s.agent, s.task));
    let mut used = 20;
    let mut n = 0;
    for s in &by_time {
        used += size(s);
        if used > budget {
            break;
        }
        n += 1;
    }
    by_time.truncate(n);
    by_time.sort_by_key(|s| (s.agent, s.start, s.task));
    let dropped = (spans.len() - n) as u64;
    (by_time, dropped)
}

fn encode_spans(spans: &[Span], dropped: u64) -> Vec<u8> {
    let mut e = Enc::default();
    e.var(spans.len() as u64);
    e.var(dropped);
    let mut prev: Option<(u32, u64)> = None;
    for s in spans {
        e.var(s.agent as u64);
        e.var(s.task as u64);
        // Starts of one agent's spans are delta-coded.
        match prev {
            Some((a, t)) if a == s.agent => e.var(s.start - t),
            _ => e.var(s.start),
        }
        e.var(s.finish - s.start);
        e.var(s.compute);
        prev = Some((s.agent, s.start));
    }
    e.buf
}

#[cfg(test)]
mod tests {
    use super::quantise;

    #[test]
    fn quantise_rounds_and_keeps_activity_visible() {
        assert_eq!(quantise(0, 100), 0);
        assert_eq!(quantise(1, 1_000_000), 1);
        assert_eq!(quantise(50, 100), 128);
        assert_eq!(quantise(100, 100), 255);
        assert_eq!(quantise(200, 100), 255);
    }
}
