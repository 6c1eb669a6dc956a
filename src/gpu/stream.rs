//! Memory-bound kernels (elementwise, norms, softmax, embedding gathers, the optimizer): every byte
//! read once from HBM and every result written once, with the vector work on the FP32 pipes; reads
//! and writes pay their own sustained rates, and the slowest of HBM, L2 and the FP32 pipes shows.

use super::timing::{Resource, Shares, Timing, Traffic};
use crate::hw::GpuHw;

/// One streaming kernel's work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct StreamShape {
    pub read: u64,
    pub write: u64,
    /// FP32 vector FLOPs.
    pub flops: u64,
}

pub fn time_stream(gpu: &GpuHw, s: &StreamShape) -> Timing {
    let hbm_s = s.read as f64 / gpu.hbm.read_bytes_per_s + s.write as f64 / gpu.hbm.write_bytes_per_s;
    let l2_s = (s.read + s.write) as f64 / gpu.l2.bytes_per_s;
    let compute_s = s.flops as f64 / gpu.fp32_flops_per_s();
    let mut best = (hbm_s, Resource::Hbm);
    for (t, r) in [(compute_s, Resource::Compute), (l2_s, Resource::L2)] {
        if t > best.0 {
            best = (t, r);
        }
    }
    let mut shares = Shares::default();
    shares.add(best.1, best.0);
    Timing {
        seconds: best.0,
        shares,
        traffic: Traffic {
            hbm_read: s.read,
            hbm_write: s.write,
            l2: s.read + s.write,
            smem: s.read + s.write,
            l2_hits: 0,
            l2_misses: 0,
        },
        exec_flops: s.flops as f64,
        compute_busy_s: compute_s,
        config: "grid-stride over all SMs".into(),
    }
}

/// Units a resident-read sweep simulates per pass at most.
const SWEEP_UNITS: u64 = 1 << 15;

/// A read-only kernel that sweeps a `working_set` of bytes `passes` times (the L2-bandwidth
/// microbenchmark): every pass goes through the simulated L2, so a working set within its capacity
/// is served at L2 bandwidth after the first pass and one beyond it streams from HBM.
pub fn time_resident_reads(gpu: &GpuHw, working_set: u64, passes: u64) -> Timing {
    use super::l2::{unit_key, L2Sim};
    let unit = working_set.div_ceil(SWEEP_UNITS).max(4096);
    let units = working_set.div_ceil(unit);
    let mut cache = L2Sim::new(gpu.l2.bytes, gpu.l2.partitions, gpu.l2.ways, unit);
    let parts = cache.partitions();
    let part_bw = gpu.l2.bytes_per_s / parts as f64;
    let mut shares = Shares::default();
    let mut traffic = Traffic::default();
    let mut seconds = 0.0;
    for _ in 0..passes {
        let mut part = vec![0u64; parts];
        let mut miss = 0u64;
        for u in 0..units {
            let key = unit_key(0x5EED, 0, u, 0);
            if !cache.access(key) {
                miss += unit;
            }
            part[cache.partition(key)] += unit;
        }
        let l2_s = part.iter().copied().max().unwrap_or(0) as f64 / part_bw;
        let hbm_s = miss as f64 / gpu.hbm.read_bytes_per_s;
        if hbm_s > l2_s {
            shares.add(Resource::Hbm, hbm_s);
        } else {
            shares.add(Resource::L2, l2_s);
        }
        seconds += l2_s.max(hbm_s);
        traffic.l2 += units * unit;
        traffic.hbm_read += miss;
    }
    traffic.l2_hits = cache.hits;
    traffic.l2_misses = cache.misses;
    Timing {
        seconds,
        shares,
        traffic,
        exec_flops: 0.0,
        compute_busy_s: 0.0,
        config: format!("{passes} passes over {working_set} bytes in {unit}-byte units"),
    }
}
