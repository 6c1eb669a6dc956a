//! Perimeter IO: the system's ports split into channels one link wide, placed on the mesh's edge, and
//! the assignment of every off-wafer stream to channels.
//!
//! A 100 GbE port carries about 3.7 wavelets per cycle at 850 MHz, more than the one wavelet per cycle
//! an edge router's link takes, so each port is spread over `ceil(rate / link)` adjacent edge routers,
//! its channels, each with an exact share of the port's rate. Channels never exceed the port's share of
//! the system IO (`IoSpec::port_bytes_per_s`).

use crate::hw::{IoPlacement, WaferHw};
use crate::mesh::{Coord, Dir, MeshDims};

use super::CompileError;

#[derive(Clone, Debug)]
pub(crate) struct Channel {
    pub name: String,
    pub side: Dir,
    pub at: Coord,
    /// Exact rate: `wavelets` per `per_cycles` cycles.
    pub wavelets: u64,
    pub per_cycles: u64,
    pub latency_cycles: u64,
    /// The system port it belongs to.
    pub port: u32,
}

impl Channel {
    /// Bytes per second at `clock_hz`.
    pub fn bytes_per_s(&self, clock_hz: f64) -> f64 {
        self.wavelets as f64 * 4.0 / self.per_cycles as f64 * clock_hz
    }
}

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The channels of `hw`'s IO ports on the mesh in use.
pub(crate) fn channels(hw: &WaferHw) -> Result<Vec<Channel>, CompileError> {
    let Some(io) = hw.io else {
        return Err(CompileError::Unsupported(format!(
            "`{}` ({}) describes no perimeter IO ports ([io]): every input, weight and result crosses the wafer's \
             edge through them; use a description with an [io] section (wse2, wse3, cs2, cs3)",
            hw.name, hw.path
        )));
    };
    let mesh = hw.mesh;
    let clock = hw.clock_hz.round().max(1.0) as u128;
    let bits = (io.port_bytes_per_s() * 8.0).round().max(1.0) as u128;
    let link = hw.fabric.link_wavelets_per_cycle.max(1) as u128;
    // Wavelets per cycle of one port, as bits / (32 clock).
    let per_port_den = 32 * clock;
    let k_full = bits.div_ceil(per_port_den * link).max(1) as u32;
    let sides: Vec<Dir> = match io.placement {
        IoPlacement::WestEast => vec![Dir::West, Dir::East],
        IoPlacement::West => vec![Dir::West],
        IoPlacement::Perimeter => vec![Dir::West, Dir::North, Dir::East, Dir::South],
    };
    let edge_len = |d: Dir| match d {
        Dir::West | Dir::East => mesh.height,
        Dir::North | Dir::South => mesh.width,
    };
    // Ports dealt to the sides in turn.
    let mut per_side: Vec<Vec<u32>> = vec![Vec::new(); sides.len()];
    for p in 0..io.ports {
        per_side[(p as usize) % sides.len()].push(p);
    }
    let latency = (io.latency_ns * hw.clock_hz / 1e9).round().max(0.0) as u64;
    let mut out = Vec::new();
    for (si, &side) in sides.iter().enumerate() {
        let n = per_side[si].len() as u32;
        if n == 0 {
            continue;
        }
        let len = edge_len(side);
        // Channels per port: as many as the rate needs, as the edge allows.
        let k = k_full.min((len / n).max(1));
        // A channel is one edge link: when the edge is too short for the port's channels, the link
        // limits it (a small --mesh has less IO than the system).
        let den = per_port_den * k as u128;
        let (num, den) = if bits > den * link { (link, 1) } else { (bits, den) };
        let g = gcd(num, den);
        let (num, den) = (num / g, den / g);
        // The side's n x k channels evenly spaced along the edge, dealt to the ports in turn, so that
        // every stretch of the edge is near a channel (a stream reaches its channel in a straight line
        // more often) and every port spans the edge.
        let total = (n * k) as u64;
        for slot in 0..total {
            let pos = (((2 * slot + 1) * len as u64) / (2 * total)) as u32 % len.max(1);
            let (i, j) = ((slot % n as u64) as usize, (slot / n as u64) as u32);
            let p = per_side[si][i];
            let at = match side {
                Dir::West => Coord { x: 0, y: pos },
                Dir::East => Coord { x: mesh.width - 1, y: pos },
                Dir::North => Coord { x: pos, y: 0 },
                Dir::South => Coord { x: pos, y: mesh.height - 1 },
            };
            out.push(Channel {
                name: format!("io{p}.{j}"),
                side,
                at,
                wavelets: num as u64,
                per_cycles: den as u64,
                latency_cycles: latency,
                port: p,
            });
        }
    }
    out.sort_by_key(|c| (c.port, c.name.clone()));
    Ok(out)
}

/// Streams a channel takes before others are preferred.
const FLOWS_PER_CHANNEL: u32 = 6;

/// Picks `n` channels for a stream of `bytes` near `near`, on the nearer side: for big streams, channels
/// not yet loaded above the fair share first, then the nearest (a stream whose row meets its channel's
/// goes straight); for small streams the nearest.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pick(
    chans: &[Channel],
    load: &mut [u64],
    flows: &mut [u32],
    n: usize,
    bytes: u64,
    near: Coord,
    avoid: &[usize],
    big: bool,
) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..chans.len()).filter(|i| !avoid.contains(i)).collect();
    if idx.is_empty() {
        idx = (0..chans.len()).collect();
    }
    // The nearer side's channels: a stream crossing the wafer to the far edge crosses every stream
    // on the way and keeps a color busy along the whole width.
    let side_dist = |c: &Channel| match c.side {
        crate::mesh::Dir::West => near.x as u64,
        crate::mesh::Dir::East => (chans.iter().map(|c| c.at.x).max().unwrap_or(0) - near.x) as u64,
        crate::mesh::Dir::North => near.y as u64,
        crate::mesh::Dir::South => (chans.iter().map(|c| c.at.y).max().unwrap_or(0) - near.y) as u64,
    };
    let best_side = idx.iter().map(|&i| side_dist(&chans[i])).min().unwrap_or(0);
    let near_side: Vec<usize> = idx.iter().copied().filter(|&i| side_dist(&chans[i]) == best_side).collect();
    if near_side.len() >= n {
        idx = near_side;
    }
    let total: u64 = load.iter().sum::<u64>() + bytes;
    let fair = total / chans.len().max(1) as u64;
    let dist = |c: &Channel| {
        // Distance off the stream's row counts double: that stretch runs along the shared edge.
        2 * (c.at.y as i64 - near.y as i64).unsigned_abs() + (c.at.x as i64 - near.x as i64).unsigned_abs()
    };
    // A channel starts or ends every one of its streams on a color of its own: spread streams before
    // a channel's router runs short of colors.
    let crowded = |i: usize| flows[i] >= FLOWS_PER_CHANNEL;
    // Big streams (weights, gradients) balance the channels' load; small ones take the nearest.
    if big {
        idx.sort_by_key(|&i| (crowded(i), load[i] > fair, dist(&chans[i]), load[i], i));
    } else {
        idx.sort_by_key(|&i| (crowded(i), dist(&chans[i]), load[i], i));
    }
    let chosen: Vec<usize> = idx.into_iter().take(n.max(1)).collect();
    let each = bytes / chosen.len().max(1) as u64;
    for &i in &chosen {
        load[i] += each.max(1);
        flows[i] += 1;
    }
    chosen
}

/// Channels for one of the weight streams spread over every channel: `n` of `cands`, the least loaded
/// first (the loop's weight streams all run at once, so a channel carrying two sets the pace of both),
/// then the nearest to `near`; with `rows`, at most one per row (row bands around each channel's row).
/// Charges nothing to their load; fewer than `n` when `cands` has fewer.
pub(crate) fn spread(
    chans: &[Channel],
    load: &[u64],
    flows: &[u32],
    n: usize,
    near: Coord,
    cands: &[usize],
    rows: bool,
) -> Vec<usize> {
    let dist = |c: &Channel| c.at.y.abs_diff(near.y) as u64 + c.at.x.abs_diff(near.x) as u64;
    let mut idx = cands.to_vec();
    idx.sort_by_key(|&i| (flows[i] >= FLOWS_PER_CHANNEL, load[i], dist(&chans[i]), i));
    if rows {
        let mut seen = Vec::new();
        idx.retain(|&i| {
            let fresh = !seen.contains(&chans[i].at.y);
            seen.push(chans[i].at.y);
            fresh
        });
    }
    idx.truncate(n.max(1));
    idx
}

/// How many channels each of the layer loop's weight streams gets, out of `channels`: every stream
/// one, then one more at a time to the stream whose channels carry the most bytes each (never past its
/// `max` bands), while channels are left. The loop streams every layer's weights at once, so the
/// slowest channel sets the pace: this minimises the bytes of the most loaded one (each channel
/// carrying one stream when there are channels enough).
pub(crate) fn apportion(channels: usize, want: &[(u64, u32)]) -> Vec<u32> {
    let mut n: Vec<u32> = want.iter().map(|_| 1).collect();
    let mut left = channels.saturating_sub(want.len());
    while left > 0 {
        let mut best: Option<usize> = None;
        for (i, &(bytes, max)) in want.iter().enumerate() {
            if n[i] >= max {
                continue;
            }
            // bytes_i / n_i > bytes_b / n_b, exactly; ties to the first.
            let better = match best {
                None => true,
                Some(b) => bytes as u128 * n[b] as u128 > want[b].0 as u128 * n[i] as u128,
            };
            if better {
                best = Some(i);
            }
        }
        match best {
            Some(i) => {
                n[i] += 1;
                left -= 1;
            }
            None => break,
        }
    }
    n
}

/// The mesh side a direction leaves through (for the printer).
pub(crate) fn side_name(d: Dir) -> &'static str {
    match d {
        Dir::West => "west",
        Dir::East => "east",
        Dir::North => "north",
        Dir::South => "south",
    }
}

/// True when `c` lies on the `side` edge of `mesh`.
pub(crate) fn on_edge(c: Coord, side: Dir, mesh: MeshDims) -> bool {
    match side {
        Dir::West => c.x == 0,
        Dir::East => c.x + 1 == mesh.width,
        Dir::North => c.y == 0,
        Dir::South => c.y + 1 == mesh.height,
    }
}
