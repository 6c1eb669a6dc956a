//! The event loop. The mesh is cut into fixed square blocks ("partitions"); each partition owns the
//! PEs, routers, links and ports in its block, its own event queue and statistics. Time advances in
//! windows of one cycle (the lookahead: no effect crosses a block boundary in less than a hop): every
//! partition handles its events of the window, then the trains whose heads cross into a neighbour are
//! handed over as continuation events, in a fixed order. The blocks are a function of the mesh alone,
//! so the result is the same whether one thread runs all partitions or many threads share them.
//! Threads take blocks along diagonals, so a wavefront moving along rows or columns is shared.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use smallvec::{smallvec, SmallVec};

use super::credit::{path_buffer, Credit, CreditKind, PendingHold, SenderHold};
use super::link::{prefetch, Pace, Timeline, UNIT};
use super::queue::RadixQueue;
use super::record::{Metric, PartRecorder, Span, TraceSpec};
use super::route::{expand, Deliver, Links, Node, ROOT};
use super::values::{At, PartValues, Payload};
use super::{AgentStats, Blocked, EngineError, Path, Res, Totals};
use crate::mesh::{ColorId, Coord, MeshProgram, Need, Senders, TaskIdx};

/// Bytes of one wavelet's payload.
const WAVELET_BYTES: u64 = 4;

/// Side of a partition's block of PEs. Fixed, so results never depend on the thread count.
pub const BLOCK: u32 = 64;

/// A train's arrival at one agent: wavelet j arrives at `head + pace.offset(j)`, with the train's
/// `n`, `pace` and the rest in `Part::infos` (slot `info`, which counts this arrival until it is claimed).
#[derive(Debug)]
struct Arrival {
    head: u64,
    info: u32,
}

/// What every arrival (and hold) of one train in a partition shares, kept once per partition the train
/// delivers in rather than once per receiver: a weight-streaming run keeps millions of arrivals that
/// no task has claimed yet (ports stream weights far ahead of the PEs that take them), and an arrival
/// that carries all of this takes 104 bytes instead of 16.
#[derive(Debug)]
struct TrainInfo {
    n: u64,
    pace: Pace,
    /// The critical path at the send, the cycle of the send, and what transit is charged to: the path
    /// to an arrival's head is `path` plus `head - sent` cycles of `transit_res`.
    path: Path,
    sent: u64,
    transit_res: Res,
    /// What the serialisation behind the head is spent on.
    tail_res: Res,
    /// The train's values (functional runs only).
    data: Option<Payload>,
    /// Arrivals not fully claimed and holds not released that refer to it; the slot is free at zero.
    refs: u32,
}

impl TrainInfo {
    /// Critical path to the head's arrival at `head`.
    fn path_to(&self, head: u64) -> Path {
        self.path.add(self.transit_res, head.saturating_sub(self.sent))
    }
}

/// A partition's `TrainInfo`s: a slab with reference counts (partitions run on any thread, so a
/// non-atomic count per partition rather than an `Arc` per arrival).
#[derive(Debug, Default)]
struct Infos {
    slots: Vec<TrainInfo>,
    free: Vec<u32>,
}

impl Infos {
    /// A new slot for `t`'s arrivals, with no reference yet (the caller takes one at once).
    fn intern(&mut self, t: &Train) -> u32 {
        let info = TrainInfo {
            n: t.n,
            pace: t.pace,
            path: t.path,
            sent: t.sent,
            transit_res: t.transit_res,
            tail_res: t.tail_res,
            data: t.data.clone(),
            refs: 0,
        };
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = info;
                i
            }
            None => {
                self.slots.push(info);
                self.slots.len() as u32 - 1
            }
        }
    }

    #[inline]
    fn get(&self, i: u32) -> &TrainInfo {
        &self.slots[i as usize]
    }

    fn retain(&mut self, i: u32) {
        self.slots[i as usize].refs += 1;
    }

    fn release(&mut self, i: u32) {
        let slot = &mut self.slots[i as usize];
        slot.refs -= 1;
        if slot.refs == 0 {
            slot.data = None;
            self.free.push(i);
        }
    }
}

/// Wavelets of one color at one agent: arrivals in head order, and how many task runs have claimed.
#[derive(Debug, Default)]
struct Inbox {
    arrivals: SmallVec<[Arrival; 1]>,
    /// Arrivals before this index are fully claimed and never read again.
    first: usize,
    /// Wavelets of `arrivals[first]` already claimed.
    first_claimed: u64,
    delivered: u64,
    claimed: u64,
    /// Trains of this color held for want of room (`Part::rx_holds` has them).
    holds: u32,
}

impl Inbox {
    /// Adds an arrival of `n` wavelets (the caller has taken its reference on the info).
    fn add(&mut self, a: Arrival, n: u64) {
        // Keep head order among arrivals nobody has claimed from yet.
        let lo = self.first + usize::from(self.first_claimed > 0);
        let pos = lo + self.arrivals[lo..].partition_point(|x| x.head <= a.head);
        self.delivered += n;
        self.arrivals.insert(pos, a);
    }

    /// Arrival cycle of the unclaimed wavelet `k` positions after the claim frontier.
    fn time_of(&self, k: u64, infos: &Infos) -> Option<u64> {
        let mut k = k + self.first_claimed;
        for a in &self.arrivals[self.first..] {
            let t = infos.get(a.info);
            if k < t.n {
                return Some(a.head + t.pace.offset(k));
            }
            k -= t.n;
        }
        None
    }

    /// Arrival cycle and critical path of the unclaimed wavelet `k` positions after the frontier.
    fn arrival_of(&self, k: u64, infos: &Infos) -> Option<(u64, Path)> {
        let mut k = k + self.first_claimed;
        for a in &self.arrivals[self.first..] {
            let t = infos.get(a.info);
            if k < t.n {
                let off = t.pace.offset(k);
                return Some((a.head + off, t.path_to(a.head).add(t.tail_res, off)));
            }
            k -= t.n;
        }
        None
    }

    /// The values the next claim of `w` wavelets takes: whole trains, or the part of a train's
    /// payload its claimed wavelets carry.
    fn claimed_data(&self, mut w: u64, out: &mut Vec<Payload>, infos: &Infos) {
        let mut done = self.first_claimed;
        for a in &self.arrivals[self.first..] {
            if w == 0 {
                return;
            }
            let t = infos.get(a.info);
            let take = w.min(t.n - done);
            if let Some(p) = &t.data {
                out.push(super::values::slice_payload(p, t.n, done, done + take));
            }
            w -= take;
            done = 0;
        }
    }

    /// Claims `w` wavelets; an arrival claimed to its end gives back its reference on the info.
    fn claim(&mut self, mut w: u64, infos: &mut Infos) {
        self.claimed += w;
        while w > 0 {
            let a = &self.arrivals[self.first];
            let left = infos.get(a.info).n - self.first_claimed;
            if w < left {
                self.first_claimed += w;
                return;
            }
            w -= left;
            infos.release(a.info);
            self.first += 1;
            self.first_claimed = 0;
        }
        // Forget fully claimed arrivals soon, and give back the room of a burst once it
        // is consumed: a full wafer has a million inboxes.
        if self.first == self.arrivals.len() {
            self.arrivals.clear();
            self.first = 0;
            if self.arrivals.capacity() > 8 {
                self.arrivals.shrink_to_fit();
            }
        } else if self.first >= 8 {
            self.arrivals.drain(..self.first);
            self.first = 0;
        }
    }
}

/// A PE or an IO port.
#[derive(Debug, Default)]
struct Agent {
    /// Global agent id (PE index in the mesh, then n_pes + port index).
    id: u32,
    /// Template index; u32::MAX for PEs that run nothing.
    template: u32,
    busy_until: u64,
    running: bool,
    /// Holds on this agent's sends not yet released, over all colors (`Part::tx_holds` has them).
    held: i32,
    /// Critical path to the end of the agent's last task run (or zero before any).
    free_path: Path,
    /// Path at the start of the running task (for its streamed sends) and at its finish.
    run_path: Path,
    runs_done: SmallVec<[u32; 4]>,
    inbox: SmallVec<[(ColorId, Inbox); 2]>,
    /// Route index per color, looked up once.
    routes: SmallVec<[(ColorId, u32); 2]>,
    /// The expanded trees of this agent's routes (by route index), while the cache has room.
    trees: SmallVec<[(u32, Arc<Tree>); 1]>,
}

impl Agent {
    fn inbox(&mut self, c: ColorId) -> &mut Inbox {
        match self.inbox.iter().position(|(k, _)| *k == c) {
            Some(i) => &mut self.inbox[i].1,
            None => {
                self.inbox.push((c, Inbox::default()));
                &mut self.inbox.last_mut().expect("just pushed").1
            }
        }
    }
    fn inbox_ref(&self, c: ColorId) -> Option<&Inbox> {
        self.inbox.iter().find(|(k, _)| *k == c).map(|(_, i)| i)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    /// Re-evaluate which task the local agent can start.
    Wake(u32),
    /// A task run of the local agent finishes.
    Done(u32, u32),
    /// A train's head enters this partition (index into `Part::conts`).
    Cont(u32),
    /// A credit message for a local sender takes effect (index into `Part::credits`).
    Credit(u32),
}

/// How many route-tree nodes ahead of the one it reserves a walk fetches link timelines, and (closer,
/// once the timeline itself is in the cache) the breakpoints of those that keep them on the heap.
const PREFETCH_NODES: usize = 8;
const PREFETCH_STEPS: usize = 4;

/// Route-tree nodes kept expanded over the whole run (about 24 bytes each: 200 MB at most). Sharing
/// trees saves about 10% of the instructions of a weight-streaming run (callgrind, gpt-tiny train on
/// 64x64 PEs: 3.52 G -> 3.15 G) and keeps the trains a port streams ahead from holding a tree each.
const TREE_CACHE_NODES: u64 = 8 << 20;

/// The expanded route tree of one sender on one route: the links in pre-order (each node's subtree
/// follows it, whole: `route::expand` builds them so, and `expand_tree` checks it) with their parents and
/// subtree sizes, and the slowest pace its consumers (PEs and ports) take with the resource that
/// pace is charged to. It depends only on the program, so every train of that sender on that route
/// shares it.
#[derive(Debug, Default)]
struct Tree {
    nodes: Vec<Node>,
    /// Nodes in each node's subtree, itself included: node i's subtree is `i..i + size[i]`, so a walk
    /// goes down the tree in index order and skips another partition's subtree in one step.
    size: Vec<u32>,
    /// (owning partition, local link index) of each node's link: the block arithmetic and the table
    /// lookups of `Shared::link_home` done once per tree instead of once per train and link.
    homes: Vec<(u32, u32)>,
    /// The slowest consumer pace and what it is charged to (first in node order among equals).
    consumer_pace: Option<(Pace, Res)>,
}

/// A train in flight: everything a partition needs to continue it.
#[derive(Debug)]
struct Train {
    /// Global id of the sending agent (held when a receiver has no room).
    sender: u32,
    color: ColorId,
    n: u64,
    pace: Pace,
    len: u64,
    units: u64,
    tree: Arc<Tree>,
    /// Critical path at the send, the cycle of the send, and what transit and serialisation cost.
    path: Path,
    sent: u64,
    transit_res: Res,
    tail_res: Res,
    data: Option<Payload>,
}

/// Fills the subtree sizes of a route tree in pre-order; false if it is not in pre-order (a node before
/// its parent, or outside its parent's subtree).
fn subtree_sizes(nodes: &[Node], size: &mut Vec<u32>) -> bool {
    size.clear();
    size.resize(nodes.len(), 1);
    for (i, node) in nodes.iter().enumerate().rev() {
        if node.parent != ROOT {
            if node.parent as usize >= i {
                return false;
            }
            size[node.parent as usize] += size[i];
        }
    }
    // Each subtree contiguous: a node lies within its parent's range.
    nodes.iter().enumerate().all(|(i, n)| n.parent == ROOT || i < n.parent as usize + size[n.parent as usize] as usize)
}

impl Train {
    /// The train without its route tree.
    fn clone_header(&self) -> Train {
        Train {
            sender: self.sender,
            color: self.color,
            n: self.n,
            pace: self.pace,
            len: self.len,
            units: self.units,
            tree: Arc::default(),
            path: self.path,
            sent: self.sent,
            transit_res: Res::InterWafer,
            tail_res: self.tail_res,
            data: self.data.clone(),
        }
    }
}

/// A train's head arriving at a partition's router at `time`, to continue from `node`.
#[derive(Clone, Debug)]
struct Cont {
    time: u64,
    train: Arc<Train>,
    node: u32,
}

/// The consumers of a template's colors: (color, pace, paced, receive buffer); see `Shared::recv_pace`.
type Consumers = SmallVec<[(ColorId, Pace, bool, u64); 2]>;

/// Read-only facts every partition shares.
pub(crate) struct Shared<'p> {
    prog: &'p MeshProgram,
    /// Route-tree nodes the senders may still keep expanded (a cache: whether a tree is kept changes
    /// the emulator's speed and memory, never a result).
    tree_room: AtomicU64,
    links: Links,
    n_pes: u32,
    /// Blocks per row of blocks, and rows of blocks.
    blocks_x: u32,
    blocks_y: u32,
    /// Template of every PE (u32::MAX: idle).
    template_of: Vec<u32>,
    port_cap: Vec<u64>,
    port_pace: Vec<Pace>,
    /// (partition, local index) of each port.
    port_home: Vec<(u32, u32)>,
    /// (partition, local index) of every PE, and the PEs of every partition's block: the block
    /// arithmetic (three divisions by mesh dimensions) done once instead of on every link a train
    /// crosses.
    pe_home: Vec<(u32, u32)>,
    block_pes: Vec<u32>,
    /// Route indices per color id (colors are small integers).
    /// Route lookup: per color and row, the sender spans (x0, x1 exclusive, route) sorted by x0.
    routes_by_row: Vec<Vec<Vec<(u32, u32, u32)>>>,
    /// Per port, its routes by color.
    port_routes: Vec<SmallVec<[(ColorId, u32); 2]>>,
    /// Per template: (color, pace imposed by its paced consumer, whether that consumer is paced,
    /// wavelets the PE takes beyond its queues before the consumer claims: `receive_buffer`).
    recv_pace: Vec<Consumers>,
}

impl<'p> Shared<'p> {
    pub fn new(prog: &'p MeshProgram) -> Result<Shared<'p>, EngineError> {
        let links = Links {
            width: prog.mesh.width,
            height: prog.mesh.height,
            wafer_width: prog.wafer_width.unwrap_or(prog.mesh.width).max(1),
            ports: prog.ports.len() as u32,
        };
        let n_pes = links.pes();
        let mut template_of = vec![u32::MAX; n_pes as usize];
        for tile in &prog.tiles {
            let r = tile.rect;
            if r.x + r.w > links.width || r.y + r.h > links.height {
                return Err(EngineError::Program(format!(
                    "tile {r:?} lies outside the {}x{} mesh",
                    links.width, links.height
                )));
            }
            if tile.template.0 as usize >= prog.templates.len() {
                return Err(EngineError::Program(format!("tile {r:?} names a template that does not exist")));
            }
            for y in r.y..r.y + r.h {
                for x in r.x..r.x + r.w {
                    let slot = &mut template_of[links.pe(Coord { x, y }) as usize];
                    if *slot != u32::MAX {
                        return Err(EngineError::Program(format!("PE ({x},{y}) is in two tiles")));
                    }
                    *slot = tile.template.0;
                }
            }
        }
        let (blocks_x, blocks_y) = (links.width.div_ceil(BLOCK), links.height.div_ceil(BLOCK));
        let n_parts = blocks_x * blocks_y;
        let mut port_cap = Vec::new();
        let mut port_pace = Vec::new();
        let mut port_home = Vec::new();
        let mut per_part = vec![0u32; n_parts as usize];
        for p in &prog.ports {
            if p.at.x >= links.width || p.at.y >= links.height || p.wavelets == 0 || p.per_cycles == 0 {
                return Err(EngineError::Program(format!("port {} is off the mesh or has no bandwidth", p.name)));
            }
            port_cap.push(((UNIT as u128 * p.wavelets as u128) / p.per_cycles as u128).max(1) as u64);
            port_pace.push(Pace::new(p.per_cycles, p.wavelets).max(Pace::FULL));
            let part = (p.at.y / BLOCK) * blocks_x + p.at.x / BLOCK;
            port_home.push((part, per_part[part as usize]));
            per_part[part as usize] += 1;
        }
        let mut routes_by_row: Vec<Vec<Vec<(u32, u32, u32)>>> = Vec::new();
        let mut port_routes: Vec<SmallVec<[(ColorId, u32); 2]>> = vec![SmallVec::new(); prog.ports.len()];
        for (i, r) in prog.routes.iter().enumerate() {
            let c = r.color.0 as usize;
            if c >= 4096 {
                return Err(EngineError::Program(format!("route {i} uses color {} (beyond any router)", r.color)));
            }
            match r.senders {
                Senders::Pes(rect) => {
                    if routes_by_row.len() <= c {
                        routes_by_row.resize(c + 1, Vec::new());
                    }
                    let rows = &mut routes_by_row[c];
                    if rows.is_empty() {
                        rows.resize(links.height as usize, Vec::new());
                    }
                    for y in rect.y..(rect.y + rect.h).min(links.height) {
                        rows[y as usize].push((rect.x, rect.x + rect.w, i as u32));
                    }
                }
                Senders::Port(p) => match port_routes.get_mut(p.0 as usize) {
                    Some(v) => v.push((r.color, i as u32)),
                    None => {
                        return Err(EngineError::Program(format!(
                            "route {i} is sent by port {} which does not exist",
                            p.0
                        )))
                    }
                },
            }
        }
        for rows in routes_by_row.iter_mut() {
            for spans in rows.iter_mut() {
                spans.sort_unstable();
            }
        }
        let recv_pace = prog
            .templates
            .iter()
            .map(|t| {
                let mut v: Consumers = SmallVec::new();
                for task in &t.tasks {
                    for need in &task.needs {
                        if let Need::Recv { color, wavelets } = *need {
                            if wavelets == 0 || v.iter().any(|(c, _, _, _)| *c == color) {
                                continue;
                            }
                            let paced = task.work.paced_by == Some(color);
                            let compute = prog.timing.pe.cycles(task.work.op, task.work.elems);
                            let pace =
                                if paced && compute > wavelets { Pace::new(compute, wavelets) } else { Pace::FULL };
                            // What the PE takes before its consumer claims: one run, the FIFO the
                            // program declares for the color, or its free SRAM (credit.rs).
                            let free = prog.timing.sram_bytes.saturating_sub(t.sram_bytes) / WAVELET_BYTES;
                            let fifo = t
                                .fifos
                                .iter()
                                .filter(|f| f.color == color)
                                .map(|f| (f.runs as u64).saturating_mul(wavelets))
                                .max()
                                .unwrap_or(0);
                            v.push((color, pace, paced, free.max(fifo).max(wavelets)));
                        }
                    }
                }
                v
            })
            .collect();
        let mut sh = Shared {
            tree_room: AtomicU64::new(TREE_CACHE_NODES),
            prog,
            links,
            n_pes,
            blocks_x,
            blocks_y,
            template_of,
            port_cap,
            port_pace,
            port_home,
            routes_by_row,
            port_routes,
            recv_pace,
            pe_home: Vec::new(),
            block_pes: Vec::new(),
        };
        sh.block_pes = (0..blocks_x * blocks_y)
            .map(|p| {
                let (_, _, w, h) = sh.block(p);
                w * h
            })
            .collect();
        sh.pe_home = (0..n_pes).map(|g| sh.home_slow(g)).collect();
        Ok(sh)
    }

    pub fn n_parts(&self) -> u32 {
        self.blocks_x * self.blocks_y
    }

    /// (x0, y0, w, h) of a partition's block.
    fn block(&self, part: u32) -> (u32, u32, u32, u32) {
        let (x0, y0) = ((part % self.blocks_x) * BLOCK, (part / self.blocks_x) * BLOCK);
        (x0, y0, BLOCK.min(self.links.width - x0), BLOCK.min(self.links.height - y0))
    }

    /// The worker that runs a partition: blocks along diagonals alternate, so fronts moving along
    /// rows or columns are split between workers.
    fn worker_of(&self, part: u32, threads: usize) -> usize {
        ((part % self.blocks_x + part / self.blocks_x) as usize) % threads
    }

    /// (partition, local index) of an agent.
    fn home(&self, agent: u32) -> (u32, u32) {
        match self.pe_home.get(agent as usize) {
            Some(&h) => h,
            None => {
                // Ports follow the block's PEs in the partition's agent list.
                let (part, k) = self.port_home[(agent - self.n_pes) as usize];
                (part, self.block_pes[part as usize] + k)
            }
        }
    }

    /// (partition, local index) of PE `agent`, computed.
    fn home_slow(&self, agent: u32) -> (u32, u32) {
        let c = self.links.coord(agent);
        let part = (c.y / BLOCK) * self.blocks_x + c.x / BLOCK;
        let (x0, y0, w, _) = self.block(part);
        (part, (c.y - y0) * w + (c.x - x0))
    }

    /// (partition, local index) of a link.
    fn link_home(&self, l: u32) -> (u32, u32) {
        let n = self.n_pes;
        if l < 4 * n {
            let (part, local) = self.home(l / 4);
            (part, local * 4 + l % 4)
        } else if l < 6 * n {
            let pe = (l - 4 * n) / 2;
            let (part, local) = self.home(pe);
            (part, 4 * self.block_pes[part as usize] + 2 * local + (l - 4 * n) % 2)
        } else {
            // Outgoing port links, then incoming links from peer wafers, per owning partition.
            let np = self.links.ports;
            let (q, incoming) = if l - 6 * n < np { (l - 6 * n, 0) } else { (l - 6 * n - np, 1) };
            let (part, k) = self.port_home[q as usize];
            (part, 6 * self.block_pes[part as usize] + 2 * k + incoming)
        }
    }

    fn pace_of(&self, template: u32, c: ColorId) -> (Pace, bool) {
        if template == u32::MAX {
            return (Pace::FULL, false);
        }
        self.recv_pace[template as usize]
            .iter()
            .find(|(k, _, _, _)| *k == c)
            .map_or((Pace::FULL, false), |(_, p, paced, _)| (*p, *paced))
    }

    /// Whether the consumer of color `c` on a PE running `template` is paced by it, and the wavelets
    /// the PE takes on `c` beyond its router queues before that consumer claims them: one run of the
    /// consumer, or the SRAM the plan left free (a receive FIFO), whichever is larger (`credit.rs`).
    fn consumer_of(&self, template: u32, c: ColorId) -> (bool, u64) {
        if template == u32::MAX {
            return (false, 0);
        }
        self.recv_pace[template as usize]
            .iter()
            .find(|(k, _, _, _)| *k == c)
            .map_or((false, 0), |(_, _, paced, receive)| (*paced, *receive))
    }

    pub fn agent_name(&self, a: u32) -> String {
        if a >= self.n_pes {
            format!("port {}", self.prog.ports[(a - self.n_pes) as usize].name)
        } else {
            let c = self.links.coord(a);
            format!("PE ({},{})", c.x, c.y)
        }
    }
}

/// One stripe of the mesh and everything it owns.
pub(crate) struct Part {
    id: u32,
    agents: Vec<Agent>,
    timelines: Vec<Timeline>,
    queue: RadixQueue<Ev>,
    /// Continuations waiting for their cycle (a slab: `Ev::Cont` holds the index), and free slots.
    conts: Vec<Option<Cont>>,
    free_conts: Vec<u32>,
    /// Continuations for other partitions, produced in this window.
    outbox: Vec<(u32, Cont)>,
    /// Credit messages waiting for their cycle (`Ev::Credit` holds the index), free slots, and those
    /// for other partitions produced in this window.
    credits: Vec<Option<Credit>>,
    free_credits: Vec<u32>,
    credit_out: Vec<(u32, Credit)>,
    /// What the arrivals and holds of each train delivered here share.
    infos: Infos,
    /// Receiver side: trains held per (local agent, color), in the order they were delivered.
    rx_holds: BTreeMap<(u32, ColorId), Vec<PendingHold>>,
    /// Sender side: stalled colors per (local agent, color).
    tx_holds: BTreeMap<(u32, ColorId), SenderHold>,
    /// Local agents whose running task reached its finish while a send of its run was held:
    /// (task, the cycle it would have finished).
    deferred: BTreeMap<u32, (u32, u64)>,
    /// Local IO ports whose held colors were all released: when, and the critical path of the release
    /// (the consumer's late claim), for the port's next task start to carry.
    port_released: BTreeMap<u32, (u64, Path)>,
    now: u64,
    /// The head's exit cycle of each node of the current walk (indexed from its first node).
    walk_out: Vec<u64>,
    scratch: Vec<Node>,
    scratch_size: Vec<u32>,
    scratch_homes: Vec<(u32, u32)>,
    /// Nodes of the last tree expanded.
    last_tree_nodes: usize,
    pub totals: Totals,
    pub stats: Vec<AgentStats>,
    pub hop_unit_cycles: u128,
    pub error: Option<EngineError>,
    /// Trace recording, when asked for.
    pub rec: Option<PartRecorder>,
    /// Values, in functional runs (observes, never steers).
    pub vals: Option<PartValues>,
}

impl Part {
    pub fn new(sh: &Shared, id: u32, trace: Option<&TraceSpec>) -> Part {
        let (x0, y0, w, h) = sh.block(id);
        let mut agents = Vec::with_capacity((w * h) as usize);
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                let g = sh.links.pe(Coord { x, y });
                let t = sh.template_of[g as usize];
                let n_tasks = if t == u32::MAX { 0 } else { sh.prog.templates[t as usize].tasks.len() };
                agents.push(Agent { id: g, template: t, runs_done: smallvec![0; n_tasks], ..Default::default() });
            }
        }
        for (i, p) in sh.prog.ports.iter().enumerate() {
            if sh.port_home[i].0 == id {
                let n_tasks = sh.prog.templates[p.template.0 as usize].tasks.len();
                agents.push(Agent {
                    id: sh.n_pes + i as u32,
                    template: p.template.0,
                    runs_done: smallvec![0; n_tasks],
                    ..Default::default()
                });
            }
        }
        let n_ports_here = agents.len() - (w * h) as usize;
        let n_links = 6 * (w * h) as usize + 2 * n_ports_here;
        let mut queue = RadixQueue::new();
        for (i, a) in agents.iter().enumerate() {
            if a.template != u32::MAX {
                queue.push(0, Ev::Wake(i as u32));
            }
        }
        let n_agents = agents.len();
        Part {
            id,
            agents,
            timelines: vec![Timeline::default(); n_links],
            queue,
            conts: Vec::new(),
            free_conts: Vec::new(),
            outbox: Vec::new(),
            credits: Vec::new(),
            free_credits: Vec::new(),
            credit_out: Vec::new(),
            infos: Infos::default(),
            rx_holds: BTreeMap::new(),
            tx_holds: BTreeMap::new(),
            deferred: BTreeMap::new(),
            port_released: BTreeMap::new(),
            now: 0,
            walk_out: Vec::new(),
            scratch: Vec::new(),
            scratch_size: Vec::new(),
            scratch_homes: Vec::new(),
            last_tree_nodes: 0,
            totals: Totals {
                io_bytes: vec![0; sh.prog.ports.len()],
                io_busy: vec![0; sh.prog.ports.len()],
                ..Totals::default()
            },
            stats: vec![AgentStats::default(); n_agents],
            hop_unit_cycles: 0,
            error: None,
            rec: None,
            vals: None,
        }
        .with_recorder(trace)
    }

    fn with_recorder(mut self, trace: Option<&TraceSpec>) -> Part {
        if let Some(spec) = trace {
            let ids: Vec<u32> = self.agents.iter().map(|a| a.id).collect();
            self.rec = Some(PartRecorder::new(spec, &ids));
        }
        self
    }

    /// Turns on values (a functional run).
    pub fn enable_values(&mut self, setup: Arc<super::values::Setup>) {
        self.vals = Some(PartValues::new(setup, self.agents.len()));
    }

    /// The values the readout PEs of this partition hold at the end of a functional run.
    pub fn value_results(&self, sh: &Shared) -> super::values::Results {
        let locals = self.agents.iter().enumerate().map(|(i, a)| (i, (a.id < sh.n_pes).then(|| sh.links.coord(a.id))));
        match &self.vals {
            Some(v) => v.results(locals),
            None => Vec::new(),
        }
    }

    /// Global id of each local agent.
    pub fn agent_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.agents.iter().map(|a| a.id)
    }

    /// The cycle of this partition's next event.
    pub fn next_time(&mut self) -> Option<u64> {
        self.queue.peek_time()
    }

    /// Takes in credit messages handed over at the end of the last window.
    fn accept_credits(&mut self, credits: Vec<Credit>) {
        for c in credits {
            let t = c.time;
            let idx = self.park_credit(c);
            self.queue.push(t, Ev::Credit(idx));
        }
    }

    fn park_credit(&mut self, c: Credit) -> u32 {
        match self.free_credits.pop() {
            Some(i) => {
                self.credits[i as usize] = Some(c);
                i
            }
            None => {
                self.credits.push(Some(c));
                self.credits.len() as u32 - 1
            }
        }
    }

    /// Takes in continuations handed over at the end of the last window.
    fn accept(&mut self, conts: Vec<Cont>) {
        for c in conts {
            let idx = match self.free_conts.pop() {
                Some(i) => i,
                None => {
                    self.conts.push(None);
                    self.conts.len() as u32 - 1
                }
            };
            let t = c.time;
            self.conts[idx as usize] = Some(c);
            self.queue.push(t, Ev::Cont(idx));
        }
    }

    /// Handles every event at cycle `t`.
    pub fn window(&mut self, sh: &Shared, t: u64) {
        while self.queue.peek_time() == Some(t) {
            let Some((t, ev)) = self.queue.pop() else { break };
            self.now = t;
            self.totals.events += 1;
            // The agent of the next event is most often a cache miss (a wake comes long after the
            // delivery that asked for it): fetch it while this event runs.
            if let Some(Ev::Wake(a) | Ev::Done(a, _)) = self.queue.peek_now() {
                let agent = &self.agents[*a as usize];
                prefetch(&agent.busy_until as *const u64);
                prefetch(&agent.runs_done as *const SmallVec<[u32; 4]>);
                prefetch(&agent.inbox as *const SmallVec<[(ColorId, Inbox); 2]>);
                prefetch(&self.stats[*a as usize] as *const AgentStats);
            }
            let res = match ev {
                Ev::Wake(a) => self.try_start(sh, a),
                Ev::Done(a, k) => self.finish(sh, a, k),
                Ev::Cont(i) => match self.conts[i as usize].take().inspect(|_| self.free_conts.push(i)) {
                    Some(c) => self.walk(sh, &c.train, c.node, c.time, None),
                    None => Ok(()),
                },
                Ev::Credit(i) => match self.credits[i as usize].take().inspect(|_| self.free_credits.push(i)) {
                    Some(c) => self.on_credit(sh, c),
                    None => Ok(()),
                },
            };
            if let Err(e) = res {
                self.error = Some(e);
                return;
            }
        }
    }

    fn template<'p>(&self, sh: &Shared<'p>, a: u32) -> &'p crate::mesh::Template {
        &sh.prog.templates[self.agents[a as usize].template as usize]
    }

    fn is_port(&self, sh: &Shared, a: u32) -> bool {
        self.agents[a as usize].id >= sh.n_pes
    }

    /// Whether run `run` of task `k` of local agent `a` has its needs met now.
    fn ready(&self, sh: &Shared, a: u32, k: usize, run: u64) -> bool {
        let agent = &self.agents[a as usize];
        let task = &self.template(sh, a).tasks[k];
        for need in &task.needs {
            match *need {
                Need::Done { task: u, .. } | Need::After { task: u, .. } => {
                    if (agent.runs_done[u.0 as usize] as u64) < need.runs_needed(run).unwrap_or(0) {
                        return false;
                    }
                }
                Need::Recv { color, wavelets } => {
                    let Some(inbox) = agent.inbox_ref(color) else {
                        return false;
                    };
                    if inbox.delivered < inbox.claimed + wavelets {
                        return false;
                    }
                    let paced = task.work.paced_by == Some(color) && wavelets > 0;
                    let probe = if paced { 0 } else { wavelets.saturating_sub(1) };
                    match inbox.time_of(probe, &self.infos) {
                        Some(at) if at <= self.now => {}
                        _ => return false,
                    }
                }
            }
        }
        true
    }

    /// The earliest future cycle at which some task of agent `a` becomes ready on wavelets that are
    /// already delivered (all its other needs holding), if any.
    fn next_ready_time(&self, sh: &Shared, a: u32) -> Option<u64> {
        let agent = &self.agents[a as usize];
        let tasks = &self.template(sh, a).tasks;
        let mut best: Option<u64> = None;
        'task: for (k, task) in tasks.iter().enumerate() {
            let run = agent.runs_done[k] as u64 + 1;
            if run > task.repeat as u64 {
                continue;
            }
            let mut at = 0u64;
            for need in &task.needs {
                match *need {
                    Need::Recv { color, wavelets } => {
                        let Some(inbox) = agent.inbox_ref(color) else { continue 'task };
                        if inbox.delivered < inbox.claimed + wavelets {
                            continue 'task;
                        }
                        let paced = task.work.paced_by == Some(color) && wavelets > 0;
                        let probe = if paced { 0 } else { wavelets.saturating_sub(1) };
                        match inbox.time_of(probe, &self.infos) {
                            Some(t) => at = at.max(t),
                            None => continue 'task,
                        }
                    }
                    Need::Done { task: u, .. } | Need::After { task: u, .. } => {
                        if (agent.runs_done[u.0 as usize] as u64) < need.runs_needed(run).unwrap_or(0) {
                            continue 'task;
                        }
                    }
                }
            }
            if at > self.now {
                best = Some(best.map_or(at, |b| b.min(at)));
            }
        }
        best
    }

    fn try_start(&mut self, sh: &Shared, a: u32) -> Result<(), EngineError> {
        let agent = &self.agents[a as usize];
        if agent.running || agent.busy_until > self.now || agent.template == u32::MAX {
            return Ok(());
        }
        let tasks = &self.template(sh, a).tasks;
        // An IO port's streams are independent: a held color holds back only the tasks that send on it.
        let port_held = |k: usize| agent.held > 0 && agent.id >= sh.n_pes && self.sends_held(sh, a, k as u32);
        let Some(k) = (0..tasks.len()).find(|&k| {
            let run = agent.runs_done[k] as u64 + 1;
            run <= tasks[k].repeat as u64 && !port_held(k) && self.ready(sh, a, k, run)
        }) else {
            // Nothing is ready now. Wavelets already on their way may make a task ready later without
            // a new delivery (one long train feeding several runs): wake up when the earliest can go.
            if let Some(t) = self.next_ready_time(sh, a) {
                self.queue.push(t, Ev::Wake(a));
            }
            return Ok(());
        };
        let task = &tasks[k];
        let port = self.is_port(sh, a);
        let timing = &sh.prog.timing;
        let start = if port { self.now } else { self.now + timing.pick_cycles as u64 };
        let compute = if port { 0 } else { timing.pe.cycles(task.work.op, task.work.elems) };
        // The critical path to this start: whichever constraint was met last (the PE becoming free,
        // or the wavelet each need waited for), plus the pick.
        let agent = &self.agents[a as usize];
        let mut bind = (agent.busy_until, agent.free_path);
        for need in &task.needs {
            if let Need::Recv { color, wavelets } = *need {
                let paced = task.work.paced_by == Some(color) && wavelets > 0;
                let probe = if paced { 0 } else { wavelets.saturating_sub(1) };
                if let Some(at) = agent.inbox_ref(color).and_then(|i| i.arrival_of(probe, &self.infos)) {
                    if at.0 > bind.0 {
                        bind = at;
                    }
                }
            }
        }
        if port {
            if let Some(r) = self.port_released.remove(&a).filter(|r| r.0 > bind.0) {
                bind = r;
            }
        }
        let start_path = bind.1.add(Res::Compute, start.saturating_sub(bind.0));
        let op_res = if !port && sram_bound(timing, task.work.op) { Res::Sram } else { Res::Compute };
        let mut finish = start + compute;
        let mut finish_path = start_path.add(op_res, compute);
        let mut stall = Metric::StallData;
        let mut claimed: Vec<Vec<Payload>> = Vec::new();
        let mut released: SmallVec<[(ColorId, u64, u64); 1]> = SmallVec::new();
        // Claim this run's wavelets; a paced operand cannot finish before its last wavelet is in.
        for need in &task.needs {
            if let Need::Recv { color, wavelets } = *need {
                let inbox = self.agents[a as usize].inbox(color);
                if self.vals.is_some() {
                    let mut got = Vec::new();
                    inbox.claimed_data(wavelets, &mut got, &self.infos);
                    claimed.push(got);
                }
                if task.work.paced_by == Some(color) && wavelets > 0 {
                    let (last, last_path) =
                        inbox.arrival_of(wavelets - 1, &self.infos).unwrap_or((self.now, start_path));
                    let per = compute.div_ceil(wavelets);
                    if last + per > finish {
                        finish = last + per;
                        finish_path = last_path.add(op_res, per);
                        let io = last_path.0[Res::PerimeterIo as usize] + last_path.0[Res::InterWafer as usize];
                        stall =
                            if io > last_path.0[Res::Fabric as usize] { Metric::StallIo } else { Metric::StallData };
                    }
                    // Wavelets held in the queues reach the task one per pace from its start.
                    if let Some(drain) = held_drain(&self.rx_holds, &self.infos, inbox.holds, a, color, wavelets) {
                        if start + drain > finish {
                            finish = start + drain;
                            finish_path = start_path.add(Res::Fabric, drain);
                            stall = Metric::StallData;
                        }
                    }
                }
                let before = inbox.claimed;
                inbox.claim(wavelets, &mut self.infos);
                if inbox.holds > 0 {
                    released.push((color, before, inbox.claimed));
                }
            }
        }
        for (color, before, after) in released {
            self.release_holds(sh, a, color, before, after, start, start_path);
        }
        self.agents[a as usize].run_path = start_path;
        let run = self.agents[a as usize].runs_done[k] + 1;
        if self.vals.is_some() {
            self.values_start(sh, a, k, run, claimed)?;
        }
        for (i, s) in task.sends.iter().enumerate() {
            if s.streamed && s.wavelets > 0 && s.runs.is_none_or(|r| r.contains(run)) {
                let pace = if compute > 0 { Pace::new(compute, s.wavelets).max(Pace::FULL) } else { Pace::FULL };
                let data = self.vals.as_ref().and_then(|v| v.payload(a as usize, i));
                let tail = self.send(sh, a, s.color, s.wavelets, pace, start, data)?;
                if tail > finish {
                    finish_path = start_path.add(Res::Fabric, tail - start);
                    finish = tail;
                    stall = Metric::StallBackpressure;
                }
            }
        }
        let st = &mut self.stats[a as usize];
        st.busy += compute;
        st.stalled += finish - start - compute;
        st.runs += 1;
        st.first_start = st.first_start.min(start);
        st.last_finish = st.last_finish.max(finish);
        if let Some(rec) = self.rec.as_mut() {
            rec.add(a, Metric::Compute, start, compute, 1);
            rec.add(a, stall, start + compute, finish - start - compute, 1);
            let agent = self.agents[a as usize].id;
            rec.span(a, Span { agent, task: k as u32, start, finish, compute });
        }
        let agent = &mut self.agents[a as usize];
        agent.running = true;
        agent.busy_until = finish;
        agent.run_path = finish_path;
        self.queue.push(finish, Ev::Done(a, k as u32));
        Ok(())
    }

    fn finish(&mut self, sh: &Shared, a: u32, k: u32) -> Result<(), EngineError> {
        let task = &self.template(sh, a).tasks[k as usize];
        if self.agents[a as usize].held > 0 && !self.is_port(sh, a) && self.sends_held(sh, a, k) {
            // A send of this run cannot drain: the task finishes when its holds are released.
            self.deferred.entry(a).or_insert((k, self.now));
            return Ok(());
        }
        if let Some((_, due)) = self.deferred.remove(&a) {
            self.stretch(a, k, due);
        }
        {
            let agent = &mut self.agents[a as usize];
            agent.running = false;
            agent.runs_done[k as usize] += 1;
            agent.free_path = agent.run_path;
        }
        if !self.is_port(sh, a) {
            self.totals.flops += task.flops;
            self.stats[a as usize].flops += task.flops;
        }
        let run = self.agents[a as usize].runs_done[k as usize];
        for (i, s) in task.sends.iter().enumerate() {
            if !s.streamed && s.wavelets > 0 && s.runs.is_none_or(|r| r.contains(run)) {
                let data = self.vals.as_ref().and_then(|v| v.payload(a as usize, i));
                self.send(sh, a, s.color, s.wavelets, Pace::FULL, self.now, data)?;
            }
        }
        self.try_start(sh, a)
    }

    /// The route local agent `a` uses for color `c`.
    fn route(&mut self, sh: &Shared, a: u32, c: ColorId) -> Result<u32, EngineError> {
        let agent = &self.agents[a as usize];
        if let Some((_, r)) = agent.routes.iter().find(|(k, _)| *k == c) {
            return Ok(*r);
        }
        let g = agent.id;
        let found = if g >= sh.n_pes {
            sh.port_routes[(g - sh.n_pes) as usize].iter().find(|(k, _)| *k == c).map(|(_, r)| *r)
        } else {
            let at = sh.links.coord(g);
            sh.routes_by_row.get(c.0 as usize).and_then(|rows| rows.get(at.y as usize)).and_then(|spans| {
                // The last span starting at or before x, if it reaches x.
                let i = spans.partition_point(|s| s.0 <= at.x);
                spans[..i].iter().rev().find(|s| at.x < s.1).map(|s| s.2)
            })
        };
        let Some(r) = found else {
            return Err(EngineError::Program(format!(
                "{} sends on color {c} but no route covers it",
                sh.agent_name(g)
            )));
        };
        self.agents[a as usize].routes.push((c, r));
        Ok(r)
    }

    /// Sends a train from local agent `a`; returns the cycle its tail has left the sender.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        sh: &Shared,
        a: u32,
        c: ColorId,
        n: u64,
        mut pace: Pace,
        t: u64,
        data: Option<Payload>,
    ) -> Result<u64, EngineError> {
        let r = self.route(sh, a, c)?;
        let route = sh.prog.routes[r as usize];
        let timing = &sh.prog.timing;
        let g = self.agents[a as usize].id;
        let path = self.agents[a as usize].run_path;
        // The train's pace is the slowest of: the sender (a compute-paced stream), the ports it
        // crosses, its paced consumers (backpressure), and the link; its serialisation is charged to
        // whichever that is.
        let mut tail_res = if pace == Pace::FULL { Res::Fabric } else { Res::Compute };
        let mut slower = |pace: &mut Pace, p: Pace, res: Res| {
            if p.max(*pace) != *pace {
                *pace = p;
                tail_res = res;
            }
        };
        let (entry, root_link, root_latency, root_cap, transit_res) = if g >= sh.n_pes {
            let p = (g - sh.n_pes) as usize;
            let port = &sh.prog.ports[p];
            let res = port_res(port.peer);
            slower(&mut pace, sh.port_pace[p], res);
            (port.at, sh.links.port(p as u32), port.latency_cycles, sh.port_cap[p], res)
        } else {
            (sh.links.coord(g), sh.links.up_ramp(g), timing.ramp_cycles as u64, UNIT, Res::Fabric)
        };
        let cached = self.agents[a as usize].trees.iter().find(|(k, _)| *k == r).map(|(_, t)| Arc::clone(t));
        let tree = match cached {
            Some(t) => t,
            None => {
                let mut t = self.expand_tree(sh, g, c, route.pattern, entry)?;
                let size = t.nodes.len() as u64;
                // Keep it for the next train while the cache has room (never trees of one node: cheap).
                let keep = size > 1
                    && sh
                        .tree_room
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |room| room.checked_sub(size))
                        .is_ok();
                if keep {
                    // The cache counts nodes, so a kept tree gives back the room of the scratch vectors it
                    // was built in (which a larger tree before it may have grown).
                    t.nodes.shrink_to_fit();
                    t.size.shrink_to_fit();
                    t.homes.shrink_to_fit();
                }
                let t = Arc::new(t);
                if keep {
                    self.agents[a as usize].trees.push((r, Arc::clone(&t)));
                }
                t
            }
        };
        if let Some((p, res)) = tree.consumer_pace {
            slower(&mut pace, p, res);
        }
        let transit_res = match route.pattern {
            crate::mesh::Pattern::ToPort { port } => port_res(sh.prog.ports[port.0 as usize].peer),
            _ => transit_res,
        };
        let len = pace.cycles(n);
        let units = pace.units();
        let head = t + route.relays as u64 * timing.relay_cycles as u64;
        let (_, root_local) = sh.link_home(root_link);
        let start = self.timelines[root_local as usize].reserve(head, len, units, root_cap, self.now);
        if let Some(rec) = self.rec.as_mut() {
            rec.add(a, Metric::Send, start, len, units);
        }
        self.totals.wavelets_sent += n;
        self.totals.relays += route.relays as u64;
        if g >= sh.n_pes {
            self.totals.io_bytes[(g - sh.n_pes) as usize] += n * 4;
            self.totals.io_busy[(g - sh.n_pes) as usize] += len;
        }
        let train = Arc::new(Train {
            sender: g,
            color: c,
            n,
            pace,
            len,
            units,
            tree,
            path,
            sent: t,
            transit_res,
            tail_res,
            data,
        });
        self.walk(sh, &train, 0, start + root_latency, Some(start + root_latency))?;
        // Keep the allocation for the next train when nobody else holds the tree.
        if let Ok(t) = Arc::try_unwrap(train) {
            if let Ok(tree) = Arc::try_unwrap(t.tree) {
                self.scratch = tree.nodes;
                self.scratch_size = tree.size;
                self.scratch_homes = tree.homes;
            }
        }
        Ok(start + len)
    }

    /// Expands the route tree of global agent `g` sending on color `c` with `pattern` from `entry`.
    fn expand_tree(
        &mut self,
        sh: &Shared,
        g: u32,
        c: ColorId,
        pattern: crate::mesh::Pattern,
        entry: Coord,
    ) -> Result<Tree, EngineError> {
        let mut nodes = std::mem::take(&mut self.scratch);
        // A tree a continuation still holds does not come back as scratch: size the new vector as the
        // last tree was, rather than grow it node by node (3.3% of a llama-3-8b decode's instructions).
        nodes.reserve(self.last_tree_nodes);
        expand(&sh.links, entry, pattern, &sh.prog.ports, &mut nodes).map_err(|e| {
            EngineError::Program(format!(
                "{}: the route of color {c} ({:?}) leaves the mesh at ({},{})",
                sh.agent_name(g),
                pattern,
                e.at.x,
                e.at.y
            ))
        })?;
        self.last_tree_nodes = nodes.len();
        let mut consumer_pace: Option<(Pace, Res)> = None;
        let mut slower = |p: Pace, res: Res| match consumer_pace {
            Some((q, _)) if p.max(q) == q => {}
            _ => consumer_pace = Some((p, res)),
        };
        for node in &nodes {
            match node.deliver {
                Deliver::Pe(d) => slower(sh.pace_of(sh.template_of[d as usize], c).0, Res::Compute),
                Deliver::Port(p) | Deliver::PortIn(p) => {
                    slower(sh.port_pace[p as usize], port_res(sh.prog.ports[p as usize].peer))
                }
                Deliver::Hop => {}
            }
        }
        let mut size = std::mem::take(&mut self.scratch_size);
        if !subtree_sizes(&nodes, &mut size) {
            return Err(EngineError::Invariant(format!(
                "{}: the route tree of color {c} ({pattern:?}) is not in pre-order",
                sh.agent_name(g)
            )));
        }
        let mut homes = std::mem::take(&mut self.scratch_homes);
        homes.clear();
        homes.extend(nodes.iter().map(|n| sh.link_home(n.link)));
        Ok(Tree { nodes, size, homes, consumer_pace })
    }

    /// Continues a train from node `first` (head entering at `first_in`), over the links this partition
    /// owns; heads that cross into another partition are handed over. `root_in`: for the sender's walk,
    /// the head time at the entry router (every node whose parent is the root starts there).
    fn walk(
        &mut self,
        sh: &Shared,
        train: &Arc<Train>,
        first: u32,
        first_in: u64,
        root_in: Option<u64>,
    ) -> Result<(), EngineError> {
        let tree = &*train.tree;
        let nodes = &tree.nodes;
        // This partition's part of the tree, depth first: in pre-order, node `first`'s subtree is the
        // index range `lo..hi`, a node's head arrives when its parent's leaves (`out`), and a subtree
        // in another partition is handed over whole and skipped.
        let (lo, hi) = match root_in {
            Some(_) => (0, nodes.len()),
            None => (first as usize, first as usize + tree.size[first as usize] as usize),
        };
        let mut out_at = std::mem::take(&mut self.walk_out);
        out_at.clear();
        out_at.resize(hi - lo, 0);
        let timing = &sh.prog.timing;
        let mut info: Option<u32> = None;
        // The timelines of the next few owned nodes are known before their reservations: fetching
        // them ahead overlaps the cache misses that dominate `Timeline::reserve` on a full wafer (a
        // million links' timelines).
        let homes = &tree.homes;
        let (mut ahead, mut ahead_steps) = (lo, lo);
        let mut i = lo;
        while i < hi {
            let node = nodes[i];
            let t_in = if i == lo && root_in.is_none() {
                first_in
            } else if node.parent == ROOT {
                root_in.unwrap_or(first_in)
            } else {
                out_at[node.parent as usize - lo]
            };
            let (owner, local) = homes[i];
            let horizon = (i + PREFETCH_NODES).min(hi);
            while ahead < horizon {
                let (o, l) = homes[ahead];
                if o == self.id {
                    prefetch(&self.timelines[l as usize] as *const Timeline);
                }
                ahead += 1;
            }
            let horizon = (i + PREFETCH_STEPS).min(hi);
            while ahead_steps < horizon {
                let (o, l) = homes[ahead_steps];
                if o == self.id {
                    self.timelines[l as usize].prefetch_steps();
                }
                ahead_steps += 1;
            }
            if owner != self.id {
                self.outbox.push((owner, Cont { time: t_in, train: Arc::clone(train), node: i as u32 }));
                i += tree.size[i] as usize;
                continue;
            }
            let (cap, latency) = match node.deliver {
                Deliver::Hop => (UNIT, timing.hop_cycles as u64),
                Deliver::Pe(_) => (UNIT, timing.ramp_cycles as u64),
                Deliver::Port(p) | Deliver::PortIn(p) => {
                    (sh.port_cap[p as usize], sh.prog.ports[p as usize].latency_cycles)
                }
            };
            let s = self.timelines[local as usize].reserve(t_in, train.len, train.units, cap, self.now);
            let out = s + latency;
            if let Some(rec) = self.rec.as_mut() {
                let (metric, agent) = match node.deliver {
                    Deliver::Hop => (Metric::Fabric, local / 4),
                    Deliver::Pe(d) => (Metric::Receive, sh.home(d).1),
                    Deliver::Port(p) | Deliver::PortIn(p) => (Metric::Receive, sh.home(sh.n_pes + p).1),
                };
                rec.add(agent, metric, s, train.len, train.units);
            }
            out_at[i - lo] = out;
            // The train's share of its arrivals here, made at its first delivery in this walk.
            let mut shared_info = |infos: &mut Infos| *info.get_or_insert_with(|| infos.intern(train));
            match node.deliver {
                Deliver::Hop => {
                    self.totals.wavelet_hops += train.n;
                    self.hop_unit_cycles += train.len as u128 * train.units as u128;
                }
                Deliver::Pe(d) => {
                    // The down ramp's local index is 4 * (PEs of the block) + 2 * (the PE's) + 1.
                    let pe = (local - 4 * sh.block_pes[self.id as usize]) / 2;
                    debug_assert_eq!(sh.home(d), (self.id, pe));
                    let k = shared_info(&mut self.infos);
                    if self.deliver(sh, d, pe, train, k, out)? {
                        self.hold_if_full(sh, pe, d, train, k, i);
                    }
                }
                Deliver::Port(p) => {
                    self.totals.io_bytes[p as usize] += train.n * 4;
                    self.totals.io_busy[p as usize] += train.len;
                    // A port with a peer wafer forwards the train; it consumes nothing itself.
                    if sh.prog.ports[p as usize].peer_port.is_none() {
                        let k = shared_info(&mut self.infos);
                        let g = sh.n_pes + p;
                        let _ = self.deliver(sh, g, sh.home(g).1, train, k, out)?;
                    }
                }
                Deliver::PortIn(q) => {
                    // Counted where the data crosses the port: when the peer port injects it.
                    let link = Train { color: ColorId::LINK, ..train.clone_header() };
                    let k = self.infos.intern(&link);
                    let g = sh.n_pes + q;
                    let _ = self.deliver(sh, g, sh.home(g).1, &link, k, out)?;
                }
            }
            i += 1;
        }
        self.walk_out = out_at;
        Ok(())
    }

    /// Adds a train's arrival (sharing info slot `info`) to agent `d` (local index `local`)'s inbox and
    /// wakes it; returns whether the arrivals it has not claimed may exceed its buffering (then
    /// `hold_if_full` decides).
    fn deliver(
        &mut self,
        sh: &Shared,
        d: u32,
        local: u32,
        train: &Train,
        info: u32,
        head: u64,
    ) -> Result<bool, EngineError> {
        let (c, n, pace) = (train.color, train.n, train.pace);
        let agent = &mut self.agents[local as usize];
        if agent.template == u32::MAX {
            return Err(EngineError::Program(format!(
                "a train on color {c} is delivered to {}, which runs nothing",
                sh.agent_name(d)
            )));
        }
        let inbox = agent.inbox(c);
        inbox.add(Arrival { head, info }, n);
        self.infos.retain(info);
        let unclaimed = inbox.delivered.saturating_sub(inbox.claimed);
        self.totals.wavelets_delivered += n;
        // Wake the receiver when its consumer of this color can start: at the head for a paced
        // consumer, at the tail otherwise.
        let (paced, receive) = sh.consumer_of(agent.template, c);
        let paced = d < sh.n_pes && paced;
        let at = if paced { head } else { head + pace.offset(n - 1) };
        self.queue.push(at, Ev::Wake(local));
        // Even a path of no hops buffers this much.
        Ok(unclaimed > receive + 2 * sh.prog.timing.queue_depth as u64)
    }

    /// Functional runs: runs the values kernel of task `k` of local agent `a` on what it claimed.
    fn values_start(
        &mut self,
        sh: &Shared,
        a: u32,
        k: usize,
        run: u32,
        claimed: Vec<Vec<Payload>>,
    ) -> Result<(), EngineError> {
        let g = self.agents[a as usize].id;
        let template = self.agents[a as usize].template as usize;
        let coord = if g >= sh.n_pes { sh.prog.ports[(g - sh.n_pes) as usize].at } else { sh.links.coord(g) };
        let t = &sh.prog.templates[template];
        let at =
            At { id: g, coord, template, k, run: run as u64, task: &t.tasks[k], sram_bytes: sh.prog.timing.sram_bytes };
        match self.vals.as_mut() {
            Some(v) => v.start(a as usize, &at, claimed).map_err(EngineError::Values),
            None => Ok(()),
        }
    }

    /// Tasks that did not run all their runs: (global agent id, what it waits for).
    pub fn blocked(&self, sh: &Shared) -> Vec<(u32, Blocked)> {
        let mut out = Vec::new();
        for (i, agent) in self.agents.iter().enumerate() {
            if agent.template == u32::MAX {
                continue;
            }
            let tasks = &self.template(sh, i as u32).tasks;
            let deferred = self.deferred.get(&(i as u32)).map(|&(k, _)| k as usize);
            if let Some(k) = deferred.or_else(|| (0..tasks.len()).find(|&k| agent.runs_done[k] < tasks[k].repeat)) {
                out.push((
                    agent.id,
                    Blocked {
                        agent: sh.agent_name(agent.id),
                        task: tasks[k].name.clone(),
                        run: agent.runs_done[k] + 1,
                        waits_for: self.waits_for(sh, i as u32, k),
                        held: !self.holds_of(sh, i as u32).is_empty(),
                    },
                ));
            }
        }
        out
    }

    /// The first delivery nobody consumed, if any.
    pub fn unconsumed(&self, sh: &Shared) -> Option<String> {
        for agent in &self.agents {
            for (c, inbox) in &agent.inbox {
                if inbox.delivered != inbox.claimed {
                    return Some(format!(
                        "{} received {} wavelets on color {c} but its tasks consumed {}",
                        sh.agent_name(agent.id),
                        inbox.delivered,
                        inbox.claimed
                    ));
                }
            }
        }
        None
    }

    fn waits_for(&self, sh: &Shared, a: u32, k: usize) -> Vec<String> {
        let agent = &self.agents[a as usize];
        let tasks = &self.template(sh, a).tasks;
        let run = agent.runs_done[k] as u64 + 1;
        let mut out = self.holds_of(sh, a);
        if self.deferred.contains_key(&a) {
            // The run has started; only its sends are left.
            return out;
        }
        for need in &tasks[k].needs {
            match *need {
                Need::Done { task: TaskIdx(u), .. } | Need::After { task: TaskIdx(u), .. } => {
                    let have = agent.runs_done[u as usize] as u64;
                    let want = need.runs_needed(run).unwrap_or(0);
                    if have < want {
                        out.push(format!("task {} to finish {want} runs (done {have})", tasks[u as usize].name));
                    }
                }
                Need::Recv { color, wavelets } => {
                    let (have, claimed) = agent.inbox_ref(color).map_or((0, 0), |i| (i.delivered, i.claimed));
                    if have < claimed + wavelets {
                        out.push(format!("{wavelets} wavelets on color {color} (has {} unclaimed)", have - claimed));
                    } else if let Some(i) = agent.inbox_ref(color) {
                        out.push(format!(
                            "[ready? color {color}: {} delivered, {} claimed, next at {:?}, last at {:?}, busy until {}]",
                            i.delivered,
                            i.claimed,
                            i.time_of(0, &self.infos),
                            i.time_of(wavelets - 1, &self.infos),
                            agent.busy_until
                        ));
                    }
                }
            }
        }
        out
    }

    /// (cycle, agent id, critical path) of the latest task finish in this partition.
    pub fn last_finish(&self) -> Option<(u64, u32, Path)> {
        self.agents
            .iter()
            .filter(|a| a.template != u32::MAX && a.runs_done.iter().any(|&r| r > 0))
            .map(|a| (a.busy_until, a.id, a.free_path))
            .max_by(|x, y| x.0.cmp(&y.0).then(y.1.cmp(&x.1)))
    }

    /// Agent statistics with their global ids.
    pub fn agent_stats(&self) -> impl Iterator<Item = (u32, AgentStats)> + '_ {
        self.agents.iter().zip(&self.stats).map(|(a, s)| (a.id, *s))
    }
}

/// Backpressure (the model is in `credit.rs`): holds at the receiver, credits to the sender.
impl Part {
    /// At a delivery to local PE `local` (global `d`) by node `node` of the train's tree: if the
    /// train's tail does not fit into what the consumer has claimed plus the path's buffer, hold the
    /// train and tell its sender.
    fn hold_if_full(&mut self, sh: &Shared, local: u32, d: u32, train: &Train, info: u32, node: usize) {
        if d >= sh.n_pes || d == train.sender || train.color == ColorId::LINK {
            return;
        }
        let c = train.color;
        let agent = &mut self.agents[local as usize];
        let receive = sh.consumer_of(agent.template, c).1;
        let queue_depth = sh.prog.timing.queue_depth;
        let inbox = agent.inbox(c);
        // Router-to-router hops from the sender (parents come before their children).
        let nodes = &train.tree.nodes;
        let (mut hops, mut i) = (0u32, node);
        while let Some(n) = nodes.get(i) {
            hops += u32::from(n.deliver == Deliver::Hop);
            i = n.parent as usize;
        }
        let buffer = path_buffer(queue_depth, hops, receive);
        if inbox.delivered <= inbox.claimed + buffer {
            return;
        }
        inbox.holds += 1;
        let hold = PendingHold { threshold: inbox.delivered - buffer, sender: train.sender, info };
        self.infos.retain(info);
        self.rx_holds.entry((local, c)).or_default().push(hold);
        let credit = Credit { time: self.now, agent: train.sender, color: c, kind: CreditKind::Hold { receiver: d } };
        self.post_credit(sh, credit);
    }

    /// After local agent `a` claimed color `c` from `before` to `after` wavelets, in a task starting at
    /// `at` on `path`: releases the holds whose tails now fit, oldest first.
    #[allow(clippy::too_many_arguments)]
    fn release_holds(&mut self, sh: &Shared, a: u32, c: ColorId, before: u64, after: u64, at: u64, path: Path) {
        let Some(list) = self.rx_holds.get_mut(&(a, c)) else { return };
        let mut out: SmallVec<[Credit; 1]> = SmallVec::new();
        let mut done: SmallVec<[u32; 1]> = SmallVec::new();
        let infos = &self.infos;
        list.retain(|h| {
            let t = infos.get(h.info);
            match h.release((t.n, t.pace, t.tail_res), before, after, at, path) {
                Some((tail, path)) => {
                    out.push(Credit {
                        time: tail,
                        agent: h.sender,
                        color: c,
                        kind: CreditKind::Release { tail, path },
                    });
                    done.push(h.info);
                    false
                }
                None => true,
            }
        });
        if list.is_empty() {
            self.rx_holds.remove(&(a, c));
        }
        for i in done {
            self.infos.release(i);
        }
        self.agents[a as usize].inbox(c).holds -= out.len() as u32;
        for credit in out {
            self.post_credit(sh, credit);
        }
    }

    /// Delivers a credit message: here (at once if it is due, else as an event) or to the sender's
    /// partition, no earlier than the next window.
    fn post_credit(&mut self, sh: &Shared, c: Credit) {
        let (part, _) = sh.home(c.agent);
        if part != self.id {
            self.credit_out.push((part, Credit { time: c.time.max(self.now + 1), ..c }));
        } else if c.time <= self.now {
            // Only holds are due at once; applying one schedules nothing.
            let _ = self.on_credit(sh, c);
        } else {
            let t = c.time;
            let idx = self.park_credit(c);
            self.queue.push(t, Ev::Credit(idx));
        }
    }

    /// A credit message for a local sender takes effect.
    fn on_credit(&mut self, sh: &Shared, c: Credit) -> Result<(), EngineError> {
        let (_, a) = sh.home(c.agent);
        let key = (a, c.color);
        let entry = self.tx_holds.entry(key).or_default();
        entry.apply(c.kind);
        let (count, release_at, release_path) = (entry.count, entry.release_at, entry.release_path);
        let delta = match c.kind {
            CreditKind::Hold { .. } => 1,
            CreditKind::Release { .. } => -1,
        };
        self.agents[a as usize].held += delta;
        if count != 0 {
            return Ok(());
        }
        self.tx_holds.remove(&key);
        if self.is_port(sh, a) {
            // A port's task waits for the release: its path runs through the consumer's late claim,
            // not through the port (which computes nothing).
            self.port_released.insert(a, (release_at.min(self.now), release_path));
            self.queue.push(self.now, Ev::Wake(a));
        }
        if let Some(&(k, due)) = self.deferred.get(&a) {
            if !self.sends_held(sh, a, k) {
                // The stalled send drains by the release: the run finishes then, on its path.
                let agent = &mut self.agents[a as usize];
                if release_at > due {
                    agent.run_path = release_path;
                }
                self.queue.push(self.now, Ev::Done(a, k));
            }
        }
        Ok(())
    }

    /// Whether a send of the current run of task `k` of local agent `a` is on a held color.
    fn sends_held(&self, sh: &Shared, a: u32, k: u32) -> bool {
        let run = self.agents[a as usize].runs_done[k as usize] + 1;
        self.template(sh, a).tasks[k as usize].sends.iter().any(|s| {
            s.wavelets > 0
                && s.runs.is_none_or(|r| r.contains(run))
                && self.tx_holds.get(&(a, s.color)).is_some_and(|h| h.count > 0)
        })
    }

    /// A run of task `k` of local agent `a` that was due at `due` finishes now, stalled since.
    fn stretch(&mut self, a: u32, k: u32, due: u64) {
        let now = self.now;
        let extra = now.saturating_sub(due);
        let st = &mut self.stats[a as usize];
        st.stalled += extra;
        st.last_finish = st.last_finish.max(now);
        let agent = &mut self.agents[a as usize];
        agent.busy_until = agent.busy_until.max(now);
        let g = agent.id;
        if let Some(rec) = self.rec.as_mut() {
            rec.add(a, Metric::StallBackpressure, due, extra, 1);
            if let Some(s) = rec.spans.iter_mut().rev().find(|s| s.agent == g && s.task == k) {
                s.finish = s.finish.max(now);
            }
        }
    }

    /// What local agent `a`'s stalled sends wait for, for deadlock reports.
    fn holds_of(&self, sh: &Shared, a: u32) -> Vec<String> {
        self.tx_holds
            .range((a, ColorId(0))..=(a, ColorId(u32::MAX)))
            .filter(|(_, h)| h.count > 0)
            .map(|((_, c), h)| {
                format!(
                    "its sends on color {c} to drain ({} train(s) held at {}, whose queues are full until a task there consumes {c})",
                    h.count,
                    sh.agent_name(h.receiver)
                )
            })
            .collect()
    }
}

/// Cycles a paced run of `wavelets` on color `c` of local agent `a` takes to drain them from the
/// queues while trains of that color are held there (the slowest held train's pace); None if none is.
fn held_drain(
    rx_holds: &BTreeMap<(u32, ColorId), Vec<PendingHold>>,
    infos: &Infos,
    holds: u32,
    a: u32,
    c: ColorId,
    wavelets: u64,
) -> Option<u64> {
    if holds == 0 {
        return None;
    }
    rx_holds.get(&(a, c))?.iter().map(|h| infos.get(h.info).pace).reduce(Pace::max).map(|p| p.cycles(wavelets))
}

/// What a port's transit is spent on.
fn port_res(peer: crate::mesh::Peer) -> Res {
    match peer {
        crate::mesh::Peer::Wafer(_) => Res::InterWafer,
        _ => Res::PerimeterIo,
    }
}

/// Whether an op runs below its SIMD width because of the SRAM ports.
fn sram_bound(timing: &crate::mesh::Timing, op: crate::hw::SimdOp) -> bool {
    let (n, per) = timing.pe.rate(op);
    (n as u128) < (timing.pe.simd.width(op) as u128) * (per as u128)
}

/// A sense-reversing barrier for the window loop: waiters spin briefly (a window is one cycle, so
/// waits are usually short), then sleep on a condition variable, so a loaded machine that deschedules
/// one worker does not leave the others burning their time slices.
struct SpinBarrier {
    n: usize,
    count: AtomicUsize,
    sense: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    cv: std::sync::Condvar,
}

/// Active partitions a window needs before worker 0 wakes the other workers for it.
const PARALLEL_MIN_ACTIVE: usize = 6;

/// Spins before a waiter sleeps.
const BARRIER_SPINS: u32 = 1 << 11;

impl SpinBarrier {
    fn new(n: usize) -> SpinBarrier {
        SpinBarrier {
            n,
            count: AtomicUsize::new(0),
            sense: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cv: std::sync::Condvar::new(),
        }
    }

    fn wait(&self, local_sense: &mut bool) {
        *local_sense = !*local_sense;
        let want = *local_sense;
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.count.store(0, Ordering::Release);
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.sense.store(want, Ordering::Release);
            if self.sleepers.load(Ordering::Acquire) > 0 {
                self.cv.notify_all();
            }
            return;
        }
        for _ in 0..BARRIER_SPINS {
            if self.sense.load(Ordering::Acquire) == want {
                return;
            }
            std::hint::spin_loop();
        }
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_add(1, Ordering::AcqRel);
        while self.sense.load(Ordering::Acquire) != want {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        self.sleepers.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock(c: &Mutex<Part>) -> std::sync::MutexGuard<'_, Part> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// `with(i, f)` runs `f` on partition `i`, however the caller holds the partitions.
type WithPart<'a> = dyn FnMut(usize, &mut dyn FnMut(&mut Part)) + 'a;

/// The window loop's bookkeeping: each partition's next event cycle (written by whoever ran it), and,
/// kept by the coordinator between windows, a heap of (next cycle, partition) and the partitions
/// active in the current window.
struct Board {
    /// Shared with the workers, who write their partitions' next cycles during a window.
    next: Arc<Vec<AtomicU64>>,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(u64, u32)>>,
    /// Partitions with events in the current window, in partition order.
    active: Vec<u32>,
}

impl Board {
    fn new(parts: &mut [Part]) -> Board {
        let next: Vec<AtomicU64> =
            parts.iter_mut().map(|p| AtomicU64::new(p.next_time().unwrap_or(u64::MAX))).collect();
        let mut heap = std::collections::BinaryHeap::new();
        for (i, n) in next.iter().enumerate() {
            let t = n.load(Ordering::Relaxed);
            if t != u64::MAX {
                heap.push(std::cmp::Reverse((t, i as u32)));
            }
        }
        Board { next: Arc::new(next), heap, active: Vec::new() }
    }

    /// Picks the next window: its cycle, with `active` set to the partitions that have events then.
    fn advance(&mut self) -> Option<u64> {
        self.active.clear();
        let mut window = None;
        while let Some(&std::cmp::Reverse((t, p))) = self.heap.peek() {
            // Entries whose partition has since moved are stale.
            if self.next[p as usize].load(Ordering::Acquire) != t {
                self.heap.pop();
                continue;
            }
            match window {
                None => window = Some(t),
                Some(w) if w != t => break,
                _ => {}
            }
            self.heap.pop();
            if self.active.last() != Some(&p) {
                self.active.push(p);
            }
        }
        self.active.sort_unstable();
        self.active.dedup();
        window
    }

    /// Runs partition `i`'s window at `t` and records its next event cycle.
    fn run(&self, sh: &Shared, i: usize, part: &mut Part, t: u64) {
        part.window(sh, t);
        self.next[i].store(part.next_time().unwrap_or(u64::MAX), Ordering::Release);
    }

    /// Between windows: the first error in partition order, the hand-over of continuations in
    /// (source partition, emission) order, and the heap updated for every partition touched.
    /// `with(i, f)` runs `f` on partition `i`.
    fn settle(&mut self, with: &mut WithPart) -> Result<(), EngineError> {
        let mut inbound: Vec<(u32, Vec<Cont>, Vec<Credit>)> = Vec::new();
        let mut error = None;
        for &i in &self.active {
            with(i as usize, &mut |p: &mut Part| {
                if let Some(e) = p.error.take() {
                    error.get_or_insert(e);
                }
                for (dest, c) in p.outbox.drain(..) {
                    match inbound.iter_mut().find(|(d, _, _)| *d == dest) {
                        Some((_, v, _)) => v.push(c),
                        None => inbound.push((dest, vec![c], Vec::new())),
                    }
                }
                for (dest, c) in p.credit_out.drain(..) {
                    match inbound.iter_mut().find(|(d, _, _)| *d == dest) {
                        Some((_, _, v)) => v.push(c),
                        None => inbound.push((dest, Vec::new(), vec![c])),
                    }
                }
            });
            if let Some(e) = error.take() {
                return Err(e);
            }
        }
        for &i in &self.active {
            let t = self.next[i as usize].load(Ordering::Acquire);
            if t != u64::MAX {
                self.heap.push(std::cmp::Reverse((t, i)));
            }
        }
        for (dest, conts, credits) in inbound {
            let mut conts = Some((conts, credits));
            let next = &self.next;
            with(dest as usize, &mut |p: &mut Part| {
                if let Some((c, k)) = conts.take() {
                    p.accept(c);
                    p.accept_credits(k);
                }
                next[dest as usize].store(p.next_time().unwrap_or(u64::MAX), Ordering::Release);
            });
            let t = self.next[dest as usize].load(Ordering::Acquire);
            if t != u64::MAX {
                self.heap.push(std::cmp::Reverse((t, dest)));
            }
        }
        Ok(())
    }
}

/// What a run that outgrew the host's memory (`memory::Guard`) reports.
fn memory_message(cycle: u64, rss: u64, limit: u64, values: bool, pes: u32) -> String {
    let gb = |b: u64| {
        if b >= 10_000_000_000 {
            format!("{:.1} GB", b as f64 / 1e9)
        } else {
            format!("{} MB", b / 1_000_000)
        }
    };
    let hint = if values {
        format!(
            "; a functional run keeps every value each PE stores, and on {pes} PEs that outgrows this host: use a \
             smaller --mesh or fewer tokens (--seq), or run without --functional"
        )
    } else {
        String::new()
    };
    format!(
        "the emulation stopped at cycle {cycle}: it holds {} of memory, over the limit of {} (--max-memory; by \
         default 90% of the memory this machine had available){hint}",
        gb(rss),
        gb(limit)
    )
}

/// Runs all partitions to completion with `threads` worker threads; returns the last event's cycle.
pub(crate) fn run_parts(
    sh: &Shared,
    parts: &mut Vec<Part>,
    threads: usize,
    progress: Option<&AtomicU64>,
) -> Result<u64, EngineError> {
    let publish = |t: u64| {
        if let Some(p) = progress {
            p.store(t, Ordering::Relaxed);
        }
    };
    let threads = threads.clamp(1, parts.len().max(1));
    let mut guard = super::memory::Guard::new();
    let values = parts.iter().any(|p| p.vals.is_some());
    let pes = sh.n_pes;
    let outgrown = |t: u64, (rss, limit): (u64, u64)| EngineError::Memory(memory_message(t, rss, limit, values, pes));
    let mut board = Board::new(parts);
    if threads == 1 {
        let mut end = 0;
        while let Some(t) = board.advance() {
            end = t;
            publish(t);
            for &i in &board.active {
                board.run(sh, i as usize, &mut parts[i as usize], t);
            }
            board.settle(&mut |i, f| f(&mut parts[i]))?;
            guard.check().map_err(|e| outgrown(t, e))?;
        }
        return Ok(end);
    }
    // Worker 0 coordinates: it picks each window, runs small windows alone (the others sleep in the
    // barrier), and fans a window out only when enough partitions are active to pay for waking the
    // others. Every window is settled by worker 0 in partition order, so thread timing decides nothing.
    let cells: Vec<Mutex<Part>> = parts.drain(..).map(Mutex::new).collect();
    let barrier = SpinBarrier::new(threads);
    let window = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let mine: Vec<Mutex<Vec<u32>>> = (0..threads).map(|_| Mutex::new(Vec::new())).collect();
    let next = Arc::clone(&board.next);
    let fan_out_at = PARALLEL_MIN_ACTIVE.max(2 * threads);
    let outcome = std::thread::scope(|scope| {
        for w in 1..threads {
            let (cells, barrier, window, stop, mine, next) = (&cells, &barrier, &window, &stop, &mine, &next);
            scope.spawn(move || {
                let mut sense = false;
                let mut todo: Vec<u32> = Vec::new();
                loop {
                    barrier.wait(&mut sense);
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let t = window.load(Ordering::Acquire);
                    todo.clear();
                    todo.extend(mine[w].lock().unwrap_or_else(|e| e.into_inner()).iter().copied());
                    for &i in &todo {
                        let mut part = lock(&cells[i as usize]);
                        part.window(sh, t);
                        next[i as usize].store(part.next_time().unwrap_or(u64::MAX), Ordering::Release);
                    }
                    barrier.wait(&mut sense);
                }
            });
        }
        let mut sense = false;
        let mut end = 0;
        let result = loop {
            let Some(t) = board.advance() else { break Ok(end) };
            end = t;
            let parallel = board.active.len() >= fan_out_at;
            if parallel {
                for (w, m) in mine.iter().enumerate() {
                    let mut v = m.lock().unwrap_or_else(|e| e.into_inner());
                    v.clear();
                    v.extend(board.active.iter().copied().filter(|&i| sh.worker_of(i, threads) == w));
                }
                window.store(t, Ordering::Release);
                barrier.wait(&mut sense);
            }
            let todo: Vec<u32> =
                if parallel { mine[0].lock().unwrap_or_else(|e| e.into_inner()).clone() } else { board.active.clone() };
            for &i in &todo {
                let mut part = lock(&cells[i as usize]);
                part.window(sh, t);
                next[i as usize].store(part.next_time().unwrap_or(u64::MAX), Ordering::Release);
            }
            if parallel {
                barrier.wait(&mut sense);
            }
            if let Err(e) = board.settle(&mut |i, f| f(&mut lock(&cells[i]))) {
                break Err(e);
            }
            if let Err(e) = guard.check() {
                break Err(outgrown(t, e));
            }
            publish(t);
        };
        stop.store(true, Ordering::Release);
        barrier.wait(&mut sense);
        result
    });
    *parts = cells.into_iter().map(|c| c.into_inner().unwrap_or_else(|e| e.into_inner())).collect();
    outcome
}
