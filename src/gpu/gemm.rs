//! GEMM kernels: the CTA tile, the schedule of tiles over the SMs, and the L2 simulated over the
//! tiles' real access order.
//!
//! A kernel computes `batch` independent products C[M, N] = A[M, K] · B[K, N]. Its output is cut into
//! BM x BN tiles (tile quantization: edge tiles compute their full size); each CTA walks K in
//! BK-deep steps, staging an A and a B block in SMEM per step. Three schedules exist, as in cuBLAS
//! and CUTLASS:
//! - data-parallel: CTAs in waves of `SMs x CTAs-per-SM` (wave quantization), rasterized in bands
//!   of `swizzle` tile rows (CUTLASS's threadblock swizzle);
//! - split-K: the same with K cut into `split` slices, fp32 partials reduced at the end;
//! - stream-K (Hopper only; cuBLAS 12 / CUTLASS 3 persistent kernels): the tiles' K-iterations dealt
//!   out evenly to one persistent CTA per SM, with a fix-up where a tile's iterations span two SMs.
//!
//! Per step, every active CTA touches its A and B blocks in the L2 simulation; misses go to HBM.
//! The step takes the longest of the math on the busiest SM, its SMEM operand traffic, the busier
//! L2 partition's bytes over its bandwidth, and the misses over HBM read bandwidth: loads and math
//! overlap (multi-stage pipelines), and whichever is slower shows. Waves add their epilogue (C
//! writes, overlapped with the next wave's main loop on Hopper's persistent kernels, once the
//! consumer warpgroups have staged their accumulators through SMEM) and pipeline fill latency. The library picks the fastest candidate, as cuBLAS's heuristics aim to; a lower
//! bound prunes candidates that cannot win, so only a few are simulated.

use super::l2::{unit_key, L2Sim};
use super::timing::{Resource, Shares, Timing, Traffic};
use crate::hw::{GpuArch, GpuHw};
use crate::model::DType;

/// One GEMM kernel's problem: `batch` products of [M, K] x [K, N] in `dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GemmShape {
    pub batch: u64,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub dtype: DType,
    /// Every operand's leading dimension is a multiple of 16 bytes. TMA needs it (its global
    /// strides are multiples of 16 bytes: CUDA Driver API, `cuTensorMapEncodeTiled`), so an
    /// unaligned GEMM on Hopper runs the pre-Hopper kernels (`mma.sync` from registers, no TMA, no
    /// persistent scheduling), as cuBLAS does when it falls back to its sm75/sm80 CUTLASS kernels.
    pub aligned: bool,
}

impl GemmShape {
    /// A GEMM whose leading dimensions are multiples of 16 bytes.
    pub fn new(batch: u64, m: u64, n: u64, k: u64, dtype: DType) -> GemmShape {
        GemmShape { batch, m, n, k, dtype, aligned: true }
    }

    /// Whether a dimension of `elems` elements of `dtype` can be a leading dimension for TMA.
    pub fn aligned_dim(elems: u64, dtype: DType) -> bool {
        (elems * dtype.bytes()).is_multiple_of(16)
    }

    pub fn flops(&self) -> f64 {
        2.0 * self.batch as f64 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// CTA tiles (BM, BN) offered, as in cuBLAS's and CUTLASS's kernel tables.
const TILES: [(u64, u64); 6] = [(128, 256), (256, 128), (128, 128), (128, 64), (64, 128), (64, 64)];
/// Rasterization bands (tile rows per band, at most the grid's rows): CUTLASS's swizzle of 8.
const SWIZZLES: [u64; 1] = [8];
/// Split-K factors offered to data-parallel kernels.
const SPLITS: [u64; 6] = [1, 2, 3, 4, 8, 16];
/// L2 accesses one candidate's simulation may make; beyond it the sector groups grow along K.
const ACCESS_BUDGET: u64 = 1 << 18;
/// Every candidate that can win is first simulated at this coarser budget; the best few are then
/// simulated at `ACCESS_BUDGET` and the fastest of those is chosen.
const RANK_BUDGET: u64 = 1 << 14;
const REFINED: usize = 3;
/// CTAs per thread-block cluster along M on Hopper (sharing B through TMA multicast).
const CLUSTER_M: u64 = 2;
/// Most CTAs resident on one SM.
const MAX_CTAS_PER_SM: u64 = 8;
/// Rows of one wgmma warpgroup's share of a Hopper tile (`wgmma.m64nNk16`): every warpgroup reads
/// the whole B block from SMEM.
const WGMMA_M: u64 = 64;
/// Ampere's `mma.sync` warps each own a 64 x 64 piece of the tile and load their A rows and B
/// columns from SMEM (ldmatrix), so each operand is read (other dimension / 64) times.
const WARP_TILE: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sched {
    DataParallel { split: u64 },
    StreamK,
}

#[derive(Clone, Copy, Debug)]
struct Cand {
    bm: u64,
    bn: u64,
    bk: u64,
    swizzle: u64,
    sched: Sched,
    ctas_per_sm: u64,
}

/// Derived rates of one GPU for one dtype.
struct Rates {
    sms: u64,
    clock: f64,
    /// Sustained FLOPs per clock per SM.
    flops_per_clk: f64,
    smem_bytes_per_clk: f64,
    l2_bytes_per_s: f64,
    partitions: u64,
    read_bytes_per_s: f64,
    write_bytes_per_s: f64,
    hbm_latency_s: f64,
    l2_latency_s: f64,
    persistent: bool,
    hopper: bool,
}

impl Rates {
    fn new(gpu: &GpuHw, shape: &GemmShape) -> Rates {
        let dtype = shape.dtype;
        let hopper = hopper_kernels(gpu, shape);
        Rates {
            sms: gpu.sm.count as u64,
            clock: gpu.sm.clock_hz,
            // Unaligned on Hopper: the pre-Hopper kernels' mma.sync rate (FP16/BF16 only; FP8 and the FP32
            // pipes have no other path).
            flops_per_clk: if gpu.arch == GpuArch::Hopper && !hopper && matches!(dtype, DType::Fp16 | DType::Bf16) {
                gpu.tensor.mma_sync_flops_per_clk
            } else {
                gpu.tensor.flops_per_clk.get(dtype)
            } * gpu.tensor.sustained_fraction.get(dtype),
            smem_bytes_per_clk: gpu.sm.smem_bytes_per_clk as f64,
            l2_bytes_per_s: gpu.l2.bytes_per_s,
            partitions: gpu.l2.partitions as u64,
            read_bytes_per_s: gpu.hbm.read_bytes_per_s,
            write_bytes_per_s: gpu.hbm.write_bytes_per_s,
            hbm_latency_s: gpu.hbm.latency_cycles as f64 / gpu.sm.clock_hz,
            // Lines are interleaved over the partitions by address, so half of an SM's L2 hits come
            // from the far partition: the mean of the two latencies.
            l2_latency_s: (gpu.l2.near_latency_cycles + gpu.l2.far_latency_cycles) as f64 / 2.0 / gpu.sm.clock_hz,
            // Hopper GEMMs are persistent, warp-specialized kernels: TMA stores of one tile's
            // epilogue overlap the next tile's main loop, and the pipeline fills once.
            persistent: hopper,
            hopper,
        }
    }
}

/// Hopper's TMA/wgmma persistent kernels run the GEMM: a Hopper GPU and 16-byte-aligned operands.
fn hopper_kernels(gpu: &GpuHw, shape: &GemmShape) -> bool {
    gpu.arch == GpuArch::Hopper && shape.aligned
}

/// Bytes of one element of the output: FP8 GEMMs write BF16, as cuBLASLt's FP8 kernels do.
fn out_bytes(d: DType) -> u64 {
    d.bytes().max(2)
}

/// Depth of one K step in elements: 128 bytes per operand row on Hopper (one line per row per
/// TMA stage), 64 on Ampere (CUTLASS's default `cp.async` tiles, 128x128x32 for fp16).
fn bk(hopper: bool, d: DType) -> u64 {
    let row_bytes = if hopper { 128 } else { 64 };
    (row_bytes / d.bytes()).max(1)
}

/// SMEM operand bytes one CTA reads per K step.
fn smem_operand_bytes(hopper: bool, bm: u64, bn: u64, bk: u64, e: u64) -> u64 {
    if hopper {
        (bm + bn * bm.div_ceil(WGMMA_M)) * bk * e
    } else {
        (bm * bn.div_ceil(WARP_TILE) + bn * bm.div_ceil(WARP_TILE)) * bk * e
    }
}

fn candidates(gpu: &GpuHw, shape: &GemmShape) -> Vec<Cand> {
    let e = shape.dtype.bytes();
    let hopper = hopper_kernels(gpu, shape);
    let bk = bk(hopper, shape.dtype);
    let ksteps = shape.k.div_ceil(bk);
    let mut out = Vec::new();
    for (bm, bn) in TILES {
        // Two SMEM stages at least (load the next step while computing this one); the fp32
        // accumulators take at most half of the register file.
        let stage = (bm + bn) * bk * e;
        let by_smem = gpu.sm.smem_bytes / (2 * stage);
        let by_regs = (gpu.sm.register_file_bytes / 2) / (bm * bn * 4);
        let mut ctas = by_smem.min(by_regs).min(MAX_CTAS_PER_SM);
        if ctas == 0 {
            // Nothing fits two stages (a counterfactual SM): the smallest tile still runs, one CTA
            // per SM, as the last resort.
            if (bm, bn) != TILES[TILES.len() - 1] || !out.is_empty() {
                continue;
            }
            ctas = 1;
        }
        for swizzle in SWIZZLES {
            // Hopper rasterizes clusters, so a band holds at least the cluster's two tile rows.
            let swizzle = if hopper { swizzle.max(CLUSTER_M) } else { swizzle };
            for split in SPLITS {
                if split > ksteps {
                    continue;
                }
                out.push(Cand { bm, bn, bk, swizzle, sched: Sched::DataParallel { split }, ctas_per_sm: ctas });
            }
            if hopper {
                out.push(Cand { bm, bn, bk, swizzle, sched: Sched::StreamK, ctas_per_sm: 1 });
            }
        }
    }
    out
}

/// Times one GEMM kernel: the fastest candidate's simulated execution.
pub fn time_gemm(gpu: &GpuHw, shape: &GemmShape) -> Timing {
    pick_gemm(gpu, shape).1
}

/// The kernel the library picks for a shape (as cuBLAS's heuristics do, whatever the clock the
/// GPU will run it at).
#[derive(Clone, Copy, Debug)]
pub struct GemmPick(Cand);

/// The fastest candidate and its simulated execution.
pub fn pick_gemm(gpu: &GpuHw, shape: &GemmShape) -> (GemmPick, Timing) {
    let r = Rates::new(gpu, shape);
    let cands = candidates(gpu, shape);
    let mut bounded: Vec<(f64, usize)> =
        cands.iter().enumerate().map(|(i, c)| (lower_bound(&r, shape, c), i)).collect();
    bounded.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    // Rank: coarse simulations of every candidate whose bound does not exclude it.
    let mut ranked: Vec<(f64, usize)> = Vec::new();
    let mut best_coarse = f64::INFINITY;
    for (lb, i) in bounded {
        if lb >= best_coarse {
            break;
        }
        let t = simulate(gpu, &r, shape, &cands[i], RANK_BUDGET).seconds;
        best_coarse = best_coarse.min(t);
        ranked.push((t, i));
    }
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    // Refine the best few at full resolution.
    let mut best: Option<(GemmPick, Timing)> = None;
    for &(_, i) in ranked.iter().take(REFINED) {
        let t = simulate(gpu, &r, shape, &cands[i], ACCESS_BUDGET);
        if best.as_ref().is_none_or(|b| t.seconds < b.1.seconds) {
            best = Some((GemmPick(cands[i]), t));
        }
    }
    best.unwrap_or_else(|| (GemmPick(cands[0]), Timing::default()))
}

/// Times the picked kernel on `gpu` (the same GPU at another clock, say).
pub fn time_pick(gpu: &GpuHw, shape: &GemmShape, pick: &GemmPick) -> Timing {
    simulate(gpu, &Rates::new(gpu, shape), shape, &pick.0, ACCESS_BUDGET)
}

/// Grid geometry of a candidate.
struct Grid {
    tm: u64,
    tn: u64,
    /// Tiles of one split (batch x tm x tn).
    base: u64,
    ksteps: u64,
}

fn grid(shape: &GemmShape, c: &Cand) -> Grid {
    let tm = shape.m.div_ceil(c.bm);
    let tn = shape.n.div_ceil(c.bn);
    Grid { tm, tn, base: shape.batch * tm * tn, ksteps: shape.k.div_ceil(c.bk) }
}

/// (batch, tile row, tile column) of the `t`-th tile of one split, in rasterization order.
fn coords(t: u64, g: &Grid, swizzle: u64) -> (u64, u64, u64) {
    let per_batch = g.tm * g.tn;
    let b = t / per_batch;
    let w = t % per_batch;
    let band_tiles = swizzle * g.tn;
    let band = w / band_tiles;
    let r0 = band * swizzle;
    let rows = swizzle.min(g.tm - r0);
    let within = w % band_tiles;
    (b, r0 + within % rows, within / rows)
}

/// A bound no simulation of the candidate can beat: the math with no memory stall, the L2 bytes its
/// full tiles must load at the whole L2's bandwidth (B halved where Hopper multicasts it), every
/// unique byte once through HBM; plus the latencies the candidate pays whatever happens.
fn lower_bound(r: &Rates, s: &GemmShape, c: &Cand) -> f64 {
    let g = grid(s, c);
    let e = s.dtype.bytes();
    let flops_step = 2.0 * (c.bm * c.bn * c.bk) as f64;
    let sm_flops_per_s = r.flops_per_clk * r.clock;
    let (b, m, n, k) = (s.batch as f64, s.m as f64, s.n as f64, s.k as f64);
    let unique = b * (m * k + k * n) * e as f64 / r.read_bytes_per_s
        + b * m * n * out_bytes(s.dtype) as f64 / r.write_bytes_per_s;
    let full_tiles = s.batch * (s.m / c.bm) * (s.n / c.bn);
    let b_share = if r.hopper { c.bn / CLUSTER_M } else { c.bn };
    let l2_per_tile_step = ((c.bm + b_share) * c.bk * e) as f64;
    match c.sched {
        Sched::DataParallel { split } => {
            let kps = g.ksteps.div_ceil(split);
            let tiles = g.base * split;
            let slots = r.sms * c.ctas_per_sm;
            let waves = tiles.div_ceil(slots);
            let full = tiles / slots;
            let busiest = full * c.ctas_per_sm + (tiles % slots).div_ceil(r.sms);
            let compute = busiest as f64 * kps as f64 * flops_step / sm_flops_per_s;
            let l2 = full_tiles as f64 * (g.ksteps / split * split) as f64 * l2_per_tile_step / r.l2_bytes_per_s;
            let lat = if r.persistent { 1.0 } else { waves as f64 } * r.hbm_latency_s;
            compute.max(unique).max(l2) + lat
        }
        Sched::StreamK => {
            let iters = g.base * g.ksteps;
            let compute = iters.div_ceil(r.sms) as f64 * flops_step / sm_flops_per_s;
            let l2 = (full_tiles * g.ksteps) as f64 * l2_per_tile_step / r.l2_bytes_per_s;
            compute.max(l2) + r.hbm_latency_s
        }
    }
}

/// Per-step accounting shared by the schedules.
struct Acc {
    shares: Shares,
    traffic: Traffic,
    exec_flops: f64,
    compute_busy_s: f64,
}

impl Acc {
    /// Closes one step: the longest of math, SMEM, the busier L2 partition and HBM reads.
    fn step(&mut self, r: &Rates, compute_s: f64, smem_s: f64, part_bytes: &[u64], miss_bytes: u64) -> f64 {
        let part_bw = r.l2_bytes_per_s / r.partitions as f64;
        let l2_s = part_bytes.iter().copied().max().unwrap_or(0) as f64 / part_bw;
        let hbm_s = miss_bytes as f64 / r.read_bytes_per_s;
        let mut best = (compute_s, Resource::Compute);
        for (t, res) in [(smem_s, Resource::Smem), (l2_s, Resource::L2), (hbm_s, Resource::Hbm)] {
            if t > best.0 {
                best = (t, res);
            }
        }
        self.shares.add(best.1, best.0);
        self.compute_busy_s += compute_s;
        best.0
    }
}

/// A unit's bytes: `rows` valid rows (or columns) of `bk x jj` elements.
fn unit_bytes(valid: u64, bk: u64, jj: u64, e: u64) -> u64 {
    valid * bk * jj * e
}

/// Valid rows of sub-block `r` (of `unit` rows) of tile `i` (of `tile` rows) in a dimension of `dim`.
fn valid(dim: u64, i: u64, tile: u64, r: u64, unit: u64) -> u64 {
    let start = i * tile + r * unit;
    dim.saturating_sub(start).min(unit)
}

fn simulate(gpu: &GpuHw, r: &Rates, s: &GemmShape, c: &Cand, budget: u64) -> Timing {
    match c.sched {
        Sched::DataParallel { split } => simulate_dp(gpu, r, s, c, split, budget),
        Sched::StreamK => simulate_stream_k(gpu, r, s, c, budget),
    }
}

/// What one wave of a data-parallel kernel did.
#[derive(Clone, Default)]
struct Wave {
    seconds: f64,
    shares: Shares,
    traffic: Traffic,
    exec_flops: f64,
    compute_busy_s: f64,
}

/// Waves simulated one by one; beyond this, the first `SAMPLE_WAVES` are simulated, the waves in
/// between repeat the second half of them (the cache has reached its steady state), and the last wave
/// is simulated.
const MAX_SIM_WAVES: u64 = 48;
const SAMPLE_WAVES: u64 = 32;

fn simulate_dp(gpu: &GpuHw, r: &Rates, s: &GemmShape, c: &Cand, split: u64, budget: u64) -> Timing {
    let g = grid(s, c);
    let e = s.dtype.bytes();
    let oe = out_bytes(s.dtype);
    let kps = g.ksteps.div_ceil(split);
    let tiles = g.base * split;
    let slots = r.sms * c.ctas_per_sm;
    let waves = tiles.div_ceil(slots);
    let sampled = waves > MAX_SIM_WAVES;
    let sim_waves = if sampled { SAMPLE_WAVES + 1 } else { waves };
    let umin = c.bm.min(c.bn);
    let (ra, rb) = (c.bm / umin, c.bn / umin);
    let per_wave = slots.min(tiles) * kps * (ra + rb);
    let j = coarsening(gpu, sim_waves * per_wave, per_wave, umin * c.bk * e, budget);
    let mut cache = L2Sim::new(gpu.l2.bytes, gpu.l2.partitions, gpu.l2.ways, umin * c.bk * j * e);
    let parts = cache.partitions();
    let flops_step = 2.0 * (c.bm * c.bn * c.bk) as f64;
    let smem_step = smem_operand_bytes(r.hopper, c.bm, c.bn, c.bk, e) as f64;
    let sm_flops_per_s = r.flops_per_clk * r.clock;
    let smem_per_s = r.smem_bytes_per_clk * r.clock;
    let workspace = split.saturating_mul(s.batch).saturating_mul(s.m).saturating_mul(s.n).saturating_mul(4);
    let workspace_in_l2 = split > 1 && workspace <= gpu.l2.bytes / 2;
    let mut part_bytes = vec![0u64; parts];
    let mut run_wave = |w: u64, cache: &mut L2Sim| -> Wave {
        let mut acc =
            Acc { shares: Shares::default(), traffic: Traffic::default(), exec_flops: 0.0, compute_busy_s: 0.0 };
        let (hits0, misses0) = (cache.hits, cache.misses);
        let first = w * slots;
        let n = slots.min(tiles - first);
        let c_max = n.div_ceil(r.sms) as f64;
        let mut main = 0.0;
        let mut read_s = 0.0;
        for cs in 0..kps.div_ceil(j) {
            part_bytes.iter_mut().for_each(|b| *b = 0);
            let mut miss_bytes = 0u64;
            let mut jj_max = 0u64;
            for t in first..first + n {
                let sp = t / g.base;
                let (b, mi, ni) = coords(t % g.base, &g, c.swizzle);
                let k0 = sp * kps;
                let steps = (k0 + kps).min(g.ksteps).saturating_sub(k0);
                let s0 = cs * j;
                if s0 >= steps {
                    continue;
                }
                let jj = j.min(steps - s0);
                jj_max = jj_max.max(jj);
                let kc = (k0 + s0) / j;
                acc.exec_flops += jj as f64 * flops_step;
                acc.traffic.smem += jj * smem_step as u64;
                for rr in 0..ra {
                    let bytes = unit_bytes(valid(s.m, mi, c.bm, rr, umin), c.bk, jj, e);
                    let key = unit_key(0xA, b, mi * ra + rr, kc);
                    touch(cache, key, bytes, &mut part_bytes, &mut miss_bytes);
                }
                // The second CTA of a cluster receives B by multicast from its partner's load.
                let multicast = r.hopper
                    && mi % CLUSTER_M == 1
                    && t > first
                    && (t - 1) / g.base == sp
                    && coords((t - 1) % g.base, &g, c.swizzle) == (b, mi - 1, ni);
                if !multicast {
                    for rr in 0..rb {
                        let bytes = unit_bytes(valid(s.n, ni, c.bn, rr, umin), c.bk, jj, e);
                        let key = unit_key(0xB, b, ni * rb + rr, kc);
                        touch(cache, key, bytes, &mut part_bytes, &mut miss_bytes);
                    }
                }
            }
            let loaded: u64 = part_bytes.iter().sum();
            acc.traffic.l2 += loaded;
            acc.traffic.smem += loaded;
            acc.traffic.hbm_read += miss_bytes;
            read_s += miss_bytes as f64 / r.read_bytes_per_s;
            let compute_s = c_max * jj_max as f64 * flops_step / sm_flops_per_s;
            let smem_s = c_max * jj_max as f64 * smem_step / smem_per_s;
            main += acc.step(r, compute_s, smem_s, &part_bytes, miss_bytes);
        }
        // Epilogue: each CTA writes its tile (fp32 partials under split-K, into the workspace).
        let mut out = 0u64;
        for t in first..first + n {
            let (_, mi, ni) = coords(t % g.base, &g, c.swizzle);
            let rows = s.m.saturating_sub(mi * c.bm).min(c.bm);
            let cols = s.n.saturating_sub(ni * c.bn).min(c.bn);
            out += rows * cols * if split > 1 { 4 } else { oe };
        }
        acc.traffic.l2 += out;
        acc.traffic.smem += out;
        let write_s = if workspace_in_l2 {
            0.0
        } else {
            acc.traffic.hbm_write += out;
            out as f64 / r.write_bytes_per_s
        };
        let (busy, wave) = if r.persistent {
            // The TMA stores drain while the next tile's main loop runs, but the consumer warpgroups
            // first stage their accumulators through SMEM (at the SMEM bandwidth), and only then start
            // the next tile: CUTLASS's sm90 cooperative kernel runs mma, fixup and epilogue store in
            // turn in its consumer loop (NVIDIA/cutlass, include/cutlass/gemm/kernel/
            // sm90_gemm_tma_warpspecialized_cooperative.hpp).
            let tile_bytes = c.bm * c.bn * if split > 1 { 4 } else { oe };
            let staging_s = c_max * tile_bytes as f64 / smem_per_s;
            acc.shares.add(Resource::Smem, staging_s);
            let busy = main + staging_s;
            (busy, busy.max(read_s + write_s))
        } else {
            (main, main + write_s)
        };
        acc.shares.add(Resource::Hbm, wave - busy);
        let lat = if r.persistent && w > 0 { 0.0 } else { r.hbm_latency_s };
        acc.shares.add(Resource::Latency, lat);
        acc.traffic.l2_hits = cache.hits - hits0;
        acc.traffic.l2_misses = cache.misses - misses0;
        Wave {
            seconds: wave + lat,
            shares: acc.shares,
            traffic: acc.traffic,
            exec_flops: acc.exec_flops,
            compute_busy_s: acc.compute_busy_s,
        }
    };
    let mut total = Wave::default();
    let add = |total: &mut Wave, w: &Wave, times: f64| {
        total.seconds += w.seconds * times;
        total.shares += w.shares.scaled(times);
        total.traffic += w.traffic.scaled(times as u64);
        total.exec_flops += w.exec_flops * times;
        total.compute_busy_s += w.compute_busy_s * times;
    };
    if sampled {
        let mut steady = Wave::default();
        for w in 0..SAMPLE_WAVES {
            let res = run_wave(w, &mut cache);
            add(&mut total, &res, 1.0);
            if w >= SAMPLE_WAVES / 2 {
                add(&mut steady, &res, 1.0);
            }
        }
        // The unsimulated middle waves repeat the steady state, wave for wave.
        let middle = (waves - SAMPLE_WAVES - 1) as f64 / (SAMPLE_WAVES / 2) as f64;
        add(&mut total, &steady, middle);
        let last = run_wave(waves - 1, &mut cache);
        add(&mut total, &last, 1.0);
    } else {
        for w in 0..waves {
            let res = run_wave(w, &mut cache);
            add(&mut total, &res, 1.0);
        }
    }
    let mut seconds = total.seconds;
    let mut shares = total.shares;
    let mut traffic = total.traffic;
    if split > 1 {
        // Serial split-K (CUTLASS's serial split-K, cuBLAS's in-place reduction): the splits of a tile
        // fold their fp32 partials into the workspace in turn, each waiting on a semaphore for the
        // one before; every link of that chain reads and writes a partial tile at one SM's share of
        // the bandwidth (as the stream-K fix-up does) after an L2 round trip, and the last writes C.
        // The tiles' chains run side by side on their own SMs.
        let ws = workspace;
        let out = s.batch.saturating_mul(s.m).saturating_mul(s.n).saturating_mul(oe);
        let partial = (c.bm * c.bn * 4) as f64;
        let (per_sm_bw, res) = if workspace_in_l2 {
            (r.l2_bytes_per_s / r.sms as f64, Resource::L2)
        } else {
            traffic.hbm_read += ws;
            (r.read_bytes_per_s / r.sms as f64, Resource::Hbm)
        };
        let link_s = 2.0 * partial / per_sm_bw;
        let chain_s = (split - 1) as f64 * link_s;
        traffic.l2 += 2 * ws + out;
        traffic.hbm_write += out;
        let write_s = out as f64 / r.write_bytes_per_s;
        let t = chain_s.max(write_s);
        shares.add(if write_s > chain_s { Resource::Hbm } else { res }, t);
        let lat = (split - 1) as f64 * r.l2_latency_s;
        shares.add(Resource::Latency, lat);
        seconds += t + lat;
    }
    let mut config = format!("tile {}x{}x{}", c.bm, c.bn, c.bk);
    if c.swizzle > 1 {
        config.push_str(&format!(", swizzle {}", c.swizzle));
    }
    if split > 1 {
        config.push_str(&format!(", split-k {split}"));
    }
    config.push_str(&format!(
        ", {} wave{} of {} CTAs ({}/SM)",
        waves,
        if waves == 1 { "" } else { "s" },
        slots,
        c.ctas_per_sm
    ));
    if gpu.arch == GpuArch::Hopper && !r.hopper {
        config.push_str(", sm80 mma.sync kernel: a leading dimension is not a multiple of 16 bytes (no TMA)");
    }
    Timing { seconds, shares, traffic, exec_flops: total.exec_flops, compute_busy_s: total.compute_busy_s, config }
}

fn simulate_stream_k(gpu: &GpuHw, r: &Rates, s: &GemmShape, c: &Cand, budget: u64) -> Timing {
    let g = grid(s, c);
    let e = s.dtype.bytes();
    let oe = out_bytes(s.dtype);
    let iters = g.base * g.ksteps;
    let q = iters.div_ceil(r.sms);
    let active = iters.div_ceil(q);
    let umin = c.bm.min(c.bn);
    let (ra, rb) = (c.bm / umin, c.bn / umin);
    let j = coarsening(gpu, iters * (ra + rb), iters * (ra + rb), umin * c.bk * e, budget);
    let mut cache = L2Sim::new(gpu.l2.bytes, gpu.l2.partitions, gpu.l2.ways, umin * c.bk * j * e);
    let parts = cache.partitions();
    let flops_step = 2.0 * (c.bm * c.bn * c.bk) as f64;
    let smem_step = smem_operand_bytes(r.hopper, c.bm, c.bn, c.bk, e) as f64;
    let sm_flops_per_s = r.flops_per_clk * r.clock;
    let smem_per_s = r.smem_bytes_per_clk * r.clock;
    let mut acc = Acc { shares: Shares::default(), traffic: Traffic::default(), exec_flops: 0.0, compute_busy_s: 0.0 };
    let mut main = 0.0;
    let mut read_s = 0.0;
    let mut part_bytes = vec![0u64; parts];
    for cs in 0..q.div_ceil(j) {
        part_bytes.iter_mut().for_each(|b| *b = 0);
        let mut miss_bytes = 0u64;
        let mut jj_max = 0u64;
        for sm in 0..active {
            let start = sm * q + cs * j;
            let end = ((sm + 1) * q).min(iters);
            if start >= end {
                continue;
            }
            let jj = j.min(end - start);
            jj_max = jj_max.max(jj);
            let (b, mi, ni) = coords(start / g.ksteps, &g, c.swizzle);
            let kc = (start % g.ksteps) / j;
            acc.exec_flops += jj as f64 * flops_step;
            acc.traffic.smem += jj * smem_step as u64;
            for rr in 0..ra {
                let bytes = unit_bytes(valid(s.m, mi, c.bm, rr, umin), c.bk, jj, e);
                touch(&mut cache, unit_key(0xA, b, mi * ra + rr, kc), bytes, &mut part_bytes, &mut miss_bytes);
            }
            for rr in 0..rb {
                let bytes = unit_bytes(valid(s.n, ni, c.bn, rr, umin), c.bk, jj, e);
                touch(&mut cache, unit_key(0xB, b, ni * rb + rr, kc), bytes, &mut part_bytes, &mut miss_bytes);
            }
        }
        let loaded: u64 = part_bytes.iter().sum();
        acc.traffic.l2 += loaded;
        acc.traffic.smem += loaded;
        acc.traffic.hbm_read += miss_bytes;
        read_s += miss_bytes as f64 / r.read_bytes_per_s;
        let compute_s = jj_max as f64 * flops_step / sm_flops_per_s;
        let smem_s = jj_max as f64 * smem_step / smem_per_s;
        main += acc.step(r, compute_s, smem_s, &part_bytes, miss_bytes);
    }
    let out = s.batch.saturating_mul(s.m).saturating_mul(s.n).saturating_mul(oe);
    acc.traffic.l2 += out;
    acc.traffic.smem += out;
    acc.traffic.hbm_write += out;
    let write_s = out as f64 / r.write_bytes_per_s;
    // Each SM stages the tiles it finishes through SMEM before its next main loop (the TMA stores
    // then drain in the background); an SM finishes about its share of the tiles.
    let staging_s = g.base.div_ceil(active) as f64 * (c.bm * c.bn * oe) as f64 / smem_per_s;
    acc.shares.add(Resource::Smem, staging_s);
    let main = main + staging_s;
    let body = main.max(read_s + write_s);
    acc.shares.add(Resource::Hbm, body - main);
    // Fix-up: a tile whose iterations span SMs is finished by one of them, which reads the others'
    // fp32 partials through L2 at its share of the L2 bandwidth.
    // The pattern of tile boundaries against SM boundaries repeats; a prefix of tiles shows it.
    let mut max_parts = 1u64;
    let mut tile = 0u64;
    while tile < g.base.min(1 << 16) {
        let first_sm = tile * g.ksteps / q;
        let last_sm = ((tile + 1) * g.ksteps - 1) / q;
        max_parts = max_parts.max(last_sm - first_sm + 1);
        tile += 1;
    }
    let partial = c.bm * c.bn * 4;
    let fixup = if max_parts > 1 {
        let per_sm_bw = r.l2_bytes_per_s / r.sms as f64;
        acc.traffic.l2 += 2 * partial * (max_parts - 1) * active.min(g.base);
        (max_parts - 1) as f64 * partial as f64 / per_sm_bw + r.l2_latency_s
    } else {
        0.0
    };
    acc.shares.add(Resource::L2, fixup);
    acc.shares.add(Resource::Latency, r.hbm_latency_s);
    acc.traffic.l2_hits = cache.hits;
    acc.traffic.l2_misses = cache.misses;
    let mut config = format!("tile {}x{}x{}", c.bm, c.bn, c.bk);
    if c.swizzle > 1 {
        config.push_str(&format!(", swizzle {}", c.swizzle));
    }
    config.push_str(&format!(", stream-k: {q} iterations on each of {active} SMs"));
    Timing {
        seconds: body + fixup + r.hbm_latency_s,
        shares: acc.shares,
        traffic: acc.traffic,
        exec_flops: acc.exec_flops,
        compute_busy_s: acc.compute_busy_s,
        config,
    }
}

/// K-steps grouped into one simulated access, so that a simulation makes at most
/// `ACCESS_BUDGET` accesses; a unit never grows beyond a sixteenth of one L2 set's share of the cache.
/// `accesses` is what the whole simulation would make at one K step per access, `per_wave` what one
/// wave would. The unit may exceed that size only when a single wave alone would overrun the budget.
fn coarsening(gpu: &GpuHw, accesses: u64, per_wave: u64, step_unit_bytes: u64, budget: u64) -> u64 {
    let j = accesses.div_ceil(budget).max(1);
    let max_unit = gpu.l2.bytes / (gpu.l2.partitions as u64 * gpu.l2.ways as u64 * 16);
    let j_max = (max_unit / step_unit_bytes.max(1)).max(1);
    j.min(j_max).max(per_wave.div_ceil(budget))
}

fn touch(cache: &mut L2Sim, key: u64, bytes: u64, part_bytes: &mut [u64], miss_bytes: &mut u64) {
    if bytes == 0 {
        return;
    }
    let hit = cache.access(key);
    part_bytes[cache.partition(key)] += bytes;
    if !hit {
        *miss_bytes += bytes;
    }
}

/// Every candidate simulated, in the library's preference order: (configuration, seconds). For
/// inspecting why a tile was chosen; `time_gemm` simulates only the candidates that can win.
pub fn explain_gemm(gpu: &GpuHw, shape: &GemmShape) -> Vec<(String, f64)> {
    let r = Rates::new(gpu, shape);
    let mut out: Vec<(String, f64)> = candidates(gpu, shape)
        .iter()
        .map(|c| {
            let t = simulate(gpu, &r, shape, c, ACCESS_BUDGET);
            (t.config, t.seconds)
        })
        .collect();
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    out
}
