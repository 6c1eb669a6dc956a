//! Placement: one rectangle per stage.
//!
//! The mesh is cut into B bands of equal height; stages fill the bands in pipeline order, left to
//! right in even bands and right to left in odd ones (a snake, so a stream from the end of one band
//! to the start of the next is short). Every stage spans its band's height; its width is the larger
//! of the narrowest width its tiles fit (SRAM, frame; for row reductions and lookups, also the width at
//! which their work keeps pace with their streams, `kernel::pace_width`) and its share of a target
//! area in proportion to its FLOPs. The target is the largest that still packs.
//!
//! B is the band count with the smallest estimated time of the layer pipeline (`pipeline_estimate`):
//! the sum of the regions' diameters (every token crosses every region: multicasts, reductions down
//! the columns and gathers along the output row each span a region's width or height) plus the
//! compute of the busiest region (the pipeline's bottleneck, which every token passes through). This
//! is the closed form of MACHINE-MODEL.md §2 (a region is latency-bound by its diameter before it is
//! compute-bound) over the whole pipeline. The largest area alone would pick a few tall bands: regions
//! of ~300 rows whose reductions and multicasts span them, so a batch-1 token pays thousands of cycles
//! per region while most of each region's PEs have almost nothing to do; large batches or long
//! sequences make the compute term dominate and still pick the largest area.
//! All integer arithmetic: the same inputs always give the same rectangles.

use crate::mesh::{MeshDims, Rect};

use super::kernel::{self, KCtx, Misfit, StageIo, Tiling};
use super::stage::{Stage, Work};
use super::CompileError;

#[derive(Clone, Debug)]
pub(crate) struct Placement {
    pub rects: Vec<Rect>,
    pub tilings: Vec<Tiling>,
    pub bands: u32,
}

/// Most bands tried (bands shorter than the frame's three rows are never tried).
const MAX_BANDS: u32 = 24;

/// The narrowest width (<= `max_w`) at which the stage fits a band of height `h`, or the misfit at
/// `max_w`.
fn min_width(st: &Stage, io: &StageIo, h: u32, max_w: u32, k: &KCtx) -> Result<(u32, Tiling), Misfit> {
    let full = kernel::tile(st, io, max_w, h, k)?;
    let (mut lo, mut hi) = (1u32, max_w);
    let mut best = (max_w, full);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match kernel::tile(st, io, mid, h, k) {
            Ok(t) => {
                best = (mid, t);
                hi = mid;
            }
            Err(_) => lo = mid + 1,
        }
    }
    if lo < best.0 {
        if let Ok(t) = kernel::tile(st, io, lo, h, k) {
            best = (lo, t);
        }
    }
    Ok(best)
}

/// Widths for a target total area `a` (PE count shared in proportion to work), or None if they do not
/// pack into `bands` bands of `w` columns.
fn pack(mins: &[u32], work: &[u128], total: u128, a: u128, h: u32, w: u32, bands: u32) -> Option<Vec<(u32, u32)>> {
    let mut out = Vec::with_capacity(mins.len());
    let (mut band, mut x) = (0u32, 0u32);
    for (i, &m) in mins.iter().enumerate() {
        let share = (a * work[i]).div_ceil(total.max(1) * h as u128);
        let wi = (m as u128).max(share).min(w as u128 + 1) as u32;
        if wi > w {
            return None;
        }
        if x + wi > w {
            band += 1;
            x = 0;
        }
        if band >= bands {
            return None;
        }
        out.push((band, x));
        x += wi;
    }
    Some(out)
}

/// A stage's width: its share of the target area `a` on bands of height `h`, at least its minimum.
fn width(min: u32, work: u128, total: u128, a: u128, h: u32, w_all: u32) -> u32 {
    let share = (a * work).div_ceil(total.max(1) * h as u128);
    (min as u128).max(share).min(w_all as u128) as u32
}

/// Places the stages on `mesh`. Single ops take the whole mesh (Cannon a square).
/// The rows of `bands` bands: equal heights, or, when `align` lists the IO channels' rows, bottoms moved
/// to the nearest channel row (a region's output row is then a channel row: its streams to the IO ports
/// go straight along it). Returns (first row, height) per band.
fn band_rows(h_all: u32, bands: u32, align: &[u32]) -> Vec<(u32, u32)> {
    let h = h_all / bands;
    let equal: Vec<(u32, u32)> = (0..bands).map(|b| (b * h, h)).collect();
    if align.is_empty() {
        return equal;
    }
    let mut out = Vec::new();
    let mut start = 0u32;
    for b in 0..bands {
        let target = (b + 1) * h - 1;
        let bottom = align
            .iter()
            .copied()
            .filter(|&y| y + 1 >= start + 3)
            .min_by_key(|&y| ((y as i64 - target as i64).abs(), y));
        let Some(bottom) = bottom else { return equal };
        // Keep the bands within a quarter of the equal height of each other, and the last one near the end.
        if bottom + 1 < start + 3 || (bottom as i64 - target as i64).unsigned_abs() > (h / 4) as u64 {
            return equal;
        }
        out.push((start, bottom + 1 - start));
        start = bottom + 1;
    }
    out
}

/// A candidate packing: (estimate, area, bands, minimum widths, (band, x) of every stage).
type Packing = (u128, u128, u32, Vec<u32>, Vec<(u32, u32)>);

/// Estimated cycles of one pass through the layer pipeline with widths `widths` on bands of height
/// `h`: every region's diameter (width + height hops) plus the largest region's FMAC time (its FLOPs
/// over its PEs at the FMAC rate).
fn pipeline_estimate(stages: &[Stage], widths: &[u32], h: u32, k: &KCtx) -> u128 {
    let mut diam = 0u128;
    let mut slowest = 0u128;
    for (st, &w) in stages.iter().zip(widths) {
        diam += k.hop_cycles as u128 * (w as u128 + h as u128);
        let (elems, per) = k.pe.rate(kernel::fmac(st.dtype_bytes));
        let pes = (w as u128 * h as u128).max(1);
        let cycles = (st.flops() as u128 / 2 * per as u128).div_ceil(elems.max(1) as u128 * pes);
        slowest = slowest.max(cycles);
    }
    diam + slowest
}

pub(crate) fn place(
    stages: &[Stage],
    ios: &[StageIo],
    mesh: MeshDims,
    k: &KCtx,
    align: &[u32],
) -> Result<Placement, CompileError> {
    let (w_all, h_all) = (mesh.width, mesh.height);
    if stages.len() == 1 && is_single(&stages[0]) {
        let st = &stages[0];
        let (w, h) = match st.work {
            Work::SingleGemm { .. } => {
                let q = w_all.min(h_all);
                (q, q)
            }
            _ => (w_all, h_all),
        };
        let t = kernel::tile(st, &ios[0], w, h, k).map_err(|m| misfit_error(st, &m, k, mesh))?;
        return Ok(Placement { rects: vec![Rect { x: 0, y: 0, w, h }], tilings: vec![t], bands: 1 });
    }
    let work: Vec<u128> = stages.iter().map(|s| s.flops().max(1) as u128).collect();
    let total: u128 = work.iter().sum();
    let mut best: Option<Packing> = None;
    let mut worst: Option<(usize, Misfit)> = None;
    for bands in 1..=MAX_BANDS.min(h_all / 3).max(1) {
        let rows = band_rows(h_all, bands, align);
        let h = rows.iter().map(|r| r.1).min().unwrap_or(0);
        if h < 1 {
            break;
        }
        // Narrowest fitting width of every stage at this height.
        let mut mins = Vec::with_capacity(stages.len());
        let mut ok = true;
        for (i, st) in stages.iter().enumerate() {
            match min_width(st, &ios[i], h, w_all, k) {
                Ok((wm, _)) => {
                    // Wider where the stage's compute would fall behind its input stream.
                    let pace = kernel::pace_width(st, &ios[i], h, k).min(w_all);
                    let fits = pace > wm && kernel::tile(st, &ios[i], pace, h, k).is_ok();
                    mins.push(if fits { pace } else { wm });
                }
                Err(m) => {
                    if bands == 1 && worst.as_ref().is_none_or(|(_, wm)| wm.needed < m.needed || m.frame) {
                        worst = Some((i, m));
                    }
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            continue;
        }
        // The largest target area that packs.
        let cap = bands as u128 * w_all as u128 * h as u128;
        if pack(&mins, &work, total, 0, h, w_all, bands).is_none() {
            continue;
        }
        let (mut lo, mut hi) = (0u128, cap);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if pack(&mins, &work, total, mid, h, w_all, bands).is_some() {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let spots = pack(&mins, &work, total, lo, h, w_all, bands).unwrap_or_default();
        let widths: Vec<u32> = (0..stages.len()).map(|i| width(mins[i], work[i], total, lo, h, w_all)).collect();
        let est = pipeline_estimate(stages, &widths, h, k);
        if best.as_ref().is_none_or(|b| est < b.0 || (est == b.0 && lo > b.1)) {
            best = Some((est, lo, bands, mins, spots));
        }
    }
    let Some((_, a, bands, mins, spots)) = best else {
        return Err(match worst {
            Some((i, m)) => misfit_error(&stages[i], &m, k, mesh),
            None => too_big(stages, ios, mesh, k),
        });
    };
    let rows = band_rows(h_all, bands, align);
    let h = rows.iter().map(|r| r.1).min().unwrap_or(1);
    let mut rects = Vec::with_capacity(stages.len());
    let mut tilings = Vec::with_capacity(stages.len());
    for (i, st) in stages.iter().enumerate() {
        let wi = width(mins[i], work[i], total, a, h, w_all);
        let (band, x) = spots[i];
        // Snake: odd bands run right to left.
        let x = if band % 2 == 0 { x } else { w_all - x - wi };
        let (y, hb) = rows[band as usize];
        let rect = Rect { x, y, w: wi, h: hb };
        let t = kernel::tile(st, &ios[i], wi, hb, k).map_err(|m| misfit_error(st, &m, k, mesh))?;
        rects.push(rect);
        tilings.push(t);
    }
    Ok(Placement { rects, tilings, bands })
}

fn is_single(st: &Stage) -> bool {
    matches!(
        st.work,
        Work::SingleGemm { .. } | Work::SingleGemv { .. } | Work::SingleAdd { .. } | Work::AllReduce { .. }
    )
}

pub(crate) const HINT: &str = "use --mode weight-streaming, more wafers (--wafers K, inference), a larger --mesh, \
                    or a smaller batch or sequence";

/// The error for a stage that fits nowhere.
pub(crate) fn misfit_error(st: &Stage, m: &Misfit, k: &KCtx, mesh: MeshDims) -> CompileError {
    if m.frame {
        return CompileError::MeshTooSmall {
            what: format!("op `{}` needs {}, the mesh is {} x {}", st.name, m.class, mesh.width, mesh.height),
            hint: "use a larger --mesh".into(),
        };
    }
    if m.colors > 0 {
        return op_colors(st, m, k);
    }
    CompileError::Sram {
        op: st.name.clone(),
        class: m.class.clone(),
        needed: m.needed,
        available: k.avail,
        sram: k.pe.sram_bytes,
        reserve: k.pe.code_reserve_bytes,
        hint: HINT.into(),
    }
}

/// An op whose algorithms all need more colors at a router than the router has.
fn op_colors(st: &Stage, m: &Misfit, k: &KCtx) -> CompileError {
    CompileError::OpColors { op: st.name.clone(), class: m.class.clone(), needed: m.colors, limit: k.colors }
}

/// Every stage fits alone, but not all together: name the stage that overflows at its fair share.
fn too_big(stages: &[Stage], ios: &[StageIo], mesh: MeshDims, k: &KCtx) -> CompileError {
    let h = mesh.height;
    let mins: Vec<u64> = stages
        .iter()
        .enumerate()
        .map(|(i, st)| min_width(st, &ios[i], h, mesh.width, k).map_or(mesh.width, |x| x.0) as u64)
        .collect();
    let need: u64 = mins.iter().sum();
    // The largest stage, squeezed to its share of the mesh's columns.
    let (i, _) = mins.iter().enumerate().max_by_key(|(_, &m)| m).unwrap_or((0, &0));
    let fair = ((mesh.width as u64 * mins[i]) / need.max(1)).max(1) as u32;
    match kernel::tile(&stages[i], &ios[i], fair, h, k) {
        Err(m) if m.colors > 0 => op_colors(&stages[i], &m, k),
        Err(m) if !m.frame => CompileError::Sram {
            op: stages[i].name.clone(),
            class: format!("{} at its share of the mesh ({fair} x {h} PEs)", m.class),
            needed: m.needed,
            available: k.avail,
            sram: k.pe.sram_bytes,
            reserve: k.pe.code_reserve_bytes,
            hint: format!(
                "all stages together need at least {need} columns of {h} PEs, the mesh has {}; {HINT}",
                mesh.width
            ),
        },
        _ => CompileError::MeshTooSmall {
            what: format!(
                "the {} stages need at least {need} columns of {h} PEs together, the mesh has {}",
                stages.len(),
                mesh.width
            ),
            hint: HINT.into(),
        },
    }
}
