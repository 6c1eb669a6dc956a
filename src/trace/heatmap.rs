//! `wafer trace heatmap`: a picture of the wafer for one window (or the whole run), with region outlines
//! and labels, a colour bar with its unit, and the time window in the title; `--all` makes an animated
//! GIF with one frame per window (or per group of windows).
//!
//! Pictures are indexed-colour images drawn here pixel by pixel with a public-domain 8x8 bitmap font
//! (`font8x8`), so they need no system fonts and come out byte-identical everywhere.

use std::borrow::Cow;

use super::{Trace, TraceError, View};
use crate::engine::record::METRICS;

/// Palette indices.
const BG: u8 = 0;
const INK: u8 = 1;
const OUTLINE: u8 = 2;
const IDLE: u8 = 3;
const LABEL_BG: u8 = 4;
/// The colour ramp occupies indices RAMP0..=255.
const RAMP0: u8 = 16;
const RAMP_STEPS: u32 = 255 - RAMP0 as u32;

/// Viridis, sampled at ten points (matplotlib's perceptually uniform map, CC0).
const VIRIDIS: [[u8; 3]; 10] = [
    [0x44, 0x01, 0x54],
    [0x48, 0x28, 0x78],
    [0x3E, 0x4A, 0x89],
    [0x31, 0x68, 0x8E],
    [0x26, 0x82, 0x8E],
    [0x1F, 0x9E, 0x89],
    [0x35, 0xB7, 0x79],
    [0x6D, 0xCD, 0x59],
    [0xB4, 0xDE, 0x2C],
    [0xFD, 0xE7, 0x25],
];

/// The longest side of the map, in pixels, that a mesh is scaled up (small meshes) or averaged down
/// (large ones) to.
pub const TARGET_MAP_PX: u32 = 800;
/// At most this many frames in an animation: windows are grouped beyond it.
pub const MAX_FRAMES: usize = 120;
/// Delay between animation frames, in hundredths of a second.
pub const FRAME_DELAY_CS: u16 = 25;

const MARGIN: u32 = 8;
const LINE: u32 = 10;
const BAR_W: u32 = 16;

/// The 256-colour palette as RGB triplets.
pub fn palette() -> Vec<u8> {
    let mut p = vec![0u8; 256 * 3];
    let mut set = |i: u8, c: [u8; 3]| p[i as usize * 3..i as usize * 3 + 3].copy_from_slice(&c);
    set(BG, [255, 255, 255]);
    set(INK, [0, 0, 0]);
    set(OUTLINE, [230, 30, 60]);
    set(IDLE, [215, 215, 215]);
    set(LABEL_BG, [255, 255, 255]);
    for i in 0..=RAMP_STEPS {
        let x = i as f64 / RAMP_STEPS as f64 * (VIRIDIS.len() - 1) as f64;
        let k = (x as usize).min(VIRIDIS.len() - 2);
        let t = x - k as f64;
        let mut c = [0u8; 3];
        for (j, v) in c.iter_mut().enumerate() {
            *v = (VIRIDIS[k][j] as f64 * (1.0 - t) + VIRIDIS[k + 1][j] as f64 * t).round() as u8;
        }
        set(RAMP0 + i as u8, c);
    }
    p
}

/// The palette index of a value in [0, 1]: exactly 0 is grey (did nothing), anything else on the ramp.
pub fn colour(v: f64) -> u8 {
    if v <= 0.0 {
        IDLE
    } else {
        RAMP0 + (v.min(1.0) * RAMP_STEPS as f64).round() as u8
    }
}

/// An indexed-colour picture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Picture {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl Picture {
    fn new(width: u32, height: u32) -> Picture {
        Picture { width, height, pixels: vec![BG; width as usize * height as usize] }
    }
    fn put(&mut self, x: u32, y: u32, c: u8) {
        if x < self.width && y < self.height {
            self.pixels[(y * self.width + x) as usize] = c;
        }
    }
    fn fill(&mut self, x: u32, y: u32, w: u32, h: u32, c: u8) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.put(xx, yy, c);
            }
        }
    }
    fn outline(&mut self, x: u32, y: u32, w: u32, h: u32, c: u8) {
        if w == 0 || h == 0 {
            return;
        }
        self.fill(x, y, w, 1, c);
        self.fill(x, y + h - 1, w, 1, c);
        self.fill(x, y, 1, h, c);
        self.fill(x + w - 1, y, 1, h, c);
    }
    /// Draws ASCII text (other characters as `?`) with its top-left at (x, y); returns its width.
    fn text(&mut self, x: u32, y: u32, s: &str, c: u8) -> u32 {
        for (i, ch) in s.chars().enumerate() {
            let code = if ch.is_ascii() && !ch.is_ascii_control() { ch as usize } else { '?' as usize };
            let glyph = font8x8::legacy::BASIC_LEGACY[code];
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.put(x + 8 * i as u32 + col, y + row as u32, c);
                    }
                }
            }
        }
        8 * s.chars().count() as u32
    }
}

fn text_width(s: &str) -> u32 {
    8 * s.chars().count() as u32
}

/// How the mesh maps to pixels: `cell` pixels per PE side, or `block` PEs per pixel side.
#[derive(Clone, Copy, Debug)]
struct Scale {
    cell: u32,
    block: u32,
}

impl Scale {
    fn for_mesh(w: u32, h: u32) -> Scale {
        let long = w.max(h).max(1);
        if long <= TARGET_MAP_PX {
            Scale { cell: (TARGET_MAP_PX / long).clamp(1, 24), block: 1 }
        } else {
            Scale { cell: 1, block: long.div_ceil(TARGET_MAP_PX) }
        }
    }
    /// Pixels for `n` PEs.
    fn px(&self, n: u32) -> u32 {
        n.div_ceil(self.block) * self.cell
    }
    /// Pixel offset of PE coordinate `i`.
    fn at(&self, i: u32) -> u32 {
        i / self.block * self.cell
    }
}

/// Per-PE values of `view` over windows `first..=last` (weighted by window length), in mesh order.
pub fn values(t: &Trace, view: View, first: usize, last: usize) -> Vec<f64> {
    let mut acc = vec![[0u64; METRICS]; t.pes()];
    let mut total = 0u64;
    for w in first..=last {
        let (_, len) = t.window_span(w);
        total += len;
        for (pe, q) in t.frames[w].iter() {
            for (a, b) in acc[pe].iter_mut().zip(q) {
                *a += *b as u64 * len;
            }
        }
    }
    acc.iter()
        .enumerate()
        .map(|(pe, a)| {
            let mut f = [0.0; METRICS];
            for (x, y) in f.iter_mut().zip(a) {
                *x = *y as f64 / (255.0 * total.max(1) as f64);
            }
            view.of_fractions(&f, t.pe_sram(pe))
        })
        .collect()
}

/// Draws the heatmap of windows `first..=last` of `t`, colours from 0 to 100%.
pub fn render(t: &Trace, view: View, first: usize, last: usize) -> Picture {
    render_scaled(t, view, first, last, false)
}

/// The full scale of an automatic colour bar: the smallest of 0.1%, 0.2%, 0.5%, 1%, ..., 50%, 100% at or
/// above the largest value (so a mostly idle wafer still shows where it worked).
pub fn auto_full_scale(max: f64) -> f64 {
    [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0].into_iter().find(|&s| max <= s).unwrap_or(1.0)
}

/// Draws the heatmap of windows `first..=last` of `t`; with `auto`, the colour bar ends at the
/// `auto_full_scale` of the 95th percentile of active pixels instead of 100% (brighter pixels clip).
pub fn render_scaled(t: &Trace, view: View, first: usize, last: usize, auto: bool) -> Picture {
    let sc = Scale::for_mesh(t.width, t.height);
    let (map_w, map_h) = (sc.px(t.width), sc.px(t.height));
    let h = &t.header;
    let title =
        format!("{}: {} on {} ({} x {} PEs), {}", view.name(), h.model, h.hardware, t.width, t.height, h.fidelity);
    let (start, _) = t.window_span(first);
    let (ls, ll) = t.window_span(last);
    let when = if first == 0 && last + 1 == t.windows as usize && t.windows > 1 {
        format!("whole run: cycles 0..{} ({} windows)", ls + ll, t.windows)
    } else if first == last {
        format!("window {} of {} (0-based): cycles {}..{}", first, t.windows, start, ls + ll)
    } else {
        format!("windows {}-{} of {}: cycles {}..{}", first, last, t.windows, start, ls + ll)
    };
    // The map: each pixel block averages the PEs it covers.
    let vals = values(t, view, first, last);
    let (bw, bh) = (t.width.div_ceil(sc.block), t.height.div_ceil(sc.block));
    let mut sum = vec![0.0f64; (bw * bh) as usize];
    let mut n = vec![0u32; (bw * bh) as usize];
    for (pe, v) in vals.iter().enumerate() {
        let c = t.coord(pe);
        let b = ((c.y / sc.block) * bw + c.x / sc.block) as usize;
        sum[b] += v;
        n[b] += 1;
    }
    let block = |b: usize| if n[b] == 0 { 0.0 } else { sum[b] / n[b] as f64 };
    let full = if auto {
        // The 95th percentile of the pixels that saw any activity: a few hot pixels do not wash the
        // rest out (they are drawn at the top colour).
        let mut v: Vec<f64> = (0..sum.len()).map(block).filter(|&x| x > 0.0).collect();
        v.sort_by(f64::total_cmp);
        auto_full_scale(v.get((v.len() * 95 / 100).min(v.len().saturating_sub(1))).copied().unwrap_or(1.0))
    } else {
        1.0
    };
    let legend = if full < 1.0 {
        format!("colour: {} (grey = none; auto scale to {}%, above it clipped)", view.unit(), full * 100.0)
    } else {
        format!("colour: {} (grey = none)", view.unit())
    };
    let tick = |f: f64| {
        let v = format!("{:.3}", f * full * 100.0);
        format!("{}%", v.trim_end_matches('0').trim_end_matches('.'))
    };
    let ticks: Vec<String> = [1.0, 0.75, 0.5, 0.25, 0.0].into_iter().map(tick).collect();
    let bar_h = map_h.max(5 * LINE);
    let width = (2 * MARGIN + map_w + 12 + BAR_W + 4 + ticks.iter().map(|t| text_width(t)).max().unwrap_or(0))
        .max(2 * MARGIN + text_width(&title).max(text_width(&when)).max(text_width(&legend)));
    let top = MARGIN + 2 * LINE + 4;
    let height = top + bar_h + 6 + LINE + MARGIN;
    let mut pic = Picture::new(width, height);
    pic.text(MARGIN, MARGIN, &title, INK);
    pic.text(MARGIN, MARGIN + LINE, &when, INK);

    for by in 0..bh {
        for bx in 0..bw {
            let b = (by * bw + bx) as usize;
            let v = (block(b) / full).min(1.0);
            pic.fill(MARGIN + bx * sc.cell, top + by * sc.cell, sc.cell, sc.cell, colour(v));
        }
    }
    // Region outlines, then labels where they fit.
    for r in &t.regions {
        let rc = r.rect;
        pic.outline(MARGIN + sc.at(rc.x), top + sc.at(rc.y), sc.px(rc.w).max(1), sc.px(rc.h).max(1), OUTLINE);
    }
    for r in &t.regions {
        let rc = r.rect;
        let (w_px, h_px) = (sc.px(rc.w), sc.px(rc.h));
        if w_px < 8 + 4 || h_px < LINE + 2 {
            continue;
        }
        let chars = ((w_px - 4) / 8) as usize;
        let label: String = r.name.chars().take(chars).collect();
        let (x, y) = (MARGIN + sc.at(rc.x) + 2, top + sc.at(rc.y) + 2);
        pic.fill(x - 1, y - 1, text_width(&label) + 2, LINE, LABEL_BG);
        pic.text(x, y, &label, INK);
    }
    // The colour bar with ticks.
    let bx = MARGIN + map_w + 12;
    for y in 0..bar_h {
        let v = 1.0 - y as f64 / (bar_h - 1).max(1) as f64;
        pic.fill(bx, top + y, BAR_W, 1, colour(v.max(1e-9)));
    }
    pic.outline(bx, top, BAR_W, bar_h, INK);
    for (i, tick) in ticks.iter().enumerate() {
        let y = top + (bar_h - 1) * i as u32 / 4;
        pic.fill(bx + BAR_W, y, 3, 1, INK);
        pic.text(bx + BAR_W + 4, y.saturating_sub(3).min(top + bar_h - 8), tick, INK);
    }
    pic.text(MARGIN, top + bar_h + 6, &legend, INK);
    pic
}

/// Encodes a picture as an indexed-colour PNG.
pub fn png_bytes(pic: &Picture) -> Result<Vec<u8>, TraceError> {
    let mut out = Vec::new();
    let fail = |e: png::EncodingError| TraceError::Encode(format!("the PNG: {e}"));
    {
        let mut enc = png::Encoder::new(&mut out, pic.width, pic.height);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(palette());
        let mut w = enc.write_header().map_err(fail)?;
        w.write_image_data(&pic.pixels).map_err(fail)?;
        w.finish().map_err(fail)?;
    }
    Ok(out)
}

/// Window groups for an animation: every window, or consecutive groups when there are more than
/// `MAX_FRAMES`.
pub fn frame_groups(windows: usize) -> Vec<(usize, usize)> {
    super::timeline::columns(windows, MAX_FRAMES)
}

/// An animated GIF with one frame per window group, looping.
pub fn gif_bytes(t: &Trace, view: View) -> Result<Vec<u8>, TraceError> {
    let fail = |e: gif::EncodingError| TraceError::Encode(format!("the GIF: {e}"));
    let groups = frame_groups(t.windows as usize);
    let pics: Vec<Picture> = groups.iter().map(|&(a, b)| render(t, view, a, b)).collect();
    let (w, h) = (pics.iter().map(|p| p.width).max().unwrap_or(1), pics.iter().map(|p| p.height).max().unwrap_or(1));
    if w > u16::MAX as u32 || h > u16::MAX as u32 {
        return Err(TraceError::Query(format!("a {w} x {h} picture is too large for a GIF")));
    }
    let mut out = Vec::new();
    {
        let mut enc = gif::Encoder::new(&mut out, w as u16, h as u16, &palette()).map_err(fail)?;
        enc.set_repeat(gif::Repeat::Infinite).map_err(fail)?;
        for p in &pics {
            // Pictures differ in width only through their title; pad them to the largest.
            let mut buf = vec![BG; (w * h) as usize];
            for y in 0..p.height {
                let row = &p.pixels[(y * p.width) as usize..((y + 1) * p.width) as usize];
                buf[(y * w) as usize..(y * w + p.width) as usize].copy_from_slice(row);
            }
            let frame = gif::Frame {
                width: w as u16,
                height: h as u16,
                delay: FRAME_DELAY_CS,
                buffer: Cow::Owned(buf),
                ..gif::Frame::default()
            };
            enc.write_frame(&frame).map_err(fail)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::auto_full_scale;

    #[test]
    fn auto_scale_rounds_up_to_a_nice_full_scale() {
        assert_eq!(auto_full_scale(0.0), 0.001);
        assert_eq!(auto_full_scale(0.0007), 0.001);
        assert_eq!(auto_full_scale(0.0011), 0.002);
        assert_eq!(auto_full_scale(0.3), 0.5);
        assert_eq!(auto_full_scale(0.5), 0.5);
        assert_eq!(auto_full_scale(0.51), 1.0);
        assert_eq!(auto_full_scale(1.0), 1.0);
    }
}
