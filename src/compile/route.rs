//! Routing: walking a route's pattern over routers, and giving every stream between regions and IO
//! ports a color.
//!
//! At every router a color carries one rule, rx set -> tx set (every wavelet entering on any port of
//! rx leaves on every port of tx), as hardware routes are per color. Two flows may share a color where
//! they meet only if they leave the router the same way (merging trains), and never when both deliver
//! to the same PE (it could not tell them apart) or start at the same PE. Regions use the low colors
//! internally (their algorithms' own patterns, consistent by construction and checked by the verifier);
//! streams between regions take the highest color that is free along their whole path.

use crate::mesh::{ColorId, Coord, Dir, MeshDims, Pattern, PortId};

use super::CompileError;

/// Router ports as bits.
pub(crate) const N: u8 = 1;
pub(crate) const E: u8 = 2;
pub(crate) const S: u8 = 4;
pub(crate) const W: u8 = 8;
pub(crate) const R: u8 = 16;

pub(crate) fn bit(d: Dir) -> u8 {
    match d {
        Dir::North => N,
        Dir::East => E,
        Dir::South => S,
        Dir::West => W,
    }
}

fn opposite(d: Dir) -> Dir {
    match d {
        Dir::North => Dir::South,
        Dir::South => Dir::North,
        Dir::East => Dir::West,
        Dir::West => Dir::East,
    }
}

/// One router a train passes: the port it enters on and the ports it leaves by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hop {
    pub at: Coord,
    pub rx: u8,
    pub tx: u8,
}

fn step(c: Coord, d: Dir, mesh: MeshDims) -> Result<Coord, String> {
    let (dx, dy) = d.delta();
    let x = c.x as i64 + dx as i64;
    let y = c.y as i64 + dy as i64;
    if x < 0 || y < 0 || x >= mesh.width as i64 || y >= mesh.height as i64 {
        return Err(format!("leaves the mesh at ({x}, {y})"));
    }
    Ok(Coord { x: x as u32, y: y as u32 })
}

/// Walks `pattern` from `start` (entering on `rx0`: R for a PE, the edge side for a port), appending
/// every router it passes; `port_at` gives a port's router and side.
pub(crate) fn walk(
    pattern: Pattern,
    start: Coord,
    rx0: u8,
    mesh: MeshDims,
    port_at: &dyn Fn(PortId) -> Option<(Coord, Dir)>,
    out: &mut Vec<Hop>,
) -> Result<(), String> {
    let moves = |dx: i64, dy: i64| -> Vec<Dir> {
        let mut m = Vec::new();
        let hx = if dx > 0 { Dir::East } else { Dir::West };
        let hy = if dy > 0 { Dir::South } else { Dir::North };
        m.extend(std::iter::repeat_n(hx, dx.unsigned_abs() as usize));
        m.extend(std::iter::repeat_n(hy, dy.unsigned_abs() as usize));
        m
    };
    let travel = |mv: &[Dir], last_tx: u8, out: &mut Vec<Hop>| -> Result<(), String> {
        let (mut c, mut rx) = (start, rx0);
        for &d in mv {
            out.push(Hop { at: c, rx, tx: bit(d) });
            c = step(c, d, mesh)?;
            rx = bit(opposite(d));
        }
        out.push(Hop { at: c, rx, tx: last_tx });
        Ok(())
    };
    match pattern {
        Pattern::Local => out.push(Hop { at: start, rx: rx0, tx: R }),
        Pattern::Line { dir, hops, multicast } => {
            let (mut c, mut rx) = (start, rx0);
            for i in 0..hops {
                let tx = bit(dir) | if multicast && i > 0 { R } else { 0 };
                out.push(Hop { at: c, rx, tx });
                c = step(c, dir, mesh)?;
                rx = bit(opposite(dir));
            }
            out.push(Hop { at: c, rx, tx: R });
        }
        Pattern::To { dx, dy } => travel(&moves(dx as i64, dy as i64), R, out)?,
        Pattern::ToPort { port } => {
            let (at, side) = port_at(port).ok_or_else(|| format!("no port {}", port.0))?;
            let dx = at.x as i64 - start.x as i64;
            let dy = at.y as i64 - start.y as i64;
            travel(&moves(dx, dy), bit(side), out)?;
        }
        Pattern::Rect { dx, dy, w, h } => {
            let x0 = start.x as i64 + dx as i64;
            let y0 = start.y as i64 + dy as i64;
            let (x1, y1) = (x0 + w as i64, y0 + h as i64);
            if w == 0 || h == 0 || x0 < 0 || y0 < 0 || x1 > mesh.width as i64 || y1 > mesh.height as i64 {
                return Err(format!("rectangle {w} x {h} at ({x0}, {y0}) is not inside the mesh"));
            }
            let (sx, sy) = (start.x as i64, start.y as i64);
            let (entry, row, rx_e) = if sy >= y0 && sy < y1 {
                // Beside the rectangle (or inside): along the sender's row.
                let e = sx.clamp(x0, x1 - 1);
                let mv = moves(e - sx, 0);
                let mut c = start;
                let mut rx = rx0;
                for &d in &mv {
                    out.push(Hop { at: c, rx, tx: bit(d) });
                    c = step(c, d, mesh)?;
                    rx = bit(opposite(d));
                }
                (e, sy, rx)
            } else if sx >= x0 && sx < x1 {
                // Above or below: straight to the nearer edge row.
                let r = if sy < y0 { y0 } else { y1 - 1 };
                let mv = moves(0, r - sy);
                let mut c = start;
                let mut rx = rx0;
                for &d in &mv {
                    out.push(Hop { at: c, rx, tx: bit(d) });
                    c = step(c, d, mesh)?;
                    rx = bit(opposite(d));
                }
                (sx, r, rx)
            } else {
                return Err("a rectangle multicast from a sender neither beside nor above or below it".into());
            };
            for x in x0..x1 {
                let mut tx = R;
                if x >= entry && x < x1 - 1 {
                    tx |= E;
                }
                if x <= entry && x > x0 {
                    tx |= W;
                }
                if row > y0 {
                    tx |= N;
                }
                if row < y1 - 1 {
                    tx |= S;
                }
                let rx = if x == entry {
                    rx_e
                } else if x > entry {
                    W
                } else {
                    E
                };
                let at = Coord { x: x as u32, y: row as u32 };
                out.push(Hop { at, rx, tx });
                for y in (y0..row).rev() {
                    let tx = R | if y > y0 { N } else { 0 };
                    out.push(Hop { at: Coord { x: x as u32, y: y as u32 }, rx: S, tx });
                }
                for y in row + 1..y1 {
                    let tx = R | if y < y1 - 1 { S } else { 0 };
                    out.push(Hop { at: Coord { x: x as u32, y: y as u32 }, rx: N, tx });
                }
            }
        }
    }
    Ok(())
}

/// The external colors in use at every router, for assigning streams their colors.
pub(crate) struct ColorBook {
    mesh: MeshDims,
    limit: u32,
    /// Region (index + 1) at each router, 0 for none.
    region_at: Vec<u32>,
    /// Internal colors of each region and where each is used (bounding boxes).
    internal: Vec<Vec<(u32, crate::mesh::Rect)>>,
    /// Per color, lazily: per router, rx | tx << 5 (0: unused).
    rules: Vec<Option<Vec<u16>>>,
    ext_count: Vec<u8>,
}

impl ColorBook {
    pub fn new(
        mesh: MeshDims,
        limit: u32,
        regions: &[(crate::mesh::Rect, Vec<(u32, crate::mesh::Rect)>)],
    ) -> ColorBook {
        let mut region_at = vec![0u32; mesh.pes() as usize];
        let mut internal = Vec::new();
        for (i, (r, cols)) in regions.iter().enumerate() {
            internal.push(cols.clone());
            for y in r.y..r.y + r.h {
                for x in r.x..r.x + r.w {
                    region_at[(y * mesh.width + x) as usize] = i as u32 + 1;
                }
            }
        }
        ColorBook {
            mesh,
            limit,
            region_at,
            internal,
            rules: (0..limit).map(|_| None).collect(),
            ext_count: vec![0; mesh.pes() as usize],
        }
    }

    fn idx(&self, c: Coord) -> usize {
        (c.y * self.mesh.width + c.x) as usize
    }

    /// Internal colors in use at router i, as a bit set.
    fn internal_at(&self, i: usize) -> u64 {
        let (x, y) = (i as u32 % self.mesh.width, i as u32 / self.mesh.width);
        match self.region_at[i] {
            0 => 0,
            r => self.internal[r as usize - 1]
                .iter()
                .filter(|(_, b)| x >= b.x && x < b.x + b.w && y >= b.y && y < b.y + b.h)
                .fold(0u64, |m, (c, _)| m | (1u64 << c.min(&63))),
        }
    }

    fn used_at(&self, i: usize) -> u32 {
        self.internal_at(i).count_ones() + self.ext_count[i] as u32
    }

    /// The router ports of `c` that lead off the mesh (where IO ports attach).
    fn off_mesh(&self, c: Coord) -> u8 {
        let mut b = 0;
        if c.x == 0 {
            b |= W;
        }
        if c.x + 1 == self.mesh.width {
            b |= E;
        }
        if c.y == 0 {
            b |= N;
        }
        if c.y + 1 == self.mesh.height {
            b |= S;
        }
        b
    }

    /// True when a hop's train leaves the mesh (into a port): a delivery like the ramp's.
    fn exits(&self, h: &Hop) -> bool {
        (h.tx & W != 0 && h.at.x == 0)
            || (h.tx & E != 0 && h.at.x + 1 == self.mesh.width)
            || (h.tx & N != 0 && h.at.y == 0)
            || (h.tx & S != 0 && h.at.y + 1 == self.mesh.height)
    }

    fn fits(&self, color: u32, path: &[Hop]) -> bool {
        for h in path {
            let i = self.idx(h.at);
            if self.internal_at(i) & (1u64 << color.min(63)) != 0 {
                return false;
            }
            let rule = self.rules[color as usize].as_ref().map_or(0, |v| v[i]);
            if rule == 0 {
                if self.used_at(i) + 1 > self.limit {
                    return false;
                }
                continue;
            }
            let (rx, tx) = ((rule & 31) as u8, (rule >> 5) as u8);
            // Trains that start here (from the PE or from a port at the edge) need a color of their own.
            let origin = R | self.off_mesh(h.at);
            if tx != h.tx || h.tx & R != 0 || self.exits(h) || (h.rx & origin != 0 && rx & origin != 0) {
                return false;
            }
        }
        true
    }

    fn commit(&mut self, color: u32, path: &[Hop]) {
        let n = self.mesh.pes() as usize;
        let rules = self.rules[color as usize].get_or_insert_with(|| vec![0u16; n]);
        for h in path {
            let i = (h.at.y * self.mesh.width + h.at.x) as usize;
            if rules[i] == 0 {
                self.ext_count[i] += 1;
            }
            let rx = (rules[i] & 31) as u8 | h.rx;
            rules[i] = rx as u16 | (h.tx as u16) << 5;
        }
    }

    /// The longest prefix of `path` (from the start) that `color` fits.
    fn prefix(&self, color: u32, path: &[Hop]) -> usize {
        let mut n = 0;
        while n < path.len() && self.fits(color, &path[n..n + 1]) {
            n += 1;
        }
        n
    }

    /// A color for `path`, end to end if one is free; else the path in segments joined by relays: the
    /// stream's color on its first and last segments (where the sender and receiver meet it) and any
    /// free colors between. Returns the color, the relays, and the colors of the segments.
    pub fn assign_relayed(&mut self, stream: &str, path: &[Hop]) -> Result<(ColorId, u32, Vec<u32>), CompileError> {
        if let Ok(c) = self.try_assign(path) {
            return Ok((c, 0, vec![c.0]));
        }
        // The endpoints' color: the longest first and last segments together.
        let rev: Vec<Hop> = path.iter().rev().copied().collect();
        let best = (0..self.limit)
            .rev()
            .map(|c| (c, self.prefix(c, path), self.prefix(c, &rev)))
            .filter(|&(_, a, b)| a > 0 && b > 0)
            .max_by_key(|&(c, a, b)| (a + b, c));
        let Some((c, a, b)) = best else {
            // The sender and its receivers must meet one color: name the end that has none.
            let start = (0..self.limit).any(|c| self.prefix(c, &path[..1.min(path.len())]) > 0);
            let (why, at) = if !start {
                ("finds no free color at its sender's router", path.first())
            } else if (0..self.limit).any(|c| self.prefix(c, &rev[..1.min(rev.len())]) > 0) {
                (
                    "finds none of the colors free at its sender free (or routed its way) at its receiving router",
                    path.last(),
                )
            } else {
                ("finds no free color at its receiving router", path.last())
            };
            return Err(self.error(stream, why, at.copied()));
        };
        let (a, b) = (a.min(path.len()), b.min(path.len() - a.min(path.len())));
        let mut segments = vec![c];
        let mut commits: Vec<(u32, std::ops::Range<usize>)> = vec![(c, 0..a), (c, path.len() - b..path.len())];
        let mut at = a;
        let end = path.len() - b;
        while at < end {
            let pick = (0..self.limit).rev().map(|k| (k, self.prefix(k, &path[at..end]))).max_by_key(|&(k, n)| (n, k));
            match pick {
                Some((k, n)) if n > 0 => {
                    commits.push((k, at..at + n));
                    segments.push(k);
                    at += n;
                }
                _ => {
                    return Err(self.error(stream, "finds no free color to relay on at router", path.get(at).copied()))
                }
            }
        }
        segments.push(c);
        for (k, r) in commits {
            if !r.is_empty() {
                self.commit(k, &path[r]);
            }
        }
        Ok((ColorId(c), segments.len() as u32 - 2, segments))
    }

    fn try_assign(&mut self, path: &[Hop]) -> Result<ColorId, ()> {
        for c in (0..self.limit).rev() {
            if self.fits(c, path) {
                self.commit(c, path);
                return Ok(ColorId(c));
            }
        }
        Err(())
    }

    fn error(&self, stream: &str, why: &str, at: Option<Hop>) -> CompileError {
        let at = at.map_or(Coord { x: 0, y: 0 }, |h| h.at);
        CompileError::Colors {
            stream: stream.to_string(),
            why: why.to_string(),
            x: at.x,
            y: at.y,
            used: self.used_at(self.idx(at)),
            limit: self.limit,
            hint: "routers are shared by the regions' own collectives and every stream passing them; a larger --mesh \
                   or weight streaming (fewer regions) leaves more colors per router"
                .into(),
        }
    }

    /// Most colors used at any router of `r` (internal and external).
    pub fn max_in(&self, r: crate::mesh::Rect) -> u32 {
        let mut m = 0;
        for y in r.y..r.y + r.h {
            for x in r.x..r.x + r.w {
                m = m.max(self.used_at(self.idx(Coord { x, y })));
            }
        }
        m
    }
}
