//! Printers for `--dump-after` and the snapshots: the stages of a compile as text.

use std::fmt::Write as _;

use crate::mesh::{MeshProgram, Need, Pattern, Senders};
use crate::report::fmt::thousands;
pub use crate::report::PlanSummary as Plan;

/// The compile stages `--dump-after` can print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dump {
    /// Regions on the mesh: the map and the rectangles.
    Place,
    /// Streams between regions and ports, with their colors.
    Route,
    /// SRAM per PE class of every region.
    Alloc,
    /// The mesh program.
    Lower,
}

impl Dump {
    pub fn parse(s: &str) -> Option<Dump> {
        match s {
            "place" => Some(Dump::Place),
            "route" => Some(Dump::Route),
            "alloc" => Some(Dump::Alloc),
            "lower" => Some(Dump::Lower),
            _ => None,
        }
    }

    /// The stage's printout of a compile.
    pub fn print(self, plan: &Plan, programs: &[MeshProgram]) -> String {
        match self {
            Dump::Place => {
                let mut s = String::new();
                for w in 0..plan.wafers {
                    for ph in 0..plan.phases {
                        if plan.wafers > 1 {
                            let _ = writeln!(s, "wafer {w}");
                        }
                        if plan.phases > 1 {
                            let _ = writeln!(s, "phase {ph}");
                        }
                        s.push_str(&plan.map(w, ph, 96, 48));
                    }
                }
                let _ = writeln!(s, "bands {}", plan.bands);
                for r in &plan.regions {
                    let _ = writeln!(
                        s,
                        "  w{} {:<32} {:>5}x{:<5} at ({}, {})  flops {}",
                        r.wafer,
                        r.name,
                        r.w,
                        r.h,
                        r.x,
                        r.y,
                        thousands(r.flops)
                    );
                }
                s
            }
            Dump::Route => plan.streams_text(),
            Dump::Alloc => {
                let mut s = String::new();
                let _ = writeln!(s, "SRAM per PE (bytes of data SRAM; code and stack reserve excluded)");
                for r in &plan.regions {
                    let _ = writeln!(
                        s,
                        "  {:<32} {:<15} max {:>7}  mean {:>7}  runs {} x {}",
                        r.name,
                        r.algorithm,
                        thousands(r.sram_max),
                        thousands(r.sram_mean),
                        r.runs,
                        r.iters
                    );
                }
                s
            }
            Dump::Lower => programs.iter().map(|p| print_program(p, 400)).collect::<Vec<_>>().join("\n"),
        }
    }
}

/// A program as text, at most `limit` lines per section.
pub fn print_program(p: &MeshProgram, limit: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "program v{} mesh {}x{}: {} regions, {} templates, {} tiles, {} routes, {} ports, {} graph FLOPs",
        p.version,
        p.mesh.width,
        p.mesh.height,
        p.regions.len(),
        p.templates.len(),
        p.tiles.len(),
        p.routes.len(),
        p.ports.len(),
        thousands(p.graph_flops)
    );
    let more = |s: &mut String, n: usize| {
        if n > limit {
            let _ = writeln!(s, "  ... {} more", n - limit);
        }
    };
    let _ = writeln!(s, "regions");
    for (i, r) in p.regions.iter().enumerate().take(limit) {
        let _ = writeln!(
            s,
            "  r{i} {} {}x{}@{},{} {} {} flops={} ops={}",
            r.name,
            r.rect.w,
            r.rect.h,
            r.rect.x,
            r.rect.y,
            r.kind,
            r.algorithm,
            r.flops,
            r.ops.len()
        );
    }
    more(&mut s, p.regions.len());
    let _ = writeln!(s, "templates");
    for (i, t) in p.templates.iter().enumerate().take(limit) {
        let _ = write!(s, "  t{i} {} r{} sram={}", t.name, t.region.0, t.sram_bytes);
        for f in &t.fifos {
            let _ = write!(s, " fifo {} x{}", f.color, f.runs);
        }
        let _ = writeln!(s);
        for (k, task) in t.tasks.iter().enumerate() {
            let needs: Vec<String> = task
                .needs
                .iter()
                .map(|nd| match *nd {
                    Need::Recv { color, wavelets } => {
                        if color == crate::mesh::ColorId::LINK {
                            format!("recv link {wavelets}")
                        } else {
                            format!("recv {color} {wavelets}")
                        }
                    }
                    Need::Done { task, times } => format!("done #{} x{times}", task.0),
                    Need::After { task, first, num, den } => format!("after #{} {first}+{num}/{den}", task.0),
                })
                .collect();
            let sends: Vec<String> = task
                .sends
                .iter()
                .map(|x| {
                    let mut v = format!("{} {}{}", x.color, x.wavelets, if x.streamed { " streamed" } else { "" });
                    if let Some(r) = x.runs {
                        let _ = write!(v, " runs {}..={}", r.first, r.last);
                    }
                    v
                })
                .collect();
            let _ = writeln!(
                s,
                "    #{k} {} x{} {} {}{} flops={} needs [{}] sends [{}]",
                task.name,
                task.repeat,
                task.work.op.name(),
                task.work.elems,
                task.work.paced_by.map_or(String::new(), |c| format!(" paced {c}")),
                task.flops,
                needs.join(", "),
                sends.join(", ")
            );
        }
    }
    more(&mut s, p.templates.len());
    let _ = writeln!(s, "tiles");
    for t in p.tiles.iter().take(limit) {
        let r = t.rect;
        let _ = writeln!(s, "  {}x{}@{},{} t{}", r.w, r.h, r.x, r.y, t.template.0);
    }
    more(&mut s, p.tiles.len());
    let _ = writeln!(s, "routes");
    for r in p.routes.iter().take(limit) {
        let senders = match r.senders {
            Senders::Pes(x) => format!("pes {}x{}@{},{}", x.w, x.h, x.x, x.y),
            Senders::Port(id) => format!("port {}", id.0),
        };
        let pat = match r.pattern {
            Pattern::Line { dir, hops, multicast } => {
                format!("line {dir:?} {hops}{}", if multicast { " multicast" } else { "" })
            }
            Pattern::To { dx, dy } => format!("to {dx},{dy}"),
            Pattern::Rect { dx, dy, w, h } => format!("rect {w}x{h}@{dx},{dy}"),
            Pattern::Local => "local".into(),
            Pattern::ToPort { port } => format!("to-port {}", port.0),
        };
        let _ = writeln!(s, "  {} {senders} {pat}", r.color);
    }
    more(&mut s, p.routes.len());
    let _ = writeln!(s, "ports");
    for (i, port) in p.ports.iter().enumerate().take(limit) {
        let _ = writeln!(
            s,
            "  p{i} {} {:?} at {},{} rate {}/{} latency {} peer {:?}{} t{} planned {} B",
            port.name,
            port.side,
            port.at.x,
            port.at.y,
            port.wavelets,
            port.per_cycles,
            port.latency_cycles,
            port.peer,
            port.peer_port.map_or(String::new(), |p| format!(" -> p{}", p.0)),
            port.template.0,
            port.planned_bytes
        );
    }
    more(&mut s, p.ports.len());
    s
}
