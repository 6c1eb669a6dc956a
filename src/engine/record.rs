//! Recording what each PE, router and port did over time, for traces.
//!
//! Every agent keeps sparse bins of exact cycle counts per time window and metric. The window starts
//! at one cycle and doubles (merging pairs of bins, which is exact) whenever the run outgrows
//! `max_windows` windows, so the recording never needs the run's length in advance and does not
//! depend on when a partition noticed the growth: every contribution ends up in the bin of the final
//! window size it falls in. A sample of agents also keeps every task run as a span.

use smallvec::SmallVec;

/// What a bin counts. Compute and the stalls count cycles; Send, Receive and Fabric count cycles times
/// the capacity units held (`engine::UNIT` per cycle at full rate), so paced trains count exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    /// The PE's SIMD datapath computing.
    Compute = 0,
    /// Wavelets leaving the PE (its up ramp), or entering the mesh from a port.
    Send = 1,
    /// Wavelets arriving at the PE (its down ramp), or leaving the mesh through a port.
    Receive = 2,
    /// The router's four outgoing links, summed (divide by 4 for a fraction).
    Fabric = 3,
    /// A running task waiting for its input wavelets.
    StallData = 4,
    /// A running task waiting for its streamed output to drain.
    StallBackpressure = 5,
    /// A running task waiting for wavelets that an IO port paces.
    StallIo = 6,
}

pub const METRICS: usize = 7;

impl Metric {
    pub const ALL: [Metric; METRICS] = [
        Metric::Compute,
        Metric::Send,
        Metric::Receive,
        Metric::Fabric,
        Metric::StallData,
        Metric::StallBackpressure,
        Metric::StallIo,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Metric::Compute => "compute",
            Metric::Send => "send",
            Metric::Receive => "receive",
            Metric::Fabric => "fabric",
            Metric::StallData => "stall_data",
            Metric::StallBackpressure => "stall_backpressure",
            Metric::StallIo => "stall_io",
        }
    }
}

/// One window of one agent: cycles per metric.
pub type Bin = (u32, [u64; METRICS]);

/// One task run of a sampled agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub agent: u32,
    pub task: u32,
    pub start: u64,
    pub finish: u64,
    pub compute: u64,
}

/// What to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceSpec {
    /// The window doubles whenever the run would need more windows than this.
    pub max_windows: u32,
    /// Agents (global ids) whose task runs are kept as spans.
    pub sample: Vec<u32>,
}

/// A partition's recording.
#[derive(Clone, Debug)]
pub(crate) struct PartRecorder {
    pub window: u64,
    max_windows: u32,
    /// Per local agent, bins in window order.
    pub bins: Vec<SmallVec<[Bin; 2]>>,
    /// Local agents whose runs are kept.
    sampled: Vec<bool>,
    pub spans: Vec<Span>,
}

impl PartRecorder {
    pub fn new(spec: &TraceSpec, agent_ids: &[u32]) -> PartRecorder {
        PartRecorder {
            window: 1,
            max_windows: spec.max_windows.max(1),
            bins: vec![SmallVec::new(); agent_ids.len()],
            sampled: agent_ids.iter().map(|id| spec.sample.binary_search(id).is_ok()).collect(),
            spans: Vec::new(),
        }
    }

    /// Doubles the window until cycle `end` fits.
    fn fit(&mut self, end: u64) {
        while end > self.window * self.max_windows as u64 {
            self.window *= 2;
            for bins in self.bins.iter_mut() {
                merge_pairs(bins);
            }
        }
    }

    /// Adds `len` cycles of `m` starting at `start`, each weighted `weight` (1 for cycle metrics, the
    /// capacity units held for link metrics). Weights multiply, never divide, so splitting is exact.
    pub fn add(&mut self, agent: u32, m: Metric, start: u64, len: u64, weight: u64) {
        if len == 0 || weight == 0 {
            return;
        }
        self.fit(start + len);
        let w = self.window;
        let bins = &mut self.bins[agent as usize];
        let mut t = start;
        let end = start + len;
        while t < end {
            let idx = (t / w) as u32;
            let upto = ((idx as u64 + 1) * w).min(end);
            let cycles = (upto - t) * weight;
            let pos = bins.iter().rposition(|b| b.0 <= idx);
            match pos {
                Some(p) if bins[p].0 == idx => bins[p].1[m as usize] += cycles,
                Some(p) => bins.insert(p + 1, (idx, with(m, cycles))),
                None => bins.insert(0, (idx, with(m, cycles))),
            }
            t = upto;
        }
    }

    pub fn span(&mut self, local: u32, s: Span) {
        if self.sampled[local as usize] {
            self.spans.push(s);
        }
    }

    /// Merges bins until the window is `w` (a power-of-two multiple of the current one).
    pub fn widen_to(&mut self, w: u64) {
        while self.window < w {
            self.window *= 2;
            for bins in self.bins.iter_mut() {
                merge_pairs(bins);
            }
        }
    }
}

fn with(m: Metric, cycles: u64) -> [u64; METRICS] {
    let mut v = [0; METRICS];
    v[m as usize] = cycles;
    v
}

/// Halves the resolution of sorted bins: windows 2i and 2i+1 become window i.
fn merge_pairs(bins: &mut SmallVec<[Bin; 2]>) {
    let mut out: SmallVec<[Bin; 2]> = SmallVec::new();
    for &(idx, v) in bins.iter() {
        let k = idx / 2;
        match out.last_mut() {
            Some(last) if last.0 == k => {
                for (a, b) in last.1.iter_mut().zip(v) {
                    *a += b;
                }
            }
            _ => out.push((k, v)),
        }
    }
    *bins = out;
}

/// The whole run's recording, agents in global order (PEs in mesh order, then ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recording {
    pub window_cycles: u64,
    pub windows: u32,
    pub bins: Vec<Vec<Bin>>,
    pub spans: Vec<Span>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubling_is_exact() {
        let spec = TraceSpec { max_windows: 4, sample: vec![] };
        let mut a = PartRecorder::new(&spec, &[0]);
        // Contributions added while the window grows...
        a.add(0, Metric::Compute, 0, 3, 1);
        a.add(0, Metric::Compute, 5, 10, 1);
        a.add(0, Metric::Send, 30, 7, 3);
        // ...equal those binned at the final window directly.
        let mut b = PartRecorder::new(&spec, &[0]);
        b.fit(40);
        b.add(0, Metric::Compute, 0, 3, 1);
        b.add(0, Metric::Compute, 5, 10, 1);
        b.add(0, Metric::Send, 30, 7, 3);
        assert_eq!(a.window, b.window);
        assert_eq!(a.bins, b.bins);
        let total: u64 = a.bins[0].iter().map(|b| b.1[0]).sum();
        assert_eq!(total, 13);
    }
}
