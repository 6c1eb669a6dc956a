//! What a kernel model returns: its duration, what bounded it, and the bytes it moved per level.

use std::ops::AddAssign;

/// The resources a kernel's (or a step's) time is attributed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// Tensor cores or FP32 pipes.
    Compute,
    /// Shared-memory bandwidth feeding the tensor cores.
    Smem,
    L2,
    Hbm,
    /// Pipeline fill and synchronisation latencies inside a kernel.
    Latency,
    /// Kernel launch gaps and host-side launch cost.
    Launch,
    /// Collectives and point-to-point transfers between GPUs.
    Network,
    /// Pipeline-parallel stages waiting (1F1B fill and drain).
    Bubble,
}

impl Resource {
    pub const ALL: [Resource; 8] = [
        Resource::Compute,
        Resource::Smem,
        Resource::L2,
        Resource::Hbm,
        Resource::Latency,
        Resource::Launch,
        Resource::Network,
        Resource::Bubble,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Resource::Compute => "compute",
            Resource::Smem => "smem",
            Resource::L2 => "l2",
            Resource::Hbm => "hbm",
            Resource::Latency => "latency",
            Resource::Launch => "launch",
            Resource::Network => "network",
            Resource::Bubble => "pipeline_bubble",
        }
    }

    fn idx(self) -> usize {
        self as usize
    }
}

/// Seconds attributed to each resource.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Shares(pub [f64; 8]);

impl Shares {
    pub fn add(&mut self, r: Resource, s: f64) {
        self.0[r.idx()] += s;
    }
    pub fn get(&self, r: Resource) -> f64 {
        self.0[r.idx()]
    }
    pub fn total(&self) -> f64 {
        self.0.iter().sum()
    }
    /// The resource with the largest share (the first of equals, in `Resource::ALL` order).
    pub fn dominant(&self) -> Resource {
        let mut best = Resource::Compute;
        for r in Resource::ALL {
            if self.get(r) > self.get(best) {
                best = r;
            }
        }
        best
    }
    pub fn scaled(&self, f: f64) -> Shares {
        let mut s = *self;
        for v in s.0.iter_mut() {
            *v *= f;
        }
        s
    }
}

impl AddAssign for Shares {
    fn add_assign(&mut self, o: Shares) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a += b;
        }
    }
}

/// Bytes moved per level of the memory hierarchy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub hbm_read: u64,
    pub hbm_write: u64,
    /// Bytes served by or written through L2 (every global access passes it).
    pub l2: u64,
    /// Bytes read from or written to SMEM/L1.
    pub smem: u64,
    pub l2_hits: u64,
    pub l2_misses: u64,
}

impl AddAssign for Traffic {
    fn add_assign(&mut self, o: Traffic) {
        self.hbm_read += o.hbm_read;
        self.hbm_write += o.hbm_write;
        self.l2 += o.l2;
        self.smem += o.smem;
        self.l2_hits += o.l2_hits;
        self.l2_misses += o.l2_misses;
    }
}

impl Traffic {
    pub fn scaled(&self, n: u64) -> Traffic {
        Traffic {
            hbm_read: self.hbm_read.saturating_mul(n),
            hbm_write: self.hbm_write.saturating_mul(n),
            l2: self.l2.saturating_mul(n),
            smem: self.smem.saturating_mul(n),
            l2_hits: self.l2_hits.saturating_mul(n),
            l2_misses: self.l2_misses.saturating_mul(n),
        }
    }
}

/// The modelled execution of one kernel on one GPU, excluding launch overhead.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timing {
    pub seconds: f64,
    /// Where the seconds went; sums to `seconds`.
    pub shares: Shares,
    pub traffic: Traffic,
    /// FLOPs the hardware executes, padding and recomputation included.
    pub exec_flops: f64,
    /// Seconds the math units were busy (for utilization).
    pub compute_busy_s: f64,
    /// The configuration chosen (`tile 128x256x64, swizzle 8, 16 waves`).
    pub config: String,
}

impl Timing {
    /// The bound: the resource with the largest share.
    pub fn bound(&self) -> Resource {
        self.shares.dominant()
    }
}
