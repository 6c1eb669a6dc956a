//! The event loop: PEs and IO ports ("agents") run their tasks as data arrives; trains reserve the
//! links of their route trees; time advances from event to event in (cycle, sequence) order.

use std::collections::BTreeMap;

use smallvec::{smallvec, SmallVec};

use super::link::{Pace, Timeline, UNIT};
use super::queue::RadixQueue;
use super::route::{expand, Deliver, Links, Node, ROOT};
use super::{AgentStats, Blocked, DeadlockReport, EngineError, Totals};
use crate::mesh::{ColorId, Coord, MeshProgram, Need, Senders, TaskIdx};

/// A train's arrival at one agent: wavelet j arrives at `head + pace.offset(j)`.
#[derive(Clone, Copy, Debug)]
struct Arrival {
    head: u64,
    n: u64,
    pace: Pace,
}

/// Wavelets of one color at one agent: arrivals in head order, and how many task runs have claimed.
#[derive(Clone, Debug, Default)]
struct Inbox {
    arrivals: SmallVec<[Arrival; 1]>,
    /// Arrivals before this index are fully claimed and never read again.
    first: usize,
    /// Wavelets of `arrivals[first]` already claimed.
    first_claimed: u64,
    delivered: u64,
    claimed: u64,
}

impl Inbox {
    fn add(&mut self, a: Arrival) {
        // Keep head order among arrivals nobody has claimed from yet.
        let lo = self.first + usize::from(self.first_claimed > 0);
        let pos = lo + self.arrivals[lo..].partition_point(|x| x.head <= a.head);
        self.arrivals.insert(pos, a);
        self.delivered += a.n;
    }

    /// Arrival cycle of the unclaimed wavelet `k` positions after the claim frontier.
    fn time_of(&self, k: u64) -> Option<u64> {
        let mut k = k + self.first_claimed;
        for a in &self.arrivals[self.first..] {
            if k < a.n {
                return Some(a.head + a.pace.offset(k));
            }
            k -= a.n;
        }
        None
    }

    fn claim(&mut self, mut w: u64) {
        self.claimed += w;
        while w > 0 {
            let a = &self.arrivals[self.first];
            let left = a.n - self.first_claimed;
            if w < left {
                self.first_claimed += w;
                return;
            }
            w -= left;
            self.first += 1;
            self.first_claimed = 0;
        }
        // Drop fully claimed arrivals now and then so long runs stay small.
        if self.first > 64 {
            self.arrivals.drain(..self.first);
            self.first = 0;
        }
    }
}

/// A PE or an IO port.
#[derive(Clone, Debug, Default)]
struct Agent {
    /// Template index; u32::MAX for PEs that run nothing.
    template: u32,
    busy_until: u64,
    running: bool,
    runs_done: SmallVec<[u32; 4]>,
    inbox: SmallVec<[(ColorId, Inbox); 2]>,
}

impl Agent {
    fn inbox(&mut self, c: ColorId) -> &mut Inbox {
        match self.inbox.iter().position(|(k, _)| *k == c) {
            Some(i) => &mut self.inbox[i].1,
            None => {
                self.inbox.push((c, Inbox::default()));
                &mut self.inbox.last_mut().unwrap().1
            }
        }
    }
    fn inbox_ref(&self, c: ColorId) -> Option<&Inbox> {
        self.inbox.iter().find(|(k, _)| *k == c).map(|(_, i)| i)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// Re-evaluate which task the agent can start.
    Wake(u32),
    /// A task run finishes.
    Done(u32, u32),
}

pub(crate) struct Sim<'p> {
    prog: &'p MeshProgram,
    links: Links,
    n_pes: u32,
    timelines: Vec<Timeline>,
    /// Capacity of each port link (units per cycle).
    port_cap: Vec<u64>,
    port_pace: Vec<Pace>,
    agents: Vec<Agent>,
    queue: RadixQueue<Ev>,
    now: u64,
    /// Route index per (agent, color), looked up once.
    route_cache: BTreeMap<(u32, ColorId), u32>,
    scratch: Vec<Node>,
    out_time: Vec<u64>,
    pub totals: Totals,
    pub agent_stats: Vec<AgentStats>,
    /// Busy link-cycles in units (x UNIT per full-rate cycle), mesh hops only.
    pub hop_unit_cycles: u128,
}

impl<'p> Sim<'p> {
    pub fn new(prog: &'p MeshProgram) -> Result<Sim<'p>, EngineError> {
        let links = Links {
            width: prog.mesh.width,
            height: prog.mesh.height,
        };
        let n_pes = links.pes();
        let n_ports = prog.ports.len() as u32;
        let mut agents = vec![
            Agent {
                template: u32::MAX,
                ..Default::default()
            };
            (n_pes + n_ports) as usize
        ];
        for tile in &prog.tiles {
            let r = tile.rect;
            if r.x + r.w > links.width || r.y + r.h > links.height {
                return Err(EngineError::Program(format!(
                    "tile {r:?} lies outside the {}x{} mesh",
                    links.width, links.height
                )));
            }
            let n_tasks = prog.templates[tile.template.0 as usize].tasks.len();
            for y in r.y..r.y + r.h {
                for x in r.x..r.x + r.w {
                    let a = &mut agents[links.pe(Coord { x, y }) as usize];
                    if a.template != u32::MAX {
                        return Err(EngineError::Program(format!("PE ({x},{y}) is in two tiles")));
                    }
                    a.template = tile.template.0;
                    a.runs_done = smallvec![0; n_tasks];
                }
            }
        }
        let mut port_cap = Vec::new();
        let mut port_pace = Vec::new();
        for (i, p) in prog.ports.iter().enumerate() {
            if p.at.x >= links.width || p.at.y >= links.height || p.wavelets == 0 || p.per_cycles == 0 {
                return Err(EngineError::Program(format!(
                    "port {} is off the mesh or has no bandwidth",
                    p.name
                )));
            }
            let a = &mut agents[(n_pes + i as u32) as usize];
            a.template = p.template.0;
            a.runs_done = smallvec![0; prog.templates[p.template.0 as usize].tasks.len()];
            port_cap.push(((UNIT as u128 * p.wavelets as u128) / p.per_cycles as u128).max(1) as u64);
            port_pace.push(Pace::new(p.per_cycles, p.wavelets).max(Pace::FULL));
        }
        let n_agents = agents.len();
        Ok(Sim {
            prog,
            links,
            n_pes,
            timelines: vec![Timeline::default(); links.count(n_ports)],
            port_cap,
            port_pace,
            agents,
            queue: RadixQueue::new(),
            now: 0,
            route_cache: BTreeMap::new(),
            scratch: Vec::new(),
            out_time: Vec::new(),
            totals: Totals {
                io_bytes: vec![0; n_ports as usize],
                ..Totals::default()
            },
            agent_stats: vec![AgentStats::default(); n_agents],
            hop_unit_cycles: 0,
        })
    }

    fn push(&mut self, t: u64, ev: Ev) {
        self.queue.push(t, ev);
    }

    /// Runs to completion; returns the cycle of the last event.
    pub fn run(&mut self) -> Result<u64, EngineError> {
        for a in 0..self.agents.len() as u32 {
            if self.agents[a as usize].template != u32::MAX {
                self.push(0, Ev::Wake(a));
            }
        }
        let mut end = 0;
        while let Some((t, ev)) = self.queue.pop() {
            self.now = t;
            end = end.max(t);
            self.totals.events += 1;
            match ev {
                Ev::Wake(a) => self.try_start(a)?,
                Ev::Done(a, k) => self.finish(a, k)?,
            }
        }
        self.check_complete(end)?;
        Ok(end)
    }

    fn template(&self, a: u32) -> &'p crate::mesh::Template {
        &self.prog.templates[self.agents[a as usize].template as usize]
    }

    fn is_port(&self, a: u32) -> bool {
        a >= self.n_pes
    }

    /// Whether run `run` of task `k` of agent `a` has its needs met at `now`.
    fn ready(&self, a: u32, k: usize, run: u64) -> bool {
        let agent = &self.agents[a as usize];
        let task = &self.template(a).tasks[k];
        for need in &task.needs {
            match *need {
                Need::Done { task: u, times } => {
                    if (agent.runs_done[u.0 as usize] as u64) < run * times as u64 {
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
                    match inbox.time_of(probe) {
                        Some(at) if at <= self.now => {}
                        _ => return false,
                    }
                }
            }
        }
        true
    }

    fn try_start(&mut self, a: u32) -> Result<(), EngineError> {
        let agent = &self.agents[a as usize];
        if agent.running || agent.busy_until > self.now {
            return Ok(());
        }
        let tasks = &self.template(a).tasks;
        let mut pick = None;
        for (k, task) in tasks.iter().enumerate() {
            let run = agent.runs_done[k] as u64 + 1;
            if run <= task.repeat as u64 && self.ready(a, k, run) {
                pick = Some(k);
                break;
            }
        }
        let Some(k) = pick else { return Ok(()) };
        let task = &self.template(a).tasks[k];
        let port = self.is_port(a);
        let start = if port {
            self.now
        } else {
            self.now + self.prog.timing.pick_cycles as u64
        };
        let compute = if port {
            0
        } else {
            self.prog.timing.pe.cycles(task.work.op, task.work.elems)
        };
        let mut finish = start + compute;
        // Claim this run's wavelets; a paced operand cannot finish before its last wavelet is in.
        for need in &task.needs {
            if let Need::Recv { color, wavelets } = *need {
                let inbox = self.agents[a as usize].inbox(color);
                if task.work.paced_by == Some(color) && wavelets > 0 {
                    let last = inbox.time_of(wavelets - 1).unwrap_or(self.now);
                    finish = finish.max(last + compute.div_ceil(wavelets));
                }
                inbox.claim(wavelets);
            }
        }
        let mut sent_tail = finish;
        for s in &task.sends {
            if s.streamed && s.wavelets > 0 {
                let pace = if compute > 0 {
                    Pace::new(compute, s.wavelets).max(Pace::FULL)
                } else {
                    Pace::FULL
                };
                let tail = self.send(a, s.color, s.wavelets, pace, start)?;
                sent_tail = sent_tail.max(tail);
            }
        }
        finish = finish.max(sent_tail);
        let st = &mut self.agent_stats[a as usize];
        st.busy += compute;
        st.stalled += finish - start - compute;
        st.runs += 1;
        let agent = &mut self.agents[a as usize];
        agent.running = true;
        agent.busy_until = finish;
        self.push(finish, Ev::Done(a, k as u32));
        Ok(())
    }

    fn finish(&mut self, a: u32, k: u32) -> Result<(), EngineError> {
        let task = &self.template(a).tasks[k as usize];
        {
            let agent = &mut self.agents[a as usize];
            agent.running = false;
            agent.runs_done[k as usize] += 1;
        }
        if !self.is_port(a) {
            self.totals.flops += task.flops;
            self.agent_stats[a as usize].flops += task.flops;
        }
        for s in &task.sends {
            if !s.streamed && s.wavelets > 0 {
                self.send(a, s.color, s.wavelets, Pace::FULL, self.now)?;
            }
        }
        self.try_start(a)
    }

    /// The route agent `a` uses for color `c`.
    fn route(&mut self, a: u32, c: ColorId) -> Result<u32, EngineError> {
        if let Some(&r) = self.route_cache.get(&(a, c)) {
            return Ok(r);
        }
        let found = self.prog.routes.iter().position(|r| {
            r.color == c
                && match r.senders {
                    Senders::Pes(rect) => a < self.n_pes && rect.contains(self.links.coord(a)),
                    Senders::Port(p) => a == self.n_pes + p.0,
                }
        });
        let Some(r) = found else {
            return Err(EngineError::Program(format!(
                "{} sends on color {c} but no route covers it",
                self.agent_name(a)
            )));
        };
        self.route_cache.insert((a, c), r as u32);
        Ok(r as u32)
    }

    pub fn agent_name(&self, a: u32) -> String {
        if self.is_port(a) {
            format!("port {}", self.prog.ports[(a - self.n_pes) as usize].name)
        } else {
            let c = self.links.coord(a);
            format!("PE ({},{})", c.x, c.y)
        }
    }

    /// The pace a consumer at `d` imposes on color `c` (the per-wavelet compute of its next task that
    /// receives on `c`, if that task is paced by it), and whether that task is paced.
    fn consumer_pace(&self, d: u32, c: ColorId) -> (Pace, bool) {
        let agent = &self.agents[d as usize];
        if agent.template == u32::MAX || self.is_port(d) {
            return (Pace::FULL, false);
        }
        for (k, task) in self.template(d).tasks.iter().enumerate() {
            if agent.runs_done[k] >= task.repeat {
                continue;
            }
            for need in &task.needs {
                if let Need::Recv { color, wavelets } = *need {
                    if color == c && wavelets > 0 {
                        if task.work.paced_by != Some(c) {
                            return (Pace::FULL, false);
                        }
                        let compute = self.prog.timing.pe.cycles(task.work.op, task.work.elems);
                        let pace = if compute > wavelets {
                            Pace::new(compute, wavelets)
                        } else {
                            Pace::FULL
                        };
                        return (pace, true);
                    }
                }
            }
        }
        (Pace::FULL, false)
    }

    /// Sends a train; returns the cycle its tail has left the sender.
    fn send(&mut self, a: u32, c: ColorId, n: u64, pace: Pace, t: u64) -> Result<u64, EngineError> {
        let r = self.route(a, c)?;
        let route = self.prog.routes[r as usize];
        let timing = self.prog.timing;
        let (entry, root_link, root_latency, root_cap, mut pace) = if self.is_port(a) {
            let p = (a - self.n_pes) as usize;
            let port = &self.prog.ports[p];
            (
                port.at,
                self.links.port(p as u32),
                port.latency_cycles,
                self.port_cap[p],
                pace.max(self.port_pace[p]),
            )
        } else {
            (
                self.links.coord(a),
                self.links.up_ramp(a),
                timing.ramp_cycles as u64,
                UNIT,
                pace,
            )
        };
        let mut nodes = std::mem::take(&mut self.scratch);
        let prog = self.prog;
        let ports = &prog.ports;
        expand(&self.links, entry, route.pattern, |p| ports[p as usize].at, &mut nodes).map_err(|e| {
            EngineError::Program(format!(
                "{}: the route of color {c} ({:?}) leaves the mesh at ({},{})",
                self.agent_name(a),
                route.pattern,
                e.at.x,
                e.at.y
            ))
        })?;
        // Backpressure: a multicast moves no faster than its slowest paced consumer.
        for node in &nodes {
            if let Deliver::Pe(d) = node.deliver {
                pace = pace.max(self.consumer_pace(d, c).0);
            }
        }
        let len = pace.cycles(n);
        let units = pace.units();
        let head = t + route.relays as u64 * timing.relay_cycles as u64;
        let start = self.timelines[root_link as usize].reserve(head, len, units, root_cap, self.now);
        let root_out = start + root_latency;
        let tail = start + len;
        self.out_time.clear();
        for node in &nodes {
            let at = if node.parent == ROOT {
                root_out
            } else {
                self.out_time[node.parent as usize]
            };
            let (cap, latency) = match node.deliver {
                Deliver::Hop => (UNIT, timing.hop_cycles as u64),
                Deliver::Pe(_) => (UNIT, timing.ramp_cycles as u64),
                Deliver::Port(p) => (self.port_cap[p as usize], ports[p as usize].latency_cycles),
            };
            let s = self.timelines[node.link as usize].reserve(at, len, units, cap, self.now);
            let out = s + latency;
            self.out_time.push(out);
            match node.deliver {
                Deliver::Hop => {
                    self.totals.wavelet_hops += n;
                    self.hop_unit_cycles += len as u128 * units as u128;
                }
                Deliver::Pe(d) => self.deliver(d, c, n, out, pace)?,
                Deliver::Port(p) => {
                    self.totals.io_bytes[p as usize] += n * 4;
                    self.deliver(self.n_pes + p, c, n, out, pace)?
                }
            }
        }
        self.scratch = nodes;
        self.totals.wavelets_sent += n;
        self.totals.relays += route.relays as u64;
        if self.is_port(a) {
            self.totals.io_bytes[(a - self.n_pes) as usize] += n * 4;
        }
        Ok(tail)
    }

    fn deliver(&mut self, d: u32, c: ColorId, n: u64, head: u64, pace: Pace) -> Result<(), EngineError> {
        if self.agents[d as usize].template == u32::MAX {
            return Err(EngineError::Program(format!(
                "a train on color {c} is delivered to {}, which runs nothing",
                self.agent_name(d)
            )));
        }
        self.agents[d as usize].inbox(c).add(Arrival { head, n, pace });
        self.totals.wavelets_delivered += n;
        // Wake the receiver when its next consumer of this color can start: at the head for a paced
        // consumer, at the tail otherwise.
        let paced = d < self.n_pes && self.consumer_pace(d, c).1;
        let at = if paced { head } else { head + pace.offset(n - 1) };
        self.push(at, Ev::Wake(d));
        Ok(())
    }

    /// After the last event: every task ran every run, and every delivered wavelet was consumed.
    fn check_complete(&self, end: u64) -> Result<(), EngineError> {
        let mut blocked = Vec::new();
        let mut n_blocked = 0u64;
        for (i, agent) in self.agents.iter().enumerate() {
            if agent.template == u32::MAX {
                continue;
            }
            let a = i as u32;
            let tasks = &self.template(a).tasks;
            for (k, task) in tasks.iter().enumerate() {
                if agent.runs_done[k] < task.repeat {
                    n_blocked += 1;
                    if blocked.len() < super::DEADLOCK_LISTED {
                        blocked.push(Blocked {
                            agent: self.agent_name(a),
                            task: task.name.clone(),
                            run: agent.runs_done[k] + 1,
                            waits_for: self.waits_for(a, k),
                        });
                    }
                    break;
                }
            }
        }
        if n_blocked > 0 {
            return Err(EngineError::Deadlock(DeadlockReport {
                cycle: end,
                blocked_agents: n_blocked,
                blocked,
            }));
        }
        for (i, agent) in self.agents.iter().enumerate() {
            for (c, inbox) in &agent.inbox {
                if inbox.delivered != inbox.claimed {
                    return Err(EngineError::Program(format!(
                        "{} received {} wavelets on color {c} but its tasks consumed {}",
                        self.agent_name(i as u32),
                        inbox.delivered,
                        inbox.claimed
                    )));
                }
            }
        }
        Ok(())
    }

    fn waits_for(&self, a: u32, k: usize) -> Vec<String> {
        let agent = &self.agents[a as usize];
        let tasks = &self.template(a).tasks;
        let run = agent.runs_done[k] as u64 + 1;
        let mut out = Vec::new();
        for need in &tasks[k].needs {
            match *need {
                Need::Done {
                    task: TaskIdx(u),
                    times,
                } => {
                    let have = agent.runs_done[u as usize] as u64;
                    if have < run * times as u64 {
                        out.push(format!(
                            "task {} to finish {} runs (done {have})",
                            tasks[u as usize].name,
                            run * times as u64
                        ));
                    }
                }
                Need::Recv { color, wavelets } => {
                    let (have, claimed) = agent.inbox_ref(color).map_or((0, 0), |i| (i.delivered, i.claimed));
                    if have < claimed + wavelets {
                        out.push(format!(
                            "{wavelets} wavelets on color {color} (has {} unclaimed)",
                            have - claimed
                        ));
                    }
                }
            }
        }
        out
    }
}
