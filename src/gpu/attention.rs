//! Fused attention kernels, FlashAttention-style: scores, softmax and context in one kernel that never
//! writes the score matrix to memory.
//!
//! Forward: one CTA per (sequence, head, block of BM query rows); it keeps its Q block in SMEM and
//! walks the key/value blocks (BN keys each), computing S = Q·K^T, the online softmax, and O += P·V.
//! Under a causal mask it stops at the diagonal (masked blocks are skipped; the diagonal block is
//! computed whole). For decode-like shapes (few query rows) the query heads sharing a KV head are
//! packed into one CTA and the keys are split across CTAs (FlashDecoding) until the SMs are full.
//! Backward: one CTA per (sequence, head, block of BN keys), walking the query blocks: it recomputes
//! S and P, computes dP, dV, dK and dQ (accumulated in fp32 through L2 with atomics).
//!
//! The softmax's exponentials run on the special-function units (MUFU, 16 per clock per SM on
//! A100 and H100), its other vector work on the FP32 pipes.
//! Two generations: FlashAttention-2 runs its matmuls on `mma.sync` and serializes them with the
//! softmax inside a warp; FlashAttention-3 (Hopper) runs `wgmma` and overlaps the softmax of one
//! warpgroup with the matmuls of the other, so the slower of the two shows, plus a ramp where a
//! CTA's first softmax and last P.V have nothing to hide under.
//! Key and value (forward) or query-side (backward) blocks go through the simulated L2 in the CTAs'
//! order, so CTAs of one head share them when they run in the same wave.

use super::l2::{unit_key, L2Sim};
use super::timing::{Resource, Shares, Timing, Traffic};
use crate::graph::ops::flops_per_elem as fpe;
use crate::hw::GpuHw;
use crate::model::DType;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FlashVariant {
    Fa2,
    Fa3,
}

impl FlashVariant {
    pub fn name(self) -> &'static str {
        match self {
            FlashVariant::Fa2 => "flash2",
            FlashVariant::Fa3 => "flash3",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FlashPass {
    Forward,
    Backward,
}

/// One fused attention kernel on one GPU (heads already divided by tensor parallelism).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlashShape {
    pub batch: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub q_len: u64,
    pub kv_len: u64,
    pub head_dim: u64,
    pub causal: bool,
    pub dtype: DType,
    pub pass: FlashPass,
    pub variant: FlashVariant,
}

/// Query rows per CTA that a packed (decode-like) kernel takes at most.
const PACK_ROWS: u64 = 128;
/// L2 accesses a simulation may make before blocks are grouped.
const ACCESS_BUDGET: u64 = 1 << 18;
/// Waves simulated one by one before the steady state is extrapolated (as for GEMMs).
const MAX_SIM_WAVES: u64 = 48;
const SAMPLE_WAVES: u64 = 32;
/// SMEM stages of K/V (forward) or Q/dO (backward) blocks in flight.
const STAGES: u64 = 2;
const MAX_CTAS_PER_SM: u64 = 8;

/// The kernel's geometry, derived from the shape.
struct Geo {
    bm: u64,
    bn: u64,
    /// Heads a CTA is indexed by (query heads, or KV heads when packed).
    heads: u64,
    /// Outer blocks per (sequence, head): query blocks (forward) or key blocks (backward).
    outer: u64,
    /// Inner blocks a full walk visits.
    inner: u64,
    /// Key splits per outer block (forward split-KV).
    splits: u64,
    /// Query rows in one CTA's block (before padding to BM).
    rows: u64,
    packed: bool,
    ctas_per_sm: u64,
}

fn geometry(gpu: &GpuHw, s: &FlashShape) -> Geo {
    let d = s.head_dim;
    let e = s.dtype.bytes();
    let group = (s.heads / s.kv_heads.max(1)).max(1);
    let bn = if d <= 128 { 128 } else { 64 };
    let (bm, heads, rows, packed) = match s.pass {
        FlashPass::Forward if s.q_len * group <= PACK_ROWS && s.q_len < 64 => {
            let rows = s.q_len * group;
            (if rows <= 64 { 64 } else { 128 }, s.kv_heads, rows, true)
        }
        FlashPass::Forward => (128, s.heads, s.q_len, false),
        FlashPass::Backward => (64, s.heads, s.q_len, false),
    };
    let (outer, inner) = match s.pass {
        FlashPass::Forward => (rows.div_ceil(bm), s.kv_len.div_ceil(bn)),
        FlashPass::Backward => (s.kv_len.div_ceil(bn), rows.div_ceil(bm)),
    };
    // SMEM: the resident block and STAGES of the two streamed blocks; registers: the fp32
    // accumulators and the score tile, within half the register file.
    let (resident, streamed, acc) = match s.pass {
        FlashPass::Forward => (bm * d * e, 2 * bn * d * e, (bm * d + bm * bn) * 4),
        FlashPass::Backward => (2 * bn * d * e, 2 * bm * d * e, (2 * bn * d + bm * bn) * 4),
    };
    let by_smem = gpu.sm.smem_bytes / (resident + STAGES * streamed);
    let by_regs = (gpu.sm.register_file_bytes / 2) / acc;
    let ctas_per_sm = by_smem.min(by_regs).clamp(1, MAX_CTAS_PER_SM);
    let ctas = s.batch * heads * outer;
    let splits = match s.pass {
        FlashPass::Forward if ctas < gpu.sm.count as u64 => inner.min((gpu.sm.count as u64).div_ceil(ctas)).max(1),
        _ => 1,
    };
    Geo { bm, bn, heads, outer, inner, splits, rows, packed, ctas_per_sm }
}

/// A CTA on an SM slot: its sequence and head, the next inner block it walks and its end, and
/// whether it has not yet run a step (its ramp is still ahead).
#[derive(Clone, Copy)]
struct Live {
    b: u64,
    h: u64,
    at: u64,
    hi: u64,
    fresh: bool,
}

/// The inner blocks CTA `(outer block o, split sp)` walks: [lo, hi).
fn inner_range(s: &FlashShape, g: &Geo, o: u64, sp: u64) -> (u64, u64) {
    let (lo, hi) = match (s.pass, s.causal && !g.packed) {
        (FlashPass::Forward, true) => {
            let offset = s.kv_len.saturating_sub(s.q_len);
            let visible = s.kv_len.min(offset + (o + 1) * g.bm);
            (0, visible.div_ceil(g.bn))
        }
        (FlashPass::Backward, true) => {
            let offset = s.kv_len.saturating_sub(s.q_len);
            let first_row = (o * g.bn).saturating_sub(offset);
            ((first_row / g.bm).min(g.inner), g.inner)
        }
        _ => (0, g.inner),
    };
    if g.splits <= 1 {
        return (lo, hi);
    }
    let per = (hi - lo).div_ceil(g.splits);
    let a = (lo + sp * per).min(hi);
    (a, (a + per).min(hi))
}

pub fn time_flash(gpu: &GpuHw, s: &FlashShape) -> Timing {
    let g = geometry(gpu, s);
    let d = s.head_dim;
    let e = s.dtype.bytes();
    let clock = gpu.sm.clock_hz;
    let group = (s.heads / s.kv_heads.max(1)).max(1);
    let sustained = gpu.tensor.sustained_fraction.get(s.dtype);
    let (tensor_per_clk, overlap) = match s.variant {
        FlashVariant::Fa2 => (gpu.tensor.mma_sync_flops_per_clk * sustained, false),
        FlashVariant::Fa3 => (gpu.tensor.flops_per_clk.get(s.dtype) * sustained, true),
    };
    let (tensor_step, vector_step) = match s.pass {
        FlashPass::Forward => (4 * g.bm * g.bn * d, g.bm * g.bn * fpe::SOFTMAX + 2 * g.bm * d),
        FlashPass::Backward => (10 * g.bm * g.bn * d, g.bm * g.bn * (fpe::SOFTMAX + fpe::SOFTMAX_GRAD)),
    };
    let tensor_cycles = tensor_step as f64 / tensor_per_clk;
    // One exponential per score element (the softmax's exp2 forward, P's recomputation backward) runs
    // on the special-function units; the rest of the vector work on the FP32 pipes. The two pipes are
    // separate and a warp issues its FP32 instructions while MUFU works, so the slower of them shows.
    let exps_step = g.bm * g.bn;
    let fp32_cycles = (vector_step - exps_step) as f64 / gpu.sm.fp32_flops_per_clk as f64;
    let softmax_cycles = fp32_cycles.max(exps_step as f64 / gpu.sm.mufu_ops_per_clk as f64);
    // Cycles of one CTA's inner block in the steady state, and what a CTA pays once on top.
    // FA2: inside a warp the matmuls and the softmax serialize. Co-resident CTAs do not hide each
    // other's softmax either: the warp scheduler interleaves their warps instruction by instruction, so
    // they run their phases in step (FA3 adds explicit ping-pong barriers precisely to break this,
    // and gains 570 -> 620-640 TFLOP/s by it, FA3 paper sec. 3.1).
    // FA3: two consumer warpgroups ping-pong (one's softmax under the other's matmuls) and each
    // overlaps its softmax with its own previous P.V (intra-warpgroup pipelining), so the slower of
    // tensor cores and softmax shows. Its ramp: a warpgroup's first softmax waits for its first
    // Q.K^T and its last P.V for its last softmax, with only the other warpgroup's quarter of a block
    // of matmuls (T/4) to hide under; each warpgroup's softmax being S/2, two ramps of S/2 - T/4 while
    // the tensor cores bound the steady state, and the first Q.K^T and last P.V (T/4 each) once the
    // exponentials do.
    let (block_cycles, ramp_cycles) = if overlap {
        let ramp = match s.pass {
            FlashPass::Forward => (softmax_cycles - tensor_cycles / 2.0).clamp(0.0, tensor_cycles / 2.0),
            FlashPass::Backward => 0.0,
        };
        (tensor_cycles.max(softmax_cycles), ramp)
    } else {
        (tensor_cycles + softmax_cycles, 0.0)
    };
    let ctas = s.batch * g.heads * g.outer * g.splits;
    let slots = gpu.sm.count as u64 * g.ctas_per_sm;
    let waves = ctas.div_ceil(slots);
    let sampled = waves > MAX_SIM_WAVES;
    let sim_ctas = if sampled { (SAMPLE_WAVES + 1) * slots } else { ctas };
    // Streamed operands per inner step: K and V (forward); Q, dO and the dQ accumulator (backward).
    let operands: &[(u64, u64)] = match s.pass {
        FlashPass::Forward => &[(0xC, e), (0xD, e)],
        FlashPass::Backward => &[(0xE, e), (0xF, e), (0x10, 4)],
    };
    let j = (sim_ctas * g.inner * operands.len() as u64).div_ceil(ACCESS_BUDGET).max(1);
    let inner_rows = match s.pass {
        FlashPass::Forward => g.bn,
        FlashPass::Backward => g.bm,
    };
    let unit = inner_rows * d * 2 * j;
    let mut cache = L2Sim::new(gpu.l2.bytes, gpu.l2.partitions, gpu.l2.ways, unit);
    let parts = cache.partitions();
    let part_bw = gpu.l2.bytes_per_s / parts as f64;
    let (rd, wr) = (gpu.hbm.read_bytes_per_s, gpu.hbm.write_bytes_per_s);
    // Once per CTA: the resident block in, the results out.
    let (pro_bytes, epi_bytes) = match s.pass {
        FlashPass::Forward => {
            let out = if g.splits > 1 { 4 } else { e };
            (g.bm.min(g.rows) * d * e, g.bm.min(g.rows) * (d * out + 4))
        }
        FlashPass::Backward => (2 * g.bn * d * e, 2 * g.bn * d * e),
    };
    let mut shares = Shares::default();
    let mut traffic = Traffic::default();
    let mut exec_flops = 0.0;
    let mut busy = 0.0;
    let mut seconds = 0.0;
    let mut part_bytes = vec![0u64; parts];
    // The block scheduler starts a CTA on an SM slot as soon as the slot's last CTA ends, so CTAs of
    // unequal length (a causal mask's query blocks walk 1 to `inner` key blocks) never wait for the
    // longest of a wave. CTAs `first..first + count` run through the `slots` slots in launch order,
    // in steps of `j` inner blocks; a slot whose CTA ends in a step takes the next CTA at the next.
    // HBM (misses, each CTA's prologue and epilogue) and the SMs run side by side over the stretch.
    let mut run_ctas = |first: u64, count: u64, cache: &mut L2Sim, times: f64| {
        let cta = |c: u64| {
            let sp = c % g.splits;
            let rest = c / g.splits;
            let o = rest % g.outer;
            let bh = rest / g.outer;
            let (lo, hi) = inner_range(s, &g, o, sp);
            (bh / g.heads, bh % g.heads, lo, hi)
        };
        let n_slots = slots.min(count) as usize;
        let mut live: Vec<Option<Live>> = vec![None; n_slots];
        let mut next = first;
        let end = first + count;
        let (mut main, mut read_s, mut pro, mut epi) = (0.0, 0.0, 0u64, 0u64);
        let mut steps = 0u64;
        let mut wave_traffic = Traffic::default();
        let (h0, m0) = (cache.hits, cache.misses);
        loop {
            for slot in live.iter_mut() {
                while slot.is_none() && next < end {
                    let (b, h, lo, hi) = cta(next);
                    next += 1;
                    pro += pro_bytes;
                    if lo < hi {
                        *slot = Some(Live { b, h, at: lo, hi, fresh: true });
                    } else {
                        epi += epi_bytes;
                    }
                }
            }
            if live.iter().all(Option::is_none) {
                break;
            }
            part_bytes.iter_mut().for_each(|b| *b = 0);
            let mut miss = 0u64;
            let mut active = 0u64;
            let mut jj_max = 0u64;
            let mut cta_cycles = 0.0f64;
            for slot in live.iter_mut() {
                let Some(Live { b, h, at, hi, fresh }) = *slot else { continue };
                active += 1;
                let jj = j.min(hi - at);
                jj_max = jj_max.max(jj);
                steps += jj;
                let ramp = if fresh { ramp_cycles } else { 0.0 };
                cta_cycles = cta_cycles.max(jj as f64 * block_cycles + ramp);
                // Forward CTAs of one KV head share K and V; backward CTAs of one head share Q and dO.
                let kh = if s.pass == FlashPass::Forward && !g.packed { h / group } else { h };
                for &(tag, el) in operands {
                    let bytes = inner_rows * d * el * jj;
                    let key = unit_key(tag, b, kh, at / j);
                    let hit = cache.access(key);
                    // The dQ accumulator is read, added to and written back (atomics in L2).
                    let passes = if tag == 0x10 { 2 } else { 1 };
                    part_bytes[cache.partition(key)] += bytes * passes;
                    if !hit {
                        miss += bytes;
                    }
                }
                *slot = if at + jj < hi {
                    Some(Live { b, h, at: at + jj, hi, fresh: false })
                } else {
                    epi += epi_bytes;
                    None
                };
            }
            let loaded: u64 = part_bytes.iter().sum();
            wave_traffic.l2 += loaded;
            wave_traffic.smem += loaded;
            wave_traffic.hbm_read += miss;
            let c_max = active.div_ceil(gpu.sm.count as u64) as f64;
            let compute_s = c_max * cta_cycles / clock;
            let l2_s = part_bytes.iter().copied().max().unwrap_or(0) as f64 / part_bw;
            let hbm_s = miss as f64 / rd;
            read_s += hbm_s;
            let mut best = (compute_s, Resource::Compute);
            for (t, r) in [(l2_s, Resource::L2), (hbm_s, Resource::Hbm)] {
                if t > best.0 {
                    best = (t, r);
                }
            }
            shares.add(best.1, best.0 * times);
            busy += c_max * jj_max as f64 * tensor_cycles / clock * times;
            main += best.0;
        }
        exec_flops += (steps * (tensor_step + vector_step)) as f64 * times;
        wave_traffic.hbm_read += pro;
        wave_traffic.hbm_write += epi;
        wave_traffic.l2 += pro + epi;
        wave_traffic.smem += pro + epi;
        wave_traffic.l2_hits = cache.hits - h0;
        wave_traffic.l2_misses = cache.misses - m0;
        let io_s = read_s + pro as f64 / rd + epi as f64 / wr;
        let stretch = main.max(io_s);
        // One HBM latency per round of CTAs over the slots (each CTA's prologue).
        let lat = count.div_ceil(slots) as f64 * gpu.hbm.latency_cycles as f64 / clock;
        shares.add(Resource::Hbm, (stretch - main) * times);
        shares.add(Resource::Latency, lat * times);
        traffic += wave_traffic.scaled(times as u64);
        seconds += (stretch + lat) * times;
    };
    if sampled {
        run_ctas(0, SAMPLE_WAVES * slots, &mut cache, 1.0);
        // The middle waves repeat the second half of the sampled ones.
        let middle = waves - SAMPLE_WAVES - 1;
        let reps = middle / (SAMPLE_WAVES / 2);
        let half = SAMPLE_WAVES / 2 * slots;
        run_ctas(half, half, &mut cache, reps as f64);
        run_ctas(half, middle % (SAMPLE_WAVES / 2) * slots, &mut cache, 1.0);
        run_ctas((waves - 1) * slots, ctas - (waves - 1) * slots, &mut cache, 1.0);
    } else {
        run_ctas(0, ctas, &mut cache, 1.0);
    }
    if g.splits > 1 {
        // FlashDecoding's combine: read the fp32 partial outputs, write O.
        let partial = s.batch * g.heads * g.outer * g.splits * g.bm.min(g.rows) * (d * 4 + 4);
        let out = s.batch * s.heads * s.q_len * d * e;
        let t = partial as f64 / gpu.l2.bytes_per_s + out as f64 / wr;
        traffic.l2 += partial + out;
        traffic.hbm_write += out;
        shares.add(Resource::L2, t);
        seconds += t;
    }
    let mut config = format!(
        "{} {}, {}x{} blocks, {} CTAs ({}/SM), {} wave{}",
        s.variant.name(),
        match s.pass {
            FlashPass::Forward => "fwd",
            FlashPass::Backward => "bwd",
        },
        g.bm,
        g.bn,
        ctas,
        g.ctas_per_sm,
        waves,
        if waves == 1 { "" } else { "s" }
    );
    if g.splits > 1 {
        config.push_str(&format!(", keys split {} ways", g.splits));
    }
    if s.causal {
        config.push_str(", causal blocks skipped");
    }
    Timing { seconds, shares, traffic, exec_flops, compute_busy_s: busy, config }
}
