//! `wafer trace export --perfetto`: the trace as a native Perfetto protobuf trace (opens in
//! ui.perfetto.dev): one process for the wafer; counter tracks per region (compute, stalled and fabric,
//! in percent) and per IO port (percent of its rate); one thread per sampled PE or port with its task
//! runs as slices; and an instant event at time 0 carrying the trace's metadata as debug annotations.
//!
//! The few messages needed (`Trace`, `TracePacket`, `TrackDescriptor`, `CounterDescriptor`,
//! `ProcessDescriptor`, `ThreadDescriptor`, `TrackEvent`, `DebugAnnotation`) are written here with their
//! field numbers from Perfetto's `protos/perfetto/trace/` definitions, rather than through generated code:
//! the official bindings (`perfetto_protos`) generate some 350,000 lines, minutes of compile time for
//! every build of the crate. The test `perfetto_export_decodes_with_the_official_definitions` decodes the
//! output with those official bindings, so a wrong field number fails there.
//!
//! Times are nanoseconds (cycles / clock), the default clock of the trace processor.

use super::{fractions, Trace, View};
use crate::engine::record::Metric;

/// Field numbers, from Perfetto's protos (v51).
mod field {
    pub const TRACE_PACKET: u32 = 1; // Trace.packet
    pub const TIMESTAMP: u32 = 8; // TracePacket.timestamp
    pub const SEQUENCE_ID: u32 = 10; // TracePacket.trusted_packet_sequence_id
    pub const TRACK_EVENT: u32 = 11; // TracePacket.track_event
    pub const SEQUENCE_FLAGS: u32 = 13; // TracePacket.sequence_flags
    pub const TRACK_DESCRIPTOR: u32 = 60; // TracePacket.track_descriptor
    pub const TD_UUID: u32 = 1;
    pub const TD_NAME: u32 = 2;
    pub const TD_PROCESS: u32 = 3;
    pub const TD_THREAD: u32 = 4;
    pub const TD_PARENT_UUID: u32 = 5;
    pub const TD_COUNTER: u32 = 8;
    pub const CD_UNIT_NAME: u32 = 6; // CounterDescriptor.unit_name
    pub const PD_PID: u32 = 1;
    pub const PD_NAME: u32 = 6; // ProcessDescriptor.process_name
    pub const THD_PID: u32 = 1;
    pub const THD_TID: u32 = 2;
    pub const THD_NAME: u32 = 5; // ThreadDescriptor.thread_name
    pub const TE_DEBUG_ANNOTATIONS: u32 = 4;
    pub const TE_TYPE: u32 = 9;
    pub const TE_TRACK_UUID: u32 = 11;
    pub const TE_CATEGORIES: u32 = 22;
    pub const TE_NAME: u32 = 23;
    pub const TE_DOUBLE_COUNTER_VALUE: u32 = 44;
    pub const DA_UINT_VALUE: u32 = 3;
    pub const DA_DOUBLE_VALUE: u32 = 5;
    pub const DA_STRING_VALUE: u32 = 6;
    pub const DA_BOOL_VALUE: u32 = 2;
    pub const DA_NAME: u32 = 10;
}

/// TrackEvent.Type values.
const TYPE_SLICE_BEGIN: u64 = 1;
const TYPE_SLICE_END: u64 = 2;
const TYPE_INSTANT: u64 = 3;
const TYPE_COUNTER: u64 = 4;
/// TracePacket.SequenceFlags.SEQ_INCREMENTAL_STATE_CLEARED.
const SEQ_INCREMENTAL_STATE_CLEARED: u64 = 1;
const SEQUENCE: u64 = 1;
const PID: u64 = 1;

/// Track uuids: the process, three counters per region, one per port, one per sampled agent.
pub const PROCESS_UUID: u64 = 1;
pub fn region_track_uuid(region: usize, k: usize) -> u64 {
    1_000 + 4 * region as u64 + k as u64
}
pub fn port_track_uuid(port: usize) -> u64 {
    1 << 32 | port as u64
}
pub fn agent_track_uuid(agent: u32) -> u64 {
    2 << 32 | agent as u64
}
/// The counters of each region, in track order.
pub const REGION_VIEWS: [View; 3] = [View::Compute, View::Stall, View::Fabric];

/// A protobuf message under construction.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }
    fn key(&mut self, field: u32, wire: u64) {
        self.varint((field as u64) << 3 | wire);
    }
    fn uint(&mut self, field: u32, v: u64) -> &mut Msg {
        self.key(field, 0);
        self.varint(v);
        self
    }
    fn double(&mut self, field: u32, v: f64) -> &mut Msg {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, field: u32, b: &[u8]) -> &mut Msg {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, field: u32, s: &str) -> &mut Msg {
        self.bytes(field, s.as_bytes())
    }
    fn msg(&mut self, field: u32, m: &Msg) -> &mut Msg {
        self.bytes(field, &m.0)
    }
}

fn packet(ts: Option<u64>) -> Msg {
    let mut p = Msg::default();
    if let Some(ts) = ts {
        p.uint(field::TIMESTAMP, ts);
    }
    p.uint(field::SEQUENCE_ID, SEQUENCE);
    p
}

enum Value<'a> {
    Str(&'a str),
    Uint(u64),
    Double(f64),
    Bool(bool),
}

fn annotation(name: &str, v: Value) -> Msg {
    let mut a = Msg::default();
    a.str(field::DA_NAME, name);
    match v {
        Value::Str(s) => a.str(field::DA_STRING_VALUE, s),
        Value::Uint(u) => a.uint(field::DA_UINT_VALUE, u),
        Value::Double(d) => a.double(field::DA_DOUBLE_VALUE, d),
        Value::Bool(b) => a.uint(field::DA_BOOL_VALUE, b as u64),
    };
    a
}

/// The exported trace's counters for region `r` and window `w`, in percent, in `REGION_VIEWS` order.
pub fn region_percent(t: &Trace, r: usize, w: usize) -> [f64; 3] {
    let n = t.region_pes()[r];
    let (_, len) = t.window_span(w);
    let f = fractions(&t.region_series[r][w], n, len, t.unit);
    REGION_VIEWS.map(|v| 100.0 * v.of_fractions(&f, 0.0))
}

/// Port `p`'s use of its rate in window `w`, in percent (both directions).
pub fn port_percent(t: &Trace, p: usize, w: usize) -> f64 {
    let (_, len) = t.window_span(w);
    let c = &t.port_series[p][w];
    let used = c[Metric::Send as usize] + c[Metric::Receive as usize];
    100.0 * (used as f64 / (t.ports[p].capacity_units as f64 * len as f64)).min(1.0)
}

/// Nanoseconds of cycle `c`.
pub fn ns(t: &Trace, c: u64) -> u64 {
    let hz = (t.header.clock_hz.round() as u128).max(1);
    (c as u128 * 1_000_000_000 / hz) as u64
}

/// The trace as Perfetto protobuf bytes.
pub fn export(t: &Trace) -> Vec<u8> {
    let h = &t.header;
    let mut packets: Vec<Msg> = Vec::new();

    // Descriptors: the process, then counter and thread tracks.
    let mut p = packet(None);
    p.uint(field::SEQUENCE_FLAGS, SEQ_INCREMENTAL_STATE_CLEARED);
    let mut proc_ = Msg::default();
    proc_.uint(field::PD_PID, PID).str(field::PD_NAME, &format!("wafer {}: {} ({})", h.hardware, h.model, h.fidelity));
    let mut td = Msg::default();
    td.uint(field::TD_UUID, PROCESS_UUID).msg(field::TD_PROCESS, &proc_);
    p.msg(field::TRACK_DESCRIPTOR, &td);
    packets.push(p);
    let counter = |uuid: u64, name: &str, unit: &str| {
        let mut cd = Msg::default();
        cd.str(field::CD_UNIT_NAME, unit);
        let mut td = Msg::default();
        td.uint(field::TD_UUID, uuid).uint(field::TD_PARENT_UUID, PROCESS_UUID).str(field::TD_NAME, name);
        td.msg(field::TD_COUNTER, &cd);
        let mut p = packet(None);
        p.msg(field::TRACK_DESCRIPTOR, &td);
        p
    };
    for (r, region) in t.regions.iter().enumerate() {
        for (k, v) in REGION_VIEWS.iter().enumerate() {
            packets.push(counter(region_track_uuid(r, k), &format!("{} {} %", region.name, v.name()), "%"));
        }
    }
    for (i, port) in t.ports.iter().enumerate() {
        packets.push(counter(port_track_uuid(i), &format!("port {} %", port.name), "%"));
    }
    let mut agents: Vec<u32> = t.spans.iter().map(|s| s.agent).collect();
    agents.dedup();
    for &a in &agents {
        let region = if (a as usize) < t.pes() {
            t.pe_region(a as usize).map_or(String::new(), |r| format!(" {}", t.regions[r].name))
        } else {
            String::new()
        };
        let mut th = Msg::default();
        th.uint(field::THD_PID, PID)
            .uint(field::THD_TID, a as u64 + 2)
            .str(field::THD_NAME, &format!("{}{region}", t.agent_name(a)));
        let mut td = Msg::default();
        td.uint(field::TD_UUID, agent_track_uuid(a)).msg(field::TD_THREAD, &th);
        let mut p = packet(None);
        p.msg(field::TRACK_DESCRIPTOR, &td);
        packets.push(p);
    }

    // Events, in time order: (ns, order at equal times: ends, counters, begins, then by sequence).
    let mut events: Vec<(u64, u8, u64, Msg)> = Vec::new();
    let mut seq = 0u64;
    let mut push = |events: &mut Vec<(u64, u8, u64, Msg)>, ts: u64, order: u8, ev: Msg| {
        events.push((ts, order, seq, ev));
        seq += 1;
    };
    let mut meta = Msg::default();
    meta.uint(field::TE_TYPE, TYPE_INSTANT)
        .uint(field::TE_TRACK_UUID, PROCESS_UUID)
        .str(field::TE_NAME, "waferscale trace");
    meta.str(field::TE_CATEGORIES, "metadata");
    let w = &h.workload;
    let workload = format!("{} batch {} seq {} context {} {}", w.phase, w.batch, w.seq, w.context, w.dtype);
    let mesh = format!("{} x {}", t.width, t.height);
    for a in [
        annotation("model", Value::Str(&h.model)),
        annotation("workload", Value::Str(&workload)),
        annotation("hardware", Value::Str(&h.hardware)),
        annotation("fidelity", Value::Str(&h.fidelity)),
        annotation("mode", Value::Str(&h.mode)),
        annotation("version", Value::Str(&h.version)),
        annotation("mesh", Value::Str(&mesh)),
        annotation("clock_hz", Value::Double(h.clock_hz)),
        annotation("cycles", Value::Uint(t.cycles)),
        annotation("window_cycles", Value::Uint(t.window_cycles)),
        annotation("windows", Value::Uint(t.windows as u64)),
        annotation("window_adapted_to_budget", Value::Bool(t.adapted)),
    ] {
        meta.msg(field::TE_DEBUG_ANNOTATIONS, &a);
    }
    push(&mut events, 0, 1, meta);
    let counter_event = |uuid: u64, v: f64| {
        let mut e = Msg::default();
        e.uint(field::TE_TYPE, TYPE_COUNTER).uint(field::TE_TRACK_UUID, uuid).double(field::TE_DOUBLE_COUNTER_VALUE, v);
        e
    };
    let end = ns(t, t.cycles.max(t.window_span(t.windows as usize - 1).0 + 1));
    for wi in 0..t.windows as usize {
        let ts = ns(t, t.window_span(wi).0);
        for r in 0..t.regions.len() {
            for (k, v) in region_percent(t, r, wi).into_iter().enumerate() {
                push(&mut events, ts, 1, counter_event(region_track_uuid(r, k), v));
            }
        }
        for p in 0..t.ports.len() {
            push(&mut events, ts, 1, counter_event(port_track_uuid(p), port_percent(t, p, wi)));
        }
    }
    // Counters drop to 0 at the end of the run, so the last window shows its width.
    for r in 0..t.regions.len() {
        for k in 0..REGION_VIEWS.len() {
            push(&mut events, end, 1, counter_event(region_track_uuid(r, k), 0.0));
        }
    }
    for p in 0..t.ports.len() {
        push(&mut events, end, 1, counter_event(port_track_uuid(p), 0.0));
    }
    for s in &t.spans {
        let task = t
            .agent_template(s.agent)
            .and_then(|tp| tp.tasks.get(s.task as usize))
            .cloned()
            .unwrap_or_else(|| format!("task {}", s.task));
        let uuid = agent_track_uuid(s.agent);
        let mut b = Msg::default();
        b.uint(field::TE_TYPE, TYPE_SLICE_BEGIN).uint(field::TE_TRACK_UUID, uuid).str(field::TE_NAME, &task);
        b.msg(field::TE_DEBUG_ANNOTATIONS, &annotation("start_cycle", Value::Uint(s.start)));
        b.msg(field::TE_DEBUG_ANNOTATIONS, &annotation("finish_cycle", Value::Uint(s.finish)));
        b.msg(field::TE_DEBUG_ANNOTATIONS, &annotation("compute_cycles", Value::Uint(s.compute)));
        let (t0, t1) = (ns(t, s.start), ns(t, s.finish));
        push(&mut events, t0, 2, b);
        let mut e = Msg::default();
        e.uint(field::TE_TYPE, TYPE_SLICE_END).uint(field::TE_TRACK_UUID, uuid);
        // An end at its own begin's time must follow it; otherwise ends come first at equal times.
        push(&mut events, t1, if t1 == t0 { 3 } else { 0 }, e);
    }
    events.sort_by_key(|(ts, order, seq, _)| (*ts, *order, *seq));
    for (ts, _, _, ev) in events {
        let mut p = packet(Some(ts));
        p.msg(field::TRACK_EVENT, &ev);
        packets.push(p);
    }
    let mut out = Msg::default();
    for p in &packets {
        out.msg(field::TRACE_PACKET, p);
    }
    out.0
}
