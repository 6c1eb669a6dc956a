//! From trace bytes back to a `Trace`, checking everything: the magic, the version, each section's tag,
//! length and CRC-32, and every value against what the format allows. A damaged file yields the first
//! structural error (its exact offset and what was expected); damage that still parses is caught by the
//! section's checksum, reported with the section's byte range.

use bitvec::prelude::*;

use super::format::{crc32, tag_name, Dec, FORMAT_VERSION, MAGIC, SECTIONS};
use super::*;
use crate::engine::record::METRICS;
use crate::report::WorkloadSummary;

/// The largest mesh a trace may describe (a reader allocates per PE): 2^26 PEs, far beyond any wafer.
const MAX_PES: u64 = 1 << 26;

type R<T> = Result<T, TraceError>;

/// Reads and checks the trace file at `path`.
pub fn read(path: impl AsRef<std::path::Path>) -> R<Trace> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| TraceError::Read { path: name.clone(), source })?;
    read_bytes(&data, &name)
}

/// Reads and checks trace bytes; `name` is what errors call them.
pub fn read_bytes(data: &[u8], name: &str) -> R<Trace> {
    let mut d = Dec::new(data, 0, name);
    if data.len() < MAGIC.len() || data[..MAGIC.len()] != MAGIC {
        let n = data.len().min(MAGIC.len());
        if data[..n] == MAGIC[..n] {
            return Err(d.truncated("the 8 magic bytes \"WAFERTRC\""));
        }
        return Err(TraceError::NotATrace {
            path: name.to_string(),
            expected: String::from_utf8_lossy(&MAGIC).into_owned(),
            found: data[..n].escape_ascii().to_string(),
        });
    }
    d.take(MAGIC.len(), "the magic")?;
    let version = d.u16("the format version")?;
    if version != FORMAT_VERSION {
        return Err(TraceError::Version { path: name.to_string(), found: version, supported: FORMAT_VERSION });
    }
    let mut t = Sections { d, name };

    let (mut s, bad) = t.next(SECTIONS[0])?;
    let head = check(
        head(&mut s).and_then(|h| {
            s.finish("section HEAD")?;
            Ok(h)
        }),
        bad,
    )?;
    let pes = head.width as usize * head.height as usize;

    let (mut s, bad) = t.next(SECTIONS[1])?;
    let geom = check(geometry(&mut s, &head).and_then(|g| s.finish("section GEOM").map(|_| g)), bad)?;
    let (regions, templates, tiles, ports) = geom;
    let pe_template = pe_templates(head.width, head.height, &tiles);

    let (mut s, bad) = t.next(SECTIONS[2])?;
    let series = check(
        series(&mut s, regions.len() + 1 + ports.len(), head.windows as usize).and_then(|v| {
            s.finish("section SERS")?;
            Ok(v)
        }),
        bad,
    )?;
    let mut region_series = series;
    let port_series = region_series.split_off(regions.len() + 1);

    let (mut s, bad) = t.next(SECTIONS[3])?;
    let frames = check(
        frames(&mut s, pes, head.windows as usize).and_then(|v| {
            s.finish("section FRMS")?;
            Ok(v)
        }),
        bad,
    )?;

    let (mut s, bad) = t.next(SECTIONS[4])?;
    let agent_tasks: Vec<usize> = (0..pes + ports.len())
        .map(|a| {
            let tpl = if a < pes { pe_template[a] } else { ports[a - pes].template };
            templates.get(tpl as usize).map_or(0, |t| t.tasks.len())
        })
        .collect();
    let (spans, spans_dropped) = check(
        spans(&mut s, &agent_tasks).and_then(|v| {
            s.finish("section SPAN")?;
            Ok(v)
        }),
        bad,
    )?;

    let (mut s, bad) = t.next(SECTIONS[5])?;
    let at = s.offset();
    let total = check(s.u64("the file length").and_then(|v| s.finish("section DONE").map(|_| v)), bad)?;
    if total != data.len() as u64 {
        return Err(t.d.corrupt_at(at, format!("the file length {}", data.len()), format!("{total}")));
    }
    t.d.finish("the file")?;

    Ok(Trace {
        header: head.header,
        format_version: version,
        width: head.width,
        height: head.height,
        cycles: head.cycles,
        window_cycles: head.window_cycles,
        windows: head.windows,
        recorded_window_cycles: head.recorded_window_cycles,
        requested_window_cycles: head.requested_window_cycles,
        adapted: head.adapted,
        budget_bytes: head.budget_bytes,
        sram_capacity_bytes: head.sram_capacity_bytes,
        unit: head.unit,
        regions,
        templates,
        tiles,
        ports,
        region_series,
        port_series,
        frames,
        spans,
        spans_dropped,
        pe_template,
    })
}

/// A checksum mismatch found while reading a section: reported only if the payload parses.
struct BadCrc(TraceError);

fn check<T>(parsed: R<T>, bad: Option<BadCrc>) -> R<T> {
    match (parsed, bad) {
        (Err(e), _) => Err(e),
        (Ok(_), Some(BadCrc(e))) => Err(e),
        (Ok(v), None) => Ok(v),
    }
}

struct Sections<'a> {
    d: Dec<'a>,
    name: &'a str,
}

impl<'a> Sections<'a> {
    /// The next section, which must be `tag`: a decoder over its payload, and a checksum error if any.
    fn next(&mut self, tag: [u8; 4]) -> R<(Dec<'a>, Option<BadCrc>)> {
        let what = tag_name(&tag);
        let at = self.d.offset();
        let found = self.d.take(4, &format!("the tag of section {what}"))?;
        if found != tag {
            return Err(self.d.corrupt_at(at, format!("section tag `{what}`"), format!("`{}`", tag_name(found))));
        }
        let len_at = self.d.offset();
        let len = self.d.u64(&format!("the payload length of section {what}"))?;
        let start = self.d.offset();
        let avail = self.d.remaining() as u64;
        if len > avail.saturating_sub(4) {
            return Err(self.d.truncated(format!(
                "{len} payload bytes of section {what} from offset {start} (as its length at offset {len_at} \
                 says) and a 4-byte CRC-32, but only {avail} bytes follow"
            )));
        }
        let payload = self.d.take(len as usize, &what)?;
        let crc_at = self.d.offset();
        let stored = self.d.u32(&format!("the CRC-32 of section {what}"))?;
        let computed = crc32(payload);
        let bad = (stored != computed).then(|| {
            BadCrc(self.d.corrupt_at(
                start,
                format!(
                    "section {what} (bytes {start}..{}) to match its CRC-32 0x{stored:08x} stored at offset {crc_at}",
                    start + len
                ),
                format!("contents with CRC-32 0x{computed:08x}"),
            ))
        });
        Ok((Dec::new(payload, start, self.name), bad))
    }
}

struct Head {
    header: TraceHeader,
    width: u32,
    height: u32,
    cycles: u64,
    window_cycles: u64,
    windows: u32,
    recorded_window_cycles: u64,
    requested_window_cycles: Option<u64>,
    adapted: bool,
    budget_bytes: u64,
    sram_capacity_bytes: u64,
    unit: u64,
}

fn head(d: &mut Dec) -> R<Head> {
    let model = d.str("the model name")?;
    let hardware = d.str("the hardware name")?;
    let fidelity = d.str("the fidelity")?;
    let mode = d.str("the mode")?;
    let version = d.str("the emulator version")?;
    let workload = WorkloadSummary {
        phase: d.str("the workload phase")?,
        batch: d.var("the batch")?,
        seq: d.var("the sequence length")?,
        context: d.var("the context length")?,
        dtype: d.str("the dtype")?,
        sparsity: d.f64("the sparsity")?,
        recompute: d.bool("the recompute flag")?,
        tokens: d.var("the tokens")?,
    };
    let at = d.offset();
    let clock_hz = d.f64("the clock")?;
    if clock_hz <= 0.0 {
        return Err(d.corrupt_at(at, "a positive clock in Hz", format!("{clock_hz}")));
    }
    let at = d.offset();
    let width = d.var_u32("the mesh width", 1)?;
    let height = d.var_u32("the mesh height", 1)?;
    if width as u64 * height as u64 > MAX_PES {
        return Err(d.corrupt_at(at, format!("a mesh of at most {MAX_PES} PEs"), format!("{width} x {height}")));
    }
    let cycles = d.var("the run's cycles")?;
    let window_cycles = d.var_max("the window", u64::MAX)?;
    let at_windows = d.offset();
    let windows = d.var_u32("the number of windows", 1)?;
    if window_cycles == 0 {
        return Err(d.corrupt_at(at_windows - 1, "a window of at least 1 cycle", "0"));
    }
    if window_cycles.checked_mul(windows as u64).is_none_or(|c| c < cycles) {
        return Err(d.corrupt_at(
            at_windows,
            format!("enough windows of {window_cycles} cycles to cover the run's {cycles} cycles"),
            format!("{windows}"),
        ));
    }
    let recorded_window_cycles = d.var("the recording window")?;
    let requested = d.var("the requested window")?;
    let adapted = d.bool("the adapted flag")?;
    let budget_bytes = d.var("the budget")?;
    let sram_capacity_bytes = d.var("the SRAM bytes per PE")?;
    let at = d.offset();
    let unit = d.var("the capacity unit")?;
    if unit == 0 {
        return Err(d.corrupt_at(at, "a capacity unit of at least 1", "0"));
    }
    Ok(Head {
        header: TraceHeader { model, workload, hardware, fidelity, mode, version, clock_hz },
        width,
        height,
        cycles,
        window_cycles,
        windows,
        recorded_window_cycles,
        requested_window_cycles: (requested > 0).then_some(requested),
        adapted,
        budget_bytes,
        sram_capacity_bytes,
        unit,
    })
}

fn rect(d: &mut Dec, what: &str, head: &Head) -> R<Rect> {
    let at = d.offset();
    let r = Rect {
        x: d.var_u32(&format!("the x of {what}"), 0)?,
        y: d.var_u32(&format!("the y of {what}"), 0)?,
        w: d.var_u32(&format!("the width of {what}"), 0)?,
        h: d.var_u32(&format!("the height of {what}"), 0)?,
    };
    if r.x as u64 + r.w as u64 > head.width as u64 || r.y as u64 + r.h as u64 > head.height as u64 {
        return Err(d.corrupt_at(
            at,
            format!("{what} inside the {} x {} mesh", head.width, head.height),
            format!("{} x {} at ({},{})", r.w, r.h, r.x, r.y),
        ));
    }
    Ok(r)
}

type Geometry = (Vec<RegionInfo>, Vec<TemplateInfo>, Vec<TileInfo>, Vec<PortInfo>);

fn geometry(d: &mut Dec, head: &Head) -> R<Geometry> {
    let n = d.count("the number of regions", 8)?;
    let mut regions = Vec::with_capacity(n);
    for i in 0..n {
        let name = d.str(&format!("the name of region {i}"))?;
        regions.push(RegionInfo {
            kind: d.str(&format!("the kind of region {name}"))?,
            algorithm: d.str(&format!("the algorithm of region {name}"))?,
            rect: rect(d, &format!("the rectangle of region {name}"), head)?,
            flops: d.var(&format!("the FLOPs of region {name}"))?,
            name,
        });
    }
    let n = d.count("the number of templates", 4)?;
    let mut templates = Vec::with_capacity(n);
    for i in 0..n {
        let name = d.str(&format!("the name of template {i}"))?;
        let at = d.offset();
        let region = d.var_u32(&format!("the region of template {name}"), 0)?;
        if region as usize >= regions.len() {
            return Err(d.corrupt_at(
                at,
                format!("a region index below {} for template {name}", regions.len()),
                format!("{region}"),
            ));
        }
        let sram_bytes = d.var(&format!("the SRAM bytes of template {name}"))?;
        let k = d.count(&format!("the number of tasks of template {name}"), 1)?;
        let mut tasks = Vec::with_capacity(k);
        for j in 0..k {
            tasks.push(d.str(&format!("the name of task {j} of template {name}"))?);
        }
        templates.push(TemplateInfo { name, region, sram_bytes, tasks });
    }
    let n = d.count("the number of tiles", 5)?;
    let mut tiles = Vec::with_capacity(n);
    for i in 0..n {
        let r = rect(d, &format!("the rectangle of tile {i}"), head)?;
        let at = d.offset();
        let template = d.var_u32(&format!("the template of tile {i}"), 0)?;
        if template as usize >= templates.len() {
            return Err(d.corrupt_at(
                at,
                format!("a template index below {} for tile {i}", templates.len()),
                format!("{template}"),
            ));
        }
        tiles.push(TileInfo { rect: r, template });
    }
    let n = d.count("the number of ports", 9)?;
    let mut ports = Vec::with_capacity(n);
    for i in 0..n {
        let name = d.str(&format!("the name of port {i}"))?;
        let at = d.offset();
        let side = match d.u8(&format!("the side of port {name}"))? {
            0 => Dir::North,
            1 => Dir::East,
            2 => Dir::South,
            3 => Dir::West,
            s => return Err(d.corrupt_at(at, format!("the side of port {name} (0 to 3)"), format!("{s}"))),
        };
        let at = d.offset();
        let x = d.var_u32(&format!("the x of port {name}"), 0)?;
        let y = d.var_u32(&format!("the y of port {name}"), 0)?;
        if x >= head.width || y >= head.height {
            return Err(d.corrupt_at(at, format!("port {name} at a PE of the mesh"), format!("({x},{y})")));
        }
        let wavelets = d.var(&format!("the rate of port {name}"))?;
        let per_cycles = d.var(&format!("the rate period of port {name}"))?;
        let peer = d.str(&format!("the peer of port {name}"))?;
        let at = d.offset();
        let template = d.var_u32(&format!("the template of port {name}"), 0)?;
        if template as usize >= templates.len() {
            return Err(d.corrupt_at(
                at,
                format!("a template index below {} for port {name}", templates.len()),
                format!("{template}"),
            ));
        }
        let capacity_units = d.var_max(&format!("the capacity of port {name}"), u64::MAX)?;
        if capacity_units == 0 {
            return Err(d.corrupt_at(d.offset() - 1, format!("a positive capacity for port {name}"), "0"));
        }
        ports.push(PortInfo { name, side, at: Coord { x, y }, wavelets, per_cycles, peer, template, capacity_units });
    }
    Ok((regions, templates, tiles, ports))
}

fn series(d: &mut Dec, groups: usize, windows: usize) -> R<Vec<Vec<Counts>>> {
    let need = groups as u64 * windows as u64 * METRICS as u64;
    if need > d.remaining() as u64 {
        return Err(d.truncated(format!(
            "{need} varints of series ({groups} regions and ports x {windows} windows x {METRICS} metrics)"
        )));
    }
    let mut out = Vec::with_capacity(groups);
    for g in 0..groups {
        let mut s = Vec::with_capacity(windows);
        for w in 0..windows {
            let mut c = [0u64; METRICS];
            for v in c.iter_mut() {
                *v = d.var(&format!("a count of series {g}, window {w}"))?;
            }
            s.push(c);
        }
        out.push(s);
    }
    Ok(out)
}

/// A bitmap of `bits` bits, its padding bits zero.
fn bitmap(d: &mut Dec, bits: usize, what: &str) -> R<BitVec<u8, Lsb0>> {
    let at = d.offset();
    let raw = d.take(bits.div_ceil(8), what)?;
    let mut v: BitVec<u8, Lsb0> = BitVec::from_slice(raw);
    if v[bits..].any() {
        return Err(d.corrupt_at(
            at + (bits / 8) as u64,
            format!("the padding bits of {what} (after bit {bits}) to be zero"),
            "a set bit",
        ));
    }
    v.truncate(bits);
    Ok(v)
}

fn frames(d: &mut Dec, pes: usize, windows: usize) -> R<Vec<Frame>> {
    let bitmap_bytes = pes.div_ceil(8);
    if (windows as u64) * (bitmap_bytes as u64 + 1) > d.remaining() as u64 {
        return Err(
            d.truncated(format!("{windows} frames of at least {} bytes each (one bit per PE)", bitmap_bytes + 1))
        );
    }
    let mut out = Vec::with_capacity(windows);
    for w in 0..windows {
        let len = d.count(&format!("the length of frame {w}"), 1)?;
        let start = d.offset();
        let body = d.take(len, &format!("frame {w}"))?;
        let mut f = Dec::new(body, start, d.path);
        let active = bitmap(&mut f, pes, &format!("the activity map of frame {w}"))?;
        let n = active.count_ones();
        let mut values = vec![[0u8; METRICS]; n];
        let mut any = vec![false; n];
        for (m, metric) in crate::engine::record::Metric::ALL.iter().enumerate() {
            let name = metric.name();
            let has = bitmap(&mut f, n, &format!("the {name} map of frame {w}"))?;
            for i in has.iter_ones() {
                let at = f.offset();
                let v = f.u8(&format!("a {name} value of frame {w}"))?;
                if v == 0 {
                    return Err(f.corrupt_at(at, format!("a nonzero {name} value of frame {w} (its bit is set)"), "0"));
                }
                values[i][m] = v;
                any[i] = true;
            }
        }
        if let Some(i) = any.iter().position(|a| !a) {
            let pe = active.iter_ones().nth(i).unwrap_or(0);
            return Err(f.corrupt_at(start, format!("some metric for active PE {pe} of frame {w}"), "none"));
        }
        f.finish(&format!("frame {w}"))?;
        out.push(Frame { active, values });
    }
    Ok(out)
}

fn spans(d: &mut Dec, agent_tasks: &[usize]) -> R<(Vec<Span>, u64)> {
    let n = d.count("the number of spans", 5)?;
    let dropped = d.var("the number of dropped spans")?;
    let mut out: Vec<Span> = Vec::with_capacity(n);
    for i in 0..n {
        let at = d.offset();
        let agent = d.var_u32(&format!("the agent of span {i}"), 0)?;
        let Some(&tasks) = agent_tasks.get(agent as usize) else {
            return Err(d.corrupt_at(
                at,
                format!("span {i}'s agent below {} (PEs and ports)", agent_tasks.len()),
                format!("{agent}"),
            ));
        };
        let prev = out.last().copied();
        if prev.is_some_and(|p| p.agent > agent) {
            return Err(d.corrupt_at(
                at,
                format!("span {i} in agent order"),
                format!("agent {agent} after a later one"),
            ));
        }
        let at = d.offset();
        let task = d.var_u32(&format!("the task of span {i}"), 0)?;
        if task as usize >= tasks {
            return Err(d.corrupt_at(
                at,
                format!("span {i}'s task below {tasks} (the tasks of agent {agent}'s template)"),
                format!("{task}"),
            ));
        }
        let at = d.offset();
        let s = d.var(&format!("the start of span {i}"))?;
        let start = match prev {
            Some(p) if p.agent == agent => p.start.checked_add(s),
            _ => Some(s),
        };
        let Some(start) = start else {
            return Err(d.corrupt_at(at, format!("the start of span {i} within 64 bits"), format!("{s} more")));
        };
        let at = d.offset();
        let dur = d.var(&format!("the duration of span {i}"))?;
        let Some(finish) = start.checked_add(dur) else {
            return Err(d.corrupt_at(at, format!("the finish of span {i} within 64 bits"), format!("{dur}")));
        };
        let at = d.offset();
        let compute = d.var(&format!("the compute cycles of span {i}"))?;
        if compute > dur {
            return Err(d.corrupt_at(
                at,
                format!("span {i}'s compute cycles at most its {dur} cycles"),
                format!("{compute}"),
            ));
        }
        out.push(Span { agent, task, start, finish, compute });
    }
    Ok((out, dropped))
}
