//! Route patterns expanded into the tree of links a train crosses, from its sender to every delivery.

use crate::mesh::{Coord, Dir, Pattern, Port};

/// Index of a link in the engine's link table.
pub type LinkId = u32;

/// Where a tree node ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deliver {
    /// A router-to-router hop; the train continues.
    Hop,
    /// Down the ramp into this PE (index into the mesh).
    Pe(u32),
    /// Out through this IO port.
    Port(u32),
    /// Over the link between wafers, into this (peer) port.
    PortIn(u32),
}

/// One link of a train's tree; `parent` is the node whose head feeds it (u32::MAX: the root).
#[derive(Clone, Copy, Debug)]
pub struct Node {
    pub link: LinkId,
    pub parent: u32,
    pub deliver: Deliver,
}

pub const ROOT: u32 = u32::MAX;

/// Link numbering for a `width x height` mesh: four outgoing links per router, then an up ramp and a
/// down ramp per PE, then one link per IO port.
#[derive(Clone, Copy, Debug)]
pub struct Links {
    pub width: u32,
    pub height: u32,
    /// Width of one wafer: a cluster's wafers sit side by side with no links between them.
    pub wafer_width: u32,
    /// IO ports (each has an outgoing and, for wafer peers, an incoming link).
    pub ports: u32,
}

impl Links {
    pub fn pes(&self) -> u32 {
        self.width * self.height
    }
    pub fn pe(&self, c: Coord) -> u32 {
        c.y * self.width + c.x
    }
    pub fn coord(&self, pe: u32) -> Coord {
        Coord { x: pe % self.width, y: pe / self.width }
    }
    pub fn hop(&self, c: Coord, d: Dir) -> LinkId {
        self.pe(c) * 4 + d as u32
    }
    pub fn up_ramp(&self, pe: u32) -> LinkId {
        4 * self.pes() + 2 * pe
    }
    pub fn down_ramp(&self, pe: u32) -> LinkId {
        4 * self.pes() + 2 * pe + 1
    }
    pub fn port(&self, port: u32) -> LinkId {
        6 * self.pes() + port
    }
    /// The link from a peer wafer's port into port `port`.
    pub fn port_in(&self, port: u32) -> LinkId {
        6 * self.pes() + self.ports + port
    }
    fn step(&self, c: Coord, d: Dir) -> Option<Coord> {
        let (dx, dy) = d.delta();
        let x = c.x as i64 + dx as i64;
        let y = c.y as i64 + dy as i64;
        let inside = x >= 0 && y >= 0 && x < self.width as i64 && y < self.height as i64;
        // No link crosses from one wafer to the next.
        (inside && x as u32 / self.wafer_width == c.x / self.wafer_width).then_some(Coord { x: x as u32, y: y as u32 })
    }
}

/// A pattern that leaves the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffMesh {
    pub at: Coord,
}

/// Builds the link tree of a train whose head enters the mesh at router `at` (a PE's own router after
/// its up ramp, or a port's edge router). `deliver_self` handles `Local`.
pub fn expand(links: &Links, at: Coord, pattern: Pattern, ports: &[Port], out: &mut Vec<Node>) -> Result<(), OffMesh> {
    out.clear();
    let mut walker = Walker { links, out };
    match pattern {
        Pattern::Local => {
            walker.out.push(Node {
                link: links.down_ramp(links.pe(at)),
                parent: ROOT,
                deliver: Deliver::Pe(links.pe(at)),
            });
        }
        Pattern::Line { dir, hops, multicast } => {
            let mut c = at;
            let mut parent = ROOT;
            for i in 0..hops {
                parent = walker.hop(&mut c, dir, parent)?;
                if multicast || i + 1 == hops {
                    walker.deliver(c, parent);
                }
            }
        }
        Pattern::To { dx, dy } => {
            let (c, parent) = walker.xy(at, dx, dy, ROOT)?;
            walker.deliver(c, parent);
        }
        Pattern::ToPort { port: crate::mesh::PortId(port) } => {
            let target = ports.get(port as usize).ok_or(OffMesh { at })?;
            let (dx, dy) = (target.at.x as i32 - at.x as i32, target.at.y as i32 - at.y as i32);
            let (_, parent) = walker.xy(at, dx, dy, ROOT)?;
            walker.out.push(Node { link: links.port(port), parent, deliver: Deliver::Port(port) });
            // A port to another wafer hands the train on to its peer port.
            if let Some(q) = target.peer_port {
                let parent = walker.out.len() as u32 - 1;
                walker.out.push(Node { link: links.port_in(q.0), parent, deliver: Deliver::PortIn(q.0) });
            }
        }
        Pattern::Rect { dx, dy, w, h } => {
            let x0 = at.x as i64 + dx as i64;
            let y0 = at.y as i64 + dy as i64;
            if x0 < 0
                || y0 < 0
                || x0 + w as i64 > links.width as i64
                || y0 + h as i64 > links.height as i64
                || w == 0
                || h == 0
            {
                return Err(OffMesh { at });
            }
            let (x0, y0) = (x0 as u32, y0 as u32);
            // Y first to the rectangle's nearest row, then X to its nearest column.
            let ye = at.y.clamp(y0, y0 + h - 1);
            let xe = at.x.clamp(x0, x0 + w - 1);
            let (entry, parent) = walker.xy_yfirst(at, xe as i32 - at.x as i32, ye as i32 - at.y as i32, ROOT)?;
            // The row through the rectangle, both ways from the entry column; each column both ways.
            walker.column(entry, y0, h, parent)?;
            for dir in [Dir::East, Dir::West] {
                let mut c = entry;
                let mut p = parent;
                loop {
                    let next = match dir {
                        Dir::East if c.x + 1 < x0 + w => true,
                        Dir::West if c.x > x0 => true,
                        _ => false,
                    };
                    if !next {
                        break;
                    }
                    p = walker.hop(&mut c, dir, p)?;
                    walker.column(c, y0, h, p)?;
                }
            }
        }
    }
    Ok(())
}

struct Walker<'a> {
    links: &'a Links,
    out: &'a mut Vec<Node>,
}

impl Walker<'_> {
    fn hop(&mut self, c: &mut Coord, d: Dir, parent: u32) -> Result<u32, OffMesh> {
        let link = self.links.hop(*c, d);
        *c = self.links.step(*c, d).ok_or(OffMesh { at: *c })?;
        self.out.push(Node { link, parent, deliver: Deliver::Hop });
        Ok(self.out.len() as u32 - 1)
    }

    fn deliver(&mut self, c: Coord, parent: u32) {
        let pe = self.links.pe(c);
        self.out.push(Node { link: self.links.down_ramp(pe), parent, deliver: Deliver::Pe(pe) });
    }

    /// X first, then Y.
    fn xy(&mut self, mut c: Coord, dx: i32, dy: i32, mut parent: u32) -> Result<(Coord, u32), OffMesh> {
        let xd = if dx >= 0 { Dir::East } else { Dir::West };
        for _ in 0..dx.unsigned_abs() {
            parent = self.hop(&mut c, xd, parent)?;
        }
        let yd = if dy >= 0 { Dir::South } else { Dir::North };
        for _ in 0..dy.unsigned_abs() {
            parent = self.hop(&mut c, yd, parent)?;
        }
        Ok((c, parent))
    }

    /// Y first, then X.
    fn xy_yfirst(&mut self, mut c: Coord, dx: i32, dy: i32, mut parent: u32) -> Result<(Coord, u32), OffMesh> {
        let yd = if dy >= 0 { Dir::South } else { Dir::North };
        for _ in 0..dy.unsigned_abs() {
            parent = self.hop(&mut c, yd, parent)?;
        }
        let xd = if dx >= 0 { Dir::East } else { Dir::West };
        for _ in 0..dx.unsigned_abs() {
            parent = self.hop(&mut c, xd, parent)?;
        }
        Ok((c, parent))
    }

    /// Delivers at `c` and along its column over rows y0..y0+h, both ways from c.
    fn column(&mut self, c: Coord, y0: u32, h: u32, parent: u32) -> Result<(), OffMesh> {
        self.deliver(c, parent);
        for dir in [Dir::South, Dir::North] {
            let mut cc = c;
            let mut p = parent;
            loop {
                let next = match dir {
                    Dir::South => cc.y + 1 < y0 + h,
                    _ => cc.y > y0,
                };
                if !next {
                    break;
                }
                p = self.hop(&mut cc, dir, p)?;
                self.deliver(cc, p);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(p: Pattern, at: Coord) -> Vec<Node> {
        let links = Links { width: 8, height: 8, wafer_width: 8, ports: 0 };
        let mut out = Vec::new();
        expand(&links, at, p, &[], &mut out).unwrap();
        out
    }

    #[test]
    fn line_multicast_delivers_each_pe() {
        let t = tree(Pattern::Line { dir: Dir::East, hops: 3, multicast: true }, Coord { x: 1, y: 2 });
        let pes: Vec<u32> =
            t.iter().filter_map(|n| if let Deliver::Pe(p) = n.deliver { Some(p) } else { None }).collect();
        assert_eq!(pes, vec![2 * 8 + 2, 2 * 8 + 3, 2 * 8 + 4]);
        assert_eq!(t.iter().filter(|n| n.deliver == Deliver::Hop).count(), 3);
    }

    #[test]
    fn unicast_goes_x_then_y() {
        let t = tree(Pattern::To { dx: 2, dy: -1 }, Coord { x: 1, y: 2 });
        assert_eq!(t.len(), 4);
        assert_eq!(t[3].deliver, Deliver::Pe(8 + 3));
    }

    #[test]
    fn rect_multicast_covers_the_rectangle_once() {
        let t = tree(Pattern::Rect { dx: 1, dy: -1, w: 3, h: 3 }, Coord { x: 0, y: 2 });
        let mut pes: Vec<u32> =
            t.iter().filter_map(|n| if let Deliver::Pe(p) = n.deliver { Some(p) } else { None }).collect();
        pes.sort();
        let expect: Vec<u32> = (1..4).flat_map(|y| (1..4).map(move |x| y * 8 + x)).collect();
        assert_eq!(pes, expect);
    }

    #[test]
    fn off_mesh_is_an_error() {
        let links = Links { width: 4, height: 4, wafer_width: 4, ports: 0 };
        let mut out = Vec::new();
        let r = expand(
            &links,
            Coord { x: 3, y: 0 },
            Pattern::Line { dir: Dir::East, hops: 1, multicast: false },
            &[],
            &mut out,
        );
        assert!(r.is_err());
        // Two wafers side by side: no link joins them.
        let two = Links { width: 8, height: 4, wafer_width: 4, ports: 0 };
        let r = expand(
            &two,
            Coord { x: 3, y: 0 },
            Pattern::Line { dir: Dir::East, hops: 1, multicast: false },
            &[],
            &mut out,
        );
        assert!(r.is_err());
    }
}
