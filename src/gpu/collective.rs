//! Collectives between GPUs, NCCL-like: ring, tree and NVLS (NVSwitch in-network reduction)
//! algorithms, each in a low-latency and a bulk protocol regime, over NVLink inside a node and the
//! NICs between nodes. NCCL picks the fastest algorithm and protocol for each size; so does this.
//!
//! Time = latency + bus bytes / bus bandwidth, where bus bytes are NCCL's: 2(n-1)/n of the buffer for
//! an all-reduce, (n-1)/n for an all-gather or reduce-scatter. Inside a node the bus bandwidth is the
//! measured asymptote of the algorithm; across nodes each GPU's share goes through its node's NICs,
//! so the group's bus bandwidth is at most (its GPUs per node) x (what NCCL gets per NIC).
//! Latencies: the fitted 8-GPU collective latency of the protocol, scaled by the ring's step count,
//! plus a network hop per step that crosses nodes (ring) or per tree level (tree).

use crate::hw::{GpuSystem, NcclSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CollOp {
    AllReduce,
    AllGather,
    ReduceScatter,
    /// One point-to-point transfer (pipeline stages).
    SendRecv,
}

impl CollOp {
    pub fn name(self) -> &'static str {
        match self {
            CollOp::AllReduce => "allreduce",
            CollOp::AllGather => "allgather",
            CollOp::ReduceScatter => "reduce_scatter",
            CollOp::SendRecv => "send_recv",
        }
    }
}

/// The GPUs taking part: `size` GPUs spread evenly over `nodes` nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Group {
    pub size: u64,
    pub nodes: u64,
}

impl Group {
    pub const ONE: Group = Group { size: 1, nodes: 1 };
    pub fn per_node(&self) -> u64 {
        self.size.div_ceil(self.nodes.max(1))
    }
}

/// One collective call: `bytes` is each GPU's buffer (the all-reduced tensor, the gathered output).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CollSpec {
    pub op: CollOp,
    pub bytes: u64,
    pub group: Group,
}

/// The chosen algorithm and its time.
#[derive(Clone, Debug, PartialEq)]
pub struct CollTime {
    pub seconds: f64,
    pub algorithm: String,
    /// Bytes each GPU sends.
    pub bus_bytes: f64,
    /// Bus bandwidth achieved (NCCL's busbw).
    pub busbw_bytes_per_s: f64,
    pub inter_node: bool,
}

/// Steps of a ring all-reduce over eight GPUs: the collective the latencies were fitted on.
const FIT_RING_STEPS: f64 = 14.0;

pub fn time_collective(sys: &GpuSystem, c: &CollSpec) -> CollTime {
    let n = c.group.size;
    let none = CollTime {
        seconds: 0.0,
        algorithm: "none (one GPU)".into(),
        bus_bytes: 0.0,
        busbw_bytes_per_s: 0.0,
        inter_node: false,
    };
    let Some(nccl) = sys.nccl.as_ref() else {
        return none;
    };
    if n <= 1 || c.bytes == 0 {
        return none;
    }
    let inter = c.group.nodes > 1;
    let bytes = c.bytes as f64;
    let nf = n as f64;
    if c.op == CollOp::SendRecv {
        let (lat, bw) = if inter {
            (nccl.net_hop_latency_s, sys.gpu.nic.effective_bytes_per_s)
        } else {
            (nccl.ll_latency_s / FIT_RING_STEPS, sys.gpu.nvlink.p2p_bytes_per_s)
        };
        let seconds = lat + bytes / bw;
        return CollTime {
            seconds,
            algorithm: if inter { "p2p over IB" } else { "p2p over NVLink" }.into(),
            bus_bytes: bytes,
            busbw_bytes_per_s: bytes / seconds,
            inter_node: inter,
        };
    }
    let (bus_factor, ring_steps) = match c.op {
        CollOp::AllReduce => (2.0 * (nf - 1.0) / nf, 2.0 * (nf - 1.0)),
        _ => ((nf - 1.0) / nf, nf - 1.0),
    };
    let bus_bytes = bytes * bus_factor;
    // Bulk bandwidth of each algorithm over this group.
    let nic_bw = c.group.per_node() as f64 * sys.gpu.nic.effective_bytes_per_s * sys.network.bisection_fraction;
    let nvls = sys.node.nvls && c.group.per_node() > 1;
    let intra_best =
        if nvls { nccl.nvls_busbw_bytes_per_s.max(nccl.ring_busbw_bytes_per_s) } else { nccl.ring_busbw_bytes_per_s };
    let mut algos: Vec<(&str, f64, f64)> = Vec::new(); // (name, latency at the fitted protocol latency 1.0 scale, bandwidth)
    let tree_levels = (c.group.nodes as f64).log2().ceil();
    if inter {
        let bw = nic_bw.min(intra_best);
        algos.push(("ring", ring_steps, bw));
        algos.push(("tree", -tree_levels, bw));
    } else {
        algos.push(("ring", ring_steps, nccl.ring_busbw_bytes_per_s));
        if nvls {
            algos.push(("nvls", 0.0, nccl.nvls_busbw_bytes_per_s));
        }
    }
    let protocols = [("LL", nccl.ll_latency_s, nccl.ll_bandwidth_fraction), ("Simple", nccl.simple_latency_s, 1.0)];
    let mut best: Option<CollTime> = None;
    for &(name, steps, bw) in &algos {
        for &(proto, alpha, frac) in &protocols {
            let latency = latency(nccl, alpha, steps, inter, tree_levels);
            let seconds = latency + bus_bytes / (bw * frac);
            if best.as_ref().is_none_or(|b| seconds < b.seconds) {
                best = Some(CollTime {
                    seconds,
                    algorithm: format!("{name}/{proto}"),
                    bus_bytes,
                    busbw_bytes_per_s: bus_bytes / seconds,
                    inter_node: inter,
                });
            }
        }
    }
    best.unwrap_or(none)
}

/// Latency of an algorithm: `steps` > 0 is a ring of that many steps, 0 is NVLS (one switch
/// round trip), < 0 is a tree of `tree_levels` network levels.
fn latency(nccl: &NcclSpec, alpha: f64, steps: f64, inter: bool, tree_levels: f64) -> f64 {
    let hop = if inter { nccl.net_hop_latency_s } else { 0.0 };
    if steps > 0.0 {
        steps * (alpha / FIT_RING_STEPS + hop)
    } else if steps == 0.0 {
        alpha
    } else {
        alpha + 2.0 * tree_levels * hop
    }
}
