//! The plan summary: what `wafer compile` and `wafer plan` print (text with an ASCII map of the wafer,
//! or JSON), and the display part of a plan file.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::fmt::{human, thousands};

/// The name of phase `i` of a weight-streaming training step of `phases` phases: the forward pass, then
/// the backward pass; when the backward pass does not fit the wafer at once, the head's backward (the
/// once-stages before the backward layer loop) runs first on the whole wafer, then the loop.
pub fn phase_name(i: u32, phases: u32) -> &'static str {
    match (i, phases) {
        (0, _) => "forward",
        (1, 3..) => "head-backward",
        _ => "backward",
    }
}

/// One region: the PEs of one stage (an op, or a fused group; all layers' instances when folded).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanRegion {
    pub wafer: u32,
    /// Phase (weight-streaming training: 0 forward, 1 backward; or 1 the head's backward and 2 the rest, see
    /// `phase_name`), else 0.
    pub phase: u32,
    pub name: String,
    /// Op kind of the main op (`linear`, `attn_scores`, ...).
    pub kind: String,
    /// `fwd`, `bwd`, `rc`, `opt`.
    pub pass: String,
    /// Graph ops the region executes (all layers when folded).
    pub ops: u64,
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
    /// Mesh algorithm and why it was chosen.
    pub algorithm: String,
    pub reason: String,
    /// Shape of the work (`rows x k x cols`, `rows x width`).
    pub shape: String,
    /// Compute runs per iteration (token chunks) and iterations (layers, when folded).
    pub runs: u32,
    pub iters: u32,
    /// Data SRAM per PE: the largest class and the mean over the region's PEs, bytes.
    pub sram_max: u64,
    pub sram_mean: u64,
    /// Colors the region's own collectives use, and the most in use at any of its routers.
    pub colors_internal: u32,
    pub colors_max: u32,
    pub flops: u64,
    /// Bytes in and out through IO ports per step for this region.
    pub io_bytes: u64,
}

/// A stream between regions or between a region and IO ports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanStream {
    pub wafer: u32,
    pub phase: u32,
    pub name: String,
    pub from: String,
    pub to: String,
    pub bytes: u64,
    /// Colors of its routes (one per band or channel).
    pub colors: Vec<u32>,
    /// Router hops of its longest route.
    pub hops: u64,
}

/// An IO channel in use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanPort {
    pub wafer: u32,
    pub phase: u32,
    pub name: String,
    pub side: String,
    pub x: u32,
    pub y: u32,
    pub peer: String,
    pub bytes_per_s: f64,
    /// Bytes through the channel per step.
    pub bytes: u64,
    pub streams: Vec<String>,
}

/// Size of the lowered program.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramStats {
    pub templates: u64,
    pub tiles: u64,
    pub routes: u64,
    pub ports: u64,
    pub tasks: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanSummary {
    pub model: String,
    pub workload: String,
    pub hardware: String,
    pub mesh_width: u32,
    pub mesh_height: u32,
    pub mode: String,
    pub mode_reason: String,
    pub wafers: u32,
    /// Programs run one after the other on the wafer (weight-streaming training: 2), else 1.
    pub phases: u32,
    /// Training in micro-batches: the programs run this many times per step (gradient accumulation), else 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub micro_batches: u32,
    /// Layers folded into one loop (weight streaming), else 1.
    pub layers_folded: u32,
    pub bands: u32,
    /// FLOPs the wafer(s) execute, and those run off the wafer (the optimizer in MemoryX).
    pub wafer_flops: u64,
    pub offload_flops: u64,
    pub regions: Vec<PlanRegion>,
    pub streams: Vec<PlanStream>,
    pub ports: Vec<PlanPort>,
    pub notes: Vec<String>,
    pub program: ProgramStats,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// Symbol of region i on the map.
fn symbol(i: usize) -> char {
    const S: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    S.get(i).map_or('#', |&b| b as char)
}

impl PlanSummary {
    /// The ASCII map of wafer `w`: regions by symbol, idle PEs as `.`, IO channels on the border.
    pub fn map(&self, wafer: u32, phase: u32, max_cols: usize, max_rows: usize) -> String {
        let (mw, mh) = (self.mesh_width as usize, self.mesh_height as usize);
        let cols = mw.min(max_cols).max(1);
        let rows = mh.min(max_rows).max(1);
        let regions: Vec<(usize, &PlanRegion)> =
            self.regions.iter().filter(|r| r.wafer == wafer && r.phase == phase).enumerate().collect();
        let mut grid = vec![vec!['.'; cols]; rows];
        for (ry, line) in grid.iter_mut().enumerate() {
            for (cx, cell) in line.iter_mut().enumerate() {
                // The PE at the cell's centre.
                let x = (2 * cx + 1) * mw / (2 * cols);
                let y = (2 * ry + 1) * mh / (2 * rows);
                if let Some((i, _)) = regions.iter().find(|(_, r)| {
                    x >= r.x as usize && x < (r.x + r.w) as usize && y >= r.y as usize && y < (r.y + r.h) as usize
                }) {
                    *cell = symbol(*i);
                }
            }
        }
        let mut border_w = vec![' '; rows];
        let mut border_e = vec![' '; rows];
        let mut border_n = vec!['-'; cols];
        let mut border_s = vec!['-'; cols];
        for p in self.ports.iter().filter(|p| p.wafer == wafer && p.phase == phase) {
            let ry = (p.y as usize * rows / mh.max(1)).min(rows - 1);
            let cx = (p.x as usize * cols / mw.max(1)).min(cols - 1);
            match p.side.as_str() {
                "west" => border_w[ry] = '>',
                "east" => border_e[ry] = '<',
                "north" => border_n[cx] = 'v',
                _ => border_s[cx] = '^',
            }
        }
        let mut s = String::new();
        let _ = writeln!(s, " +{}+", border_n.iter().collect::<String>());
        for (ry, line) in grid.iter().enumerate() {
            let _ = writeln!(s, "{}|{}|{}", border_w[ry], line.iter().collect::<String>(), border_e[ry]);
        }
        let _ = writeln!(s, " +{}+", border_s.iter().collect::<String>());
        let _ = writeln!(
            s,
            "  {} x {} PEs shown as {} x {}; `>`/`<` IO channels on the west/east edge, `.` idle PEs",
            mw, mh, cols, rows
        );
        s
    }

    /// The text printed by `wafer compile` and `wafer plan`: header, map, tables.
    pub fn to_text(&self, map_cols: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "plan        {} on {}  ({} x {} PEs)",
            self.model, self.hardware, self.mesh_width, self.mesh_height
        );
        let _ = writeln!(s, "workload    {}", self.workload);
        let _ = writeln!(s, "mode        {}: {}", self.mode, self.mode_reason);
        if self.wafers > 1 {
            let _ = writeln!(s, "wafers      {}", self.wafers);
        }
        if self.micro_batches > 1 {
            let _ = writeln!(
                s,
                "micro       {} micro-batches per step through the same programs (gradient accumulation)",
                self.micro_batches
            );
        }
        if self.layers_folded > 1 {
            let _ = writeln!(
                s,
                "layers      {} folded into one loop (each layer's region runs once per layer)",
                self.layers_folded
            );
        }
        let _ = writeln!(
            s,
            "flops       {} on the {}{}",
            thousands(self.wafer_flops),
            if self.wafers > 1 { format!("{} wafers", self.wafers) } else { "wafer".into() },
            if self.offload_flops > 0 {
                format!(", {} in MemoryX (optimizer)", thousands(self.offload_flops))
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "program     {} regions, {} templates, {} tiles, {} routes, {} IO channels, {} tasks",
            self.regions.len(),
            self.program.templates,
            self.program.tiles,
            self.program.routes,
            self.program.ports,
            self.program.tasks
        );
        for w in 0..self.wafers {
            for ph in 0..self.phases {
                let _ = writeln!(s);
                if self.wafers > 1 {
                    let _ = writeln!(s, "wafer {w}");
                }
                if self.phases > 1 {
                    let _ = writeln!(s, "phase {ph}: {}", phase_name(ph, self.phases));
                }
                s.push_str(&self.map(w, ph, map_cols, (map_cols / 2).max(8)));
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<3} {:<28} {:<18} {:<13} {:>7} {:<15} {:>5} {:>9} {:>9} {:>6} {:>10}",
            "", "region", "op", "rect", "PEs", "algorithm", "runs", "sram max", "sram mean", "colors", "io bytes"
        );
        let mut idx: std::collections::BTreeMap<(u32, u32), usize> = std::collections::BTreeMap::new();
        for r in &self.regions {
            if (self.wafers > 1 || self.phases > 1) && !idx.contains_key(&(r.wafer, r.phase)) {
                let mut head = Vec::new();
                if self.wafers > 1 {
                    head.push(format!("wafer {}", r.wafer));
                }
                if self.phases > 1 {
                    head.push(format!("phase {}", r.phase));
                }
                let _ = writeln!(s, "    {}", head.join(", "));
            }
            let e = idx.entry((r.wafer, r.phase)).or_default();
            let i = *e;
            *e += 1;
            let name = if r.name.len() > 28 { format!("{}~", &r.name[..27]) } else { r.name.clone() };
            let runs = if r.iters > 1 { format!("{}x{}", r.runs, r.iters) } else { r.runs.to_string() };
            let _ = writeln!(
                s,
                "{:<3} {:<28} {:<18} {:<13} {:>7} {:<15} {:>5} {:>9} {:>9} {:>6} {:>10}",
                symbol(i),
                name,
                r.kind,
                format!("{}x{}@{},{}", r.w, r.h, r.x, r.y),
                thousands(r.w as u64 * r.h as u64),
                r.algorithm,
                runs,
                thousands(r.sram_max),
                thousands(r.sram_mean),
                format!("{}/{}", r.colors_internal, r.colors_max),
                thousands(r.io_bytes)
            );
        }
        let _ = writeln!(
            s,
            "    runs: compute runs (token chunks) per iteration x iterations (folded layers); sram: data bytes \
             per PE;\n    colors: the region's own collectives / the most in use at any of its routers; io bytes: \
             per step through IO ports"
        );
        let _ = writeln!(s, "\nshapes and algorithm choices");
        for r in &self.regions {
            let _ = writeln!(s, "  {}: {}; {}", r.name, r.shape, r.reason);
        }
        if !self.ports.is_empty() {
            let _ = writeln!(s, "\nIO channels");
            let _ = writeln!(
                s,
                "  {:<10} {:<6} {:<11} {:<8} {:>12} {:>14}  streams",
                "channel", "side", "router", "peer", "rate", "bytes/step"
            );
            for p in &self.ports {
                let _ = writeln!(
                    s,
                    "  {:<10} {:<6} {:<11} {:<8} {:>12} {:>14}  {}",
                    if self.wafers > 1 {
                        format!("w{}.{}", p.wafer, p.name)
                    } else if self.phases > 1 {
                        format!("p{}.{}", p.phase, p.name)
                    } else {
                        p.name.clone()
                    },
                    p.side,
                    format!("({}, {})", p.x, p.y),
                    p.peer,
                    human(p.bytes_per_s, "B/s"),
                    thousands(p.bytes),
                    p.streams.join(", ")
                );
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\nnotes");
            for n in &self.notes {
                let _ = writeln!(s, "  - {n}");
            }
        }
        s
    }

    /// The streams table (`--dump-after route`).
    pub fn streams_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "streams ({})", self.streams.len());
        for st in &self.streams {
            let _ = writeln!(
                s,
                "  {:<34} {:<26} -> {:<26} {:>14} B  colors {:?}  hops {}",
                st.name,
                st.from,
                st.to,
                thousands(st.bytes),
                st.colors,
                st.hops
            );
        }
        s
    }
}
