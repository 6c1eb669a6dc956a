//! The verifier: invariants of a mesh program and its plan, checked after every compile in debug
//! builds and in tests.
//!
//! Program: regions and tiles disjoint and inside the mesh; every send on a color has exactly one
//! route; at every router each color follows one rule (rx set -> tx set) and at most `colors` colors
//! are in use; every wavelet delivered to a PE or port is consumed there (and no PE has two tasks
//! receiving one color); SRAM per template within the PE's data SRAM; FLOPs of the tasks equal the
//! graph's; ports on the perimeter with their planned bytes; needs that name real tasks and no cycle
//! among first runs.
//! Plan: every graph edge between regions carried by a stream, every off-wafer stream on a port.
//! Dry run (small meshes): the program executes to completion when every need is met in full
//! (infinite buffers, no timing), which proves the counts and the dependencies consistent.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::graph::{Graph, OpKind, Role};
use crate::mesh::{ColorId, Coord, MeshProgram, Need, Pattern, PortId, Rect, Senders};

use super::route::{self, Hop};
use super::{io, Compiled, Layout};

/// Meshes up to this many PEs get the dry run after compiling.
pub const DRY_RUN_MAX_PES: u64 = 64 * 64;
/// Largest `repeat` a task may have: what the tiling may choose at most.
const MAX_REPEAT: u32 = super::kernel::MAX_REPEAT_HARD;

fn port_at(p: &MeshProgram) -> impl Fn(PortId) -> Option<(Coord, crate::mesh::Dir)> + '_ {
    move |id: PortId| p.ports.get(id.0 as usize).map(|x| (x.at, x.side))
}

/// Checks a program's invariants; returns the problems found (empty: verified).
pub fn verify_program(p: &MeshProgram) -> Vec<String> {
    let mut errs = Vec::new();
    let mesh = p.mesh;
    let w = mesh.width;
    let n = mesh.pes() as usize;
    let inside = |r: &Rect| r.x as u64 + r.w as u64 <= w as u64 && r.y as u64 + r.h as u64 <= mesh.height as u64;
    // Regions.
    for (i, r) in p.regions.iter().enumerate() {
        if !inside(&r.rect) {
            errs.push(format!("region {} ({}) is not inside the mesh", i, r.name));
        }
        for (j, o) in p.regions.iter().enumerate().skip(i + 1) {
            if r.rect.pes() > 0 && o.rect.pes() > 0 && r.rect.overlaps(&o.rect) {
                errs.push(format!("regions {} and {} overlap", r.name, o.name));
            }
            let _ = j;
        }
    }
    // Templates.
    let avail = p.timing.sram_bytes.saturating_sub(p.timing.pe.code_reserve_bytes);
    for (ti, t) in p.templates.iter().enumerate() {
        if t.region.0 as usize >= p.regions.len() {
            errs.push(format!("template {} names region {}", t.name, t.region.0));
        }
        if t.sram_bytes > avail {
            errs.push(format!(
                "template {} allocates {} bytes per PE, more than the {} of data SRAM",
                t.name, t.sram_bytes, avail
            ));
        }
        let mut recv_colors = BTreeSet::new();
        for (k, task) in t.tasks.iter().enumerate() {
            if task.repeat == 0 || task.repeat > MAX_REPEAT {
                errs.push(format!("template {} task {} repeats {} times", t.name, task.name, task.repeat));
            }
            for nd in &task.needs {
                match nd {
                    Need::Done { task: o, .. } | Need::After { task: o, .. } => {
                        if o.0 as usize >= t.tasks.len() || o.0 as usize == k {
                            errs.push(format!("template {} task {} waits on task {}", t.name, task.name, o.0));
                        }
                    }
                    Need::Recv { color, .. } => {
                        if !recv_colors.insert(*color) {
                            errs.push(format!("template {}: two tasks receive color {}", t.name, color));
                        }
                    }
                }
            }
            if let Some(c) = task.work.paced_by {
                if !task.needs.iter().any(|nd| matches!(nd, Need::Recv { color, .. } if *color == c)) {
                    errs.push(format!("template {} task {} is paced by {} it does not receive", t.name, task.name, c));
                }
            }
        }
        for f in &t.fifos {
            if f.runs == 0 || !recv_colors.contains(&f.color) {
                errs.push(format!(
                    "template {} has a FIFO of {} runs on {} it does not receive",
                    t.name, f.runs, f.color
                ));
            }
        }
        // No cycle among the tasks' first runs.
        let mut indeg = vec![0usize; t.tasks.len()];
        let mut edges = vec![Vec::new(); t.tasks.len()];
        for (k, task) in t.tasks.iter().enumerate() {
            for nd in &task.needs {
                if let (Need::Done { task: o, .. } | Need::After { task: o, .. }, Some(r)) = (nd, nd.runs_needed(1)) {
                    if r > 0 && (o.0 as usize) < t.tasks.len() {
                        edges[o.0 as usize].push(k);
                        indeg[k] += 1;
                    }
                }
            }
        }
        let mut q: Vec<usize> = (0..t.tasks.len()).filter(|&k| indeg[k] == 0).collect();
        let mut seen = 0;
        while let Some(x) = q.pop() {
            seen += 1;
            for &y in &edges[x] {
                indeg[y] -= 1;
                if indeg[y] == 0 {
                    q.push(y);
                }
            }
        }
        if seen != t.tasks.len() {
            errs.push(format!("template {} (#{ti}): its tasks' first runs wait on each other in a cycle", t.name));
        }
    }
    // Tiles: inside, disjoint, within their region.
    let mut tmpl_at = vec![u32::MAX; n];
    for tile in &p.tiles {
        let r = tile.rect;
        if !inside(&r) || r.pes() == 0 {
            errs.push(format!("tile {r:?} is empty or outside the mesh"));
            continue;
        }
        let Some(t) = p.templates.get(tile.template.0 as usize) else {
            errs.push(format!("tile {r:?} names template {}", tile.template.0));
            continue;
        };
        if let Some(reg) = p.regions.get(t.region.0 as usize) {
            let rr = reg.rect;
            if r.x < rr.x || r.y < rr.y || r.x + r.w > rr.x + rr.w || r.y + r.h > rr.y + rr.h {
                errs.push(format!("tile {r:?} of {} lies outside its region {}", t.name, reg.name));
            }
        }
        for y in r.y..r.y + r.h {
            for x in r.x..r.x + r.w {
                let i = (y * w + x) as usize;
                if tmpl_at[i] != u32::MAX {
                    errs.push(format!("PE ({x}, {y}) is in two tiles"));
                    break;
                }
                tmpl_at[i] = tile.template.0;
            }
        }
    }
    // FLOPs.
    let task_flops = p.task_flops();
    if task_flops != p.graph_flops {
        errs.push(format!("the tasks execute {task_flops} FLOPs, the graph's ops {}", p.graph_flops));
    }
    let region_flops: u64 = p.regions.iter().map(|r| r.flops).sum();
    if region_flops != p.graph_flops {
        errs.push(format!("the regions count {region_flops} FLOPs, the program {}", p.graph_flops));
    }
    // Ports (their bytes are checked after the deliveries: a port to another wafer forwards what
    // reaches it without a task).
    let mut task_bytes = vec![0u64; p.ports.len()];
    let mut forwarded = vec![0u64; p.ports.len()];
    for (i, port) in p.ports.iter().enumerate() {
        if !io::on_edge(port.at, port.side, mesh) {
            errs.push(format!("port {} at {:?} is not on the {:?} edge", port.name, port.at, port.side));
        }
        if port.wavelets > port.per_cycles * p.timing.link_wavelets_per_cycle as u64 || port.per_cycles == 0 {
            errs.push(format!("port {} is faster than its link", port.name));
        }
        let Some(t) = p.templates.get(port.template.0 as usize) else {
            errs.push(format!("port {} names template {}", port.name, port.template.0));
            continue;
        };
        let mut bytes = 0u64;
        for task in &t.tasks {
            for nd in &task.needs {
                if let Need::Recv { color, wavelets } = nd {
                    if *color != ColorId::LINK {
                        bytes += wavelets * task.repeat as u64 * 4;
                    }
                }
            }
            for s in &task.sends {
                bytes += s.wavelets * s.runs_sent(task.repeat) as u64 * 4;
            }
        }
        task_bytes[i] = bytes;
    }
    // Per color: routes, rules, deliveries.
    let mut by_color: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, r) in p.routes.iter().enumerate() {
        by_color.entry(r.color.0).or_default().push(i);

        if r.color.0 >= p.timing.colors {
            errs.push(format!("route {i} uses color {} of {}", r.color, p.timing.colors));
        }
    }
    // Sends per (color, PE) and receives per (color, PE), from the tiles.
    let mut color_count = vec![0u8; n];
    let mut rule = vec![0u16; n];
    let mut route_of = vec![u32::MAX; n];
    let mut delivered = vec![0u64; n];
    let mut consumed = vec![0u64; n];
    let mut vol = vec![0u64; n];
    let colors: BTreeSet<u32> = by_color
        .keys()
        .copied()
        .chain(p.templates.iter().flat_map(|t| {
            t.tasks
                .iter()
                .flat_map(|k| {
                    k.sends.iter().map(|s| s.color.0).chain(k.needs.iter().filter_map(|nd| match nd {
                        Need::Recv { color, .. } if *color != ColorId::LINK => Some(color.0),
                        _ => None,
                    }))
                })
                .collect::<Vec<_>>()
        }))
        .collect();
    let port_at = port_at(p);
    let mut path: Vec<Hop> = Vec::new();
    for c in colors {
        let routes = by_color.get(&c).cloned().unwrap_or_default();
        let mut touched: Vec<usize> = Vec::new();
        // Per-PE volumes and receipts on this color.
        for tile in &p.tiles {
            let t = &p.templates[tile.template.0 as usize];
            let (mut v, mut cons) = (0u64, 0u64);
            for k in &t.tasks {
                for s in k.sends.iter().filter(|s| s.color.0 == c) {
                    v += s.wavelets * s.runs_sent(k.repeat) as u64;
                }
                for nd in &k.needs {
                    if let Need::Recv { color, wavelets } = nd {
                        if color.0 == c {
                            cons += wavelets * k.repeat as u64;
                        }
                    }
                }
            }
            if v == 0 && cons == 0 {
                continue;
            }
            let r = tile.rect;
            for y in r.y..r.y + r.h {
                for x in r.x..r.x + r.w {
                    let i = (y * w + x) as usize;
                    vol[i] = v;
                    consumed[i] = cons;
                    touched.push(i);
                }
            }
        }
        let mut port_vol: BTreeMap<u32, u64> = BTreeMap::new();
        let mut port_cons: BTreeMap<u32, u64> = BTreeMap::new();
        let mut port_del: BTreeMap<u32, u64> = BTreeMap::new();
        let mut port_route: BTreeMap<u32, usize> = BTreeMap::new();
        for (pi, port) in p.ports.iter().enumerate() {
            if let Some(t) = p.templates.get(port.template.0 as usize) {
                for k in &t.tasks {
                    for s in k.sends.iter().filter(|s| s.color.0 == c) {
                        *port_vol.entry(pi as u32).or_default() += s.wavelets * s.runs_sent(k.repeat) as u64;
                    }
                    for nd in &k.needs {
                        if let Need::Recv { color, wavelets } = nd {
                            if color.0 == c {
                                *port_cons.entry(pi as u32).or_default() += wavelets * k.repeat as u64;
                            }
                        }
                    }
                }
            }
        }
        // Unique route per sender.
        for &ri in &routes {
            match p.routes[ri].senders {
                Senders::Pes(r) => {
                    if !inside(&r) {
                        errs.push(format!("route {ri} senders {r:?} outside the mesh"));
                        continue;
                    }
                    for y in r.y..r.y + r.h {
                        for x in r.x..r.x + r.w {
                            let i = (y * w + x) as usize;
                            if route_of[i] != u32::MAX {
                                errs.push(format!("PE ({x}, {y}) has two routes on color {c}"));
                            }
                            route_of[i] = ri as u32;
                            touched.push(i);
                        }
                    }
                }
                Senders::Port(pid) => {
                    if port_route.insert(pid.0, ri).is_some() {
                        errs.push(format!("port {} has two routes on color {c}", pid.0));
                    }
                }
            }
        }
        // Walk every route from every sender: rules, color counts, deliveries.
        let mut conflicts = 0usize;
        for &ri in &routes {
            let rt = p.routes[ri];
            let mut senders: Vec<(Coord, u8, u64)> = Vec::new();
            match rt.senders {
                Senders::Pes(r) => {
                    for y in r.y..r.y + r.h {
                        for x in r.x..r.x + r.w {
                            let i = (y * w + x) as usize;
                            senders.push((Coord { x, y }, route::R, vol[i]));
                        }
                    }
                }
                Senders::Port(pid) => {
                    let Some(port) = p.ports.get(pid.0 as usize) else {
                        errs.push(format!("route {ri} sent by missing port {}", pid.0));
                        continue;
                    };
                    senders.push((port.at, route::bit(port.side), port_vol.get(&pid.0).copied().unwrap_or(0)));
                }
            }
            for (at, rx0, v) in senders {
                path.clear();
                if let Err(e) = route::walk(rt.pattern, at, rx0, mesh, &port_at, &mut path) {
                    errs.push(format!("route {ri} from ({}, {}): {e}", at.x, at.y));
                    continue;
                }
                for h in &path {
                    let i = (h.at.y * w + h.at.x) as usize;
                    // A relayed route changes colors at its relays: only its deliveries are checked here.
                    if rt.relays > 0 {
                        if h.tx & route::R != 0 {
                            delivered[i] += v;
                            touched.push(i);
                        }
                        continue;
                    }
                    if rule[i] == 0 {
                        color_count[i] += 1;
                        touched.push(i);
                        rule[i] = h.rx as u16 | (h.tx as u16) << 5;
                    } else {
                        let tx = (rule[i] >> 5) as u8;
                        if tx != h.tx {
                            conflicts += 1;
                            if conflicts <= 3 {
                                errs.push(format!(
                                    "color {c} at router ({}, {}) needs two rules (tx {:05b} and {:05b}); route {ri}",
                                    h.at.x, h.at.y, tx, h.tx
                                ));
                            }
                        }
                        rule[i] |= h.rx as u16;
                    }
                    if h.tx & route::R != 0 {
                        delivered[i] += v;
                    }
                }
                if let Pattern::ToPort { port } = rt.pattern {
                    *port_del.entry(port.0).or_default() += v;
                }
            }
        }
        // Every send has its route; every delivery is consumed.
        for &i in &touched {
            if vol[i] > 0 && route_of[i] == u32::MAX {
                errs.push(format!("PE ({}, {}) sends on color {c} without a route", i as u32 % w, i as u32 / w));
            }
            if delivered[i] != consumed[i] {
                errs.push(format!(
                    "PE ({}, {}) color {c}: {} wavelets delivered, {} consumed",
                    i as u32 % w,
                    i as u32 / w,
                    delivered[i],
                    consumed[i]
                ));
                delivered[i] = consumed[i];
            }
        }
        for (&pid, &v) in &port_vol {
            if v > 0 && !port_route.contains_key(&pid) {
                errs.push(format!("port {pid} sends on color {c} without a route"));
            }
        }
        let keys: BTreeSet<u32> = port_cons.keys().chain(port_del.keys()).copied().collect();
        for pid in keys {
            let (d, k) = (port_del.get(&pid).copied().unwrap_or(0), port_cons.get(&pid).copied().unwrap_or(0));
            if p.ports.get(pid as usize).is_some_and(|q| q.peer_port.is_some()) {
                if k != 0 {
                    errs.push(format!("port {pid} forwards to another wafer but its tasks receive color {c}"));
                }
                forwarded[pid as usize] += d * 4;
            } else if d != k {
                errs.push(format!("port {pid} color {c}: {d} wavelets delivered, {k} consumed"));
            }
        }
        for &i in &touched {
            rule[i] = 0;
            route_of[i] = u32::MAX;
            delivered[i] = 0;
            consumed[i] = 0;
            vol[i] = 0;
        }
        if errs.len() > 200 {
            break;
        }
    }
    for (i, port) in p.ports.iter().enumerate() {
        let bytes = task_bytes[i] + forwarded[i];
        if bytes != port.planned_bytes {
            errs.push(format!("port {} (#{i}) plans {} bytes, its tasks move {bytes}", port.name, port.planned_bytes));
        }
    }
    if let Some((i, &cnt)) = color_count.iter().enumerate().max_by_key(|(_, &c)| c) {
        if cnt as u32 > p.timing.colors {
            errs.push(format!(
                "router ({}, {}) carries {cnt} colors, more than its {}",
                i as u32 % w,
                i as u32 / w,
                p.timing.colors
            ));
        }
    }
    errs.truncate(200);
    errs
}

/// Checks the plan against the graph and the programs: every off-wafer stream is on a port, and
/// every graph edge between ops in different regions is carried by a stream (directly in one
/// program; through MemoryX between phases; through the wafer link between wafers; to or from
/// MemoryX or SwarmX for ops that run off the wafer).
pub fn verify_plan(g: &Graph, c: &Compiled) -> Vec<String> {
    let plan = &c.plan;
    let mut errs = Vec::new();
    let off = |e: &str| e == "host" || e == "memoryx" || e == "swarmx" || e.starts_with("wafer");
    for s in &plan.streams {
        let on_port =
            plan.ports.iter().any(|p| p.wafer == s.wafer && p.phase == s.phase && p.streams.contains(&s.name));
        if (off(&s.from) || off(&s.to)) && !on_port {
            errs.push(format!(
                "stream {} ({} -> {}, wafer {} phase {}) crosses the edge on no port",
                s.name, s.from, s.to, s.wafer, s.phase
            ));
        }
    }
    // (wafer, phase) of each program.
    let place = |i: usize| match c.layout {
        Layout::Single => (0u32, 0u32),
        Layout::Wafers => (i as u32, 0),
        Layout::Phases => (0, i as u32),
    };
    let mut region_of: BTreeMap<&str, (u32, u32, &str)> = BTreeMap::new();
    for (i, p) in c.programs.iter().enumerate() {
        for r in &p.regions {
            for o in &r.ops {
                region_of.insert(o.as_str(), (place(i).0, place(i).1, r.name.as_str()));
            }
        }
    }
    let streams: BTreeSet<(u32, u32, &str, &str)> =
        plan.streams.iter().map(|s| (s.wafer, s.phase, s.from.as_str(), s.to.as_str())).collect();
    let has = |w: u32, ph: u32, a: &str, b: &str| streams.contains(&(w, ph, a, b));
    let to_store = |w: u32, ph: u32, a: &str| has(w, ph, a, "memoryx") || has(w, ph, a, "swarmx");
    let from_store = |w: u32, ph: u32, b: &str| has(w, ph, "memoryx", b) || has(w, ph, "swarmx", b);
    let mut producer = vec![None; g.tensors.len()];
    for o in g.op_ids() {
        for &t in &g.op(o).outputs {
            producer[t.idx()] = Some(o);
        }
    }
    // The real producers of a tensor, through views (a split's slice, a split_grad's concatenation).
    fn real(
        g: &Graph,
        producer: &[Option<crate::graph::OpId>],
        t: crate::graph::TensorId,
        out: &mut Vec<crate::graph::OpId>,
    ) {
        if let Some(p) = producer[t.idx()] {
            match g.op(p).kind {
                OpKind::Split { .. } => real(g, producer, g.op(p).inputs[0], out),
                OpKind::SplitGrad { .. } => {
                    for &i in &g.op(p).inputs {
                        real(g, producer, i, out);
                    }
                }
                _ => out.push(p),
            }
        }
    }
    let is_view = |o: crate::graph::OpId| matches!(g.op(o).kind, OpKind::Split { .. } | OpKind::SplitGrad { .. });
    let mut seen = BTreeSet::new();
    for b in g.op_ids() {
        let ob = g.op(b);
        if is_view(b) {
            continue;
        }
        let rb = region_of.get(ob.name.as_str()).copied();
        for &t in &ob.inputs {
            let mut ps = Vec::new();
            real(g, &producer, t, &mut ps);
            for a in ps {
                let ra = region_of.get(g.op(a).name.as_str()).copied();
                let ok = match (ra, rb) {
                    // Both off the wafer (the optimizer and its inputs in MemoryX).
                    (None, None) => true,
                    (Some((w, ph, na)), None) => to_store(w, ph, na),
                    (None, Some((w, ph, nb))) => from_store(w, ph, nb),
                    (Some(x), Some(y)) if x == y => true,
                    (Some((wa, pa, na)), Some((wb, pb, nb))) if wa == wb && pa == pb => has(wa, pa, na, nb),
                    (Some((wa, pa, na)), Some((wb, pb, nb))) if wa == wb => {
                        to_store(wa, pa, na) && from_store(wb, pb, nb)
                    }
                    (Some((wa, pa, na)), Some((wb, pb, nb))) => {
                        has(wa, pa, na, &format!("wafer{wb}")) && has(wb, pb, &format!("wafer{wa}"), nb)
                    }
                };
                if !ok && seen.insert((ra, rb)) {
                    errs.push(format!(
                        "graph edge {} -> {} ({}) is carried by no stream ({} -> {})",
                        g.op(a).name,
                        ob.name,
                        g.tensor(t).name,
                        ra.map_or("off-wafer".to_string(), |r| format!("{} (wafer {} phase {})", r.2, r.0, r.1)),
                        rb.map_or("off-wafer".to_string(), |r| format!("{} (wafer {} phase {})", r.2, r.0, r.1)),
                    ));
                }
            }
        }
    }
    errs
}

/// Executes the program abstractly: a task run fires once all its needs are met in full (infinite
/// buffers, no time); every task must finish all its runs and every delivery be consumed.
pub fn dry_run(p: &MeshProgram) -> Vec<String> {
    let mut errs = Vec::new();
    let w = p.mesh.width;
    let n = p.mesh.pes() as usize;
    // Agents: PEs with a template, then ports.
    let mut tmpl: Vec<Option<u32>> = vec![None; n + p.ports.len()];
    for tile in &p.tiles {
        let r = tile.rect;
        for y in r.y..r.y + r.h {
            for x in r.x..r.x + r.w {
                tmpl[(y * w + x) as usize] = Some(tile.template.0);
            }
        }
    }
    for (i, port) in p.ports.iter().enumerate() {
        tmpl[n + i] = Some(port.template.0);
    }
    let mut done: Vec<Vec<u64>> =
        tmpl.iter().map(|t| t.map_or(Vec::new(), |t| vec![0; p.templates[t as usize].tasks.len()])).collect();
    let mut recv: Vec<BTreeMap<u32, u64>> = vec![BTreeMap::new(); tmpl.len()];
    // Route lookup: (color, sender agent) -> route.
    let mut route_of: BTreeMap<(u32, usize), usize> = BTreeMap::new();
    for (ri, r) in p.routes.iter().enumerate() {
        match r.senders {
            Senders::Pes(rect) => {
                for y in rect.y..rect.y + rect.h {
                    for x in rect.x..rect.x + rect.w {
                        route_of.insert((r.color.0, (y * w + x) as usize), ri);
                    }
                }
            }
            Senders::Port(pid) => {
                route_of.insert((r.color.0, n + pid.0 as usize), ri);
            }
        }
    }
    let port_at = port_at(p);
    let mut queue: VecDeque<usize> = (0..tmpl.len()).filter(|&a| tmpl[a].is_some()).collect();
    let mut queued = vec![true; tmpl.len()];
    let mut path = Vec::new();
    let mut steps: u64 = 0;
    while let Some(a) = queue.pop_front() {
        queued[a] = false;
        let Some(ti) = tmpl[a] else { continue };
        let t = &p.templates[ti as usize];
        let mut progress = true;
        while progress {
            progress = false;
            for (k, task) in t.tasks.iter().enumerate() {
                loop {
                    let run = done[a][k] + 1;
                    if run > task.repeat as u64 {
                        break;
                    }
                    let ready = task.needs.iter().all(|nd| match *nd {
                        Need::Recv { color, wavelets } => recv[a].get(&color.0).copied().unwrap_or(0) >= run * wavelets,
                        _ => {
                            let other = match nd {
                                Need::Done { task, .. } | Need::After { task, .. } => task.0 as usize,
                                _ => 0,
                            };
                            done[a].get(other).copied().unwrap_or(0) >= nd.runs_needed(run).unwrap_or(0)
                        }
                    });
                    if !ready {
                        break;
                    }
                    done[a][k] = run;
                    progress = true;
                    steps += 1;
                    for s in &task.sends {
                        if let Some(rr) = s.runs {
                            if !rr.contains(run as u32) {
                                continue;
                            }
                        }
                        let Some(&ri) = route_of.get(&(s.color.0, a)) else {
                            errs.push(format!("agent {a} sends on {} without a route", s.color));
                            continue;
                        };
                        let rt = p.routes[ri];
                        let (start, rx0) = if a < n {
                            (Coord { x: a as u32 % w, y: a as u32 / w }, route::R)
                        } else {
                            let port = &p.ports[a - n];
                            (port.at, route::bit(port.side))
                        };
                        path.clear();
                        if route::walk(rt.pattern, start, rx0, p.mesh, &port_at, &mut path).is_err() {
                            continue;
                        }
                        for h in &path {
                            if h.tx & route::R != 0 {
                                let i = (h.at.y * w + h.at.x) as usize;
                                *recv[i].entry(s.color.0).or_default() += s.wavelets;
                                if !queued[i] {
                                    queued[i] = true;
                                    queue.push_back(i);
                                }
                            }
                        }
                        if let Pattern::ToPort { port } = rt.pattern {
                            // A port to another wafer hands the train to its peer port, on the link.
                            let (i, color) = match p.ports.get(port.0 as usize).and_then(|q| q.peer_port) {
                                Some(q) => (n + q.0 as usize, ColorId::LINK.0),
                                None => (n + port.0 as usize, s.color.0),
                            };
                            *recv[i].entry(color).or_default() += s.wavelets;
                            if !queued[i] {
                                queued[i] = true;
                                queue.push_back(i);
                            }
                        }
                    }
                }
            }
        }
        if steps > 200_000_000 {
            errs.push("dry run: too many steps".into());
            break;
        }
    }
    // Everything ran and every delivery was consumed.
    let mut stuck = 0;
    for (a, t) in tmpl.iter().enumerate() {
        let Some(ti) = t else { continue };
        let t = &p.templates[*ti as usize];
        for (k, task) in t.tasks.iter().enumerate() {
            if done[a][k] < task.repeat as u64 {
                stuck += 1;
                if stuck <= 5 {
                    let who = if a < n {
                        format!("PE ({}, {})", a as u32 % w, a as u32 / w)
                    } else {
                        format!("port {}", p.ports[a - n].name)
                    };
                    let unmet: Vec<String> = task
                        .needs
                        .iter()
                        .filter(|nd| match **nd {
                            Need::Recv { color, wavelets } => {
                                recv[a].get(&color.0).copied().unwrap_or(0) < (done[a][k] + 1) * wavelets
                            }
                            _ => true,
                        })
                        .map(|nd| format!("{nd:?}"))
                        .collect();
                    errs.push(format!(
                        "dry run: {who} ({}) task {} stops after {} of {} runs, waiting for {}",
                        t.name,
                        task.name,
                        done[a][k],
                        task.repeat,
                        unmet.join(", ")
                    ));
                }
            }
        }
        // LINK data comes from another wafer: not checked here.
        let mut want: BTreeMap<u32, u64> = BTreeMap::new();
        for task in &t.tasks {
            for nd in &task.needs {
                if let Need::Recv { color, wavelets } = nd {
                    *want.entry(color.0).or_default() += wavelets * task.repeat as u64;
                }
            }
        }
        for (c, got) in &recv[a] {
            let wanted = want.get(c).copied().unwrap_or(0);
            if *got != wanted && stuck == 0 {
                errs.push(format!("dry run: agent {a} ({}) color {c}: {got} delivered, {wanted} consumed", t.name));
            }
        }
    }
    if stuck > 5 {
        errs.push(format!("dry run: {stuck} tasks did not finish"));
    }
    errs.truncate(50);
    let _ = (Role::Input, OpKind::Split { rows: 0, widths: [0; 3] });
    errs
}
