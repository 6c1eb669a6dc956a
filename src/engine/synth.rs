//! Synthetic mesh programs with known structure, for benchmarks and engine tests that must not depend
//! on the compiler: the worked GEMV of MACHINE-MODEL.md §2 on an R x C region.

use crate::hw::{SimdOp, WaferHw};
use crate::mesh::*;

/// y[1 x N] = x[1 x K] · W[K x N] in fp16 on a `cols x rows` region at the mesh's north-west corner:
/// the west PE of each row holds its slice of x and multicasts it east (color 0); every PE runs a
/// paced FMAC over its (K/R) x (N/C) weight block; each column reduces southward in a chain on
/// alternating colors 1 and 2.
pub fn gemv(hw: &WaferHw, k: u64, n: u64, cols: u32, rows: u32) -> MeshProgram {
    let (r, c) = (rows as u64, cols as u64);
    let k_r = k.div_ceil(r);
    let n_c = n.div_ceil(c);
    let x_wavelets = k_r.div_ceil(2);
    let part_wavelets = n_c.div_ceil(2);
    let fmac_elems = k_r * n_c;
    let fmac_flops = 2 * fmac_elems;
    let add_flops = n_c;
    let mut templates = Vec::new();
    let mut tiles = Vec::new();
    // Simple, explicit construction: templates keyed by (west, role) where role is top/middle-even/
    // middle-odd/bottom; tiles cover the region in row bands.
    let mut tid = std::collections::BTreeMap::new();
    let mut template = |west: bool, y: u32| -> TemplateId {
        let top = y == 0;
        let bottom = y + 1 == rows;
        let recv_color = ColorId(1 + (y + 1) % 2); // color the partial from the north arrives on
        let send_color = ColorId(1 + y % 2);
        let key = (west, top, bottom, if top || bottom { 0 } else { y % 2 }, if bottom { y % 2 } else { 0 });
        *tid.entry(key).or_insert_with(|| {
            let mut tasks = Vec::new();
            let fmac = Task {
                name: "fmac".into(),
                needs: if west { vec![] } else { vec![Need::Recv { color: ColorId(0), wavelets: x_wavelets }] },
                work: Work {
                    op: SimdOp::FmacF16,
                    elems: fmac_elems,
                    paced_by: if west { None } else { Some(ColorId(0)) },
                },
                sends: if west && cols > 1 {
                    vec![Send { color: ColorId(0), wavelets: x_wavelets, streamed: true, runs: None }]
                } else {
                    vec![]
                },
                repeat: 1,
                flops: fmac_flops,
            };
            tasks.push(fmac);
            let mut needs = vec![Need::Done { task: TaskIdx(0), times: 1 }];
            if !top {
                needs.push(Need::Recv { color: recv_color, wavelets: part_wavelets });
            }
            tasks.push(Task {
                name: "reduce".into(),
                needs,
                work: Work { op: SimdOp::ArithF16, elems: if top { 0 } else { n_c }, paced_by: None },
                sends: if bottom {
                    vec![]
                } else {
                    vec![Send { color: send_color, wavelets: part_wavelets, streamed: false, runs: None }]
                },
                repeat: 1,
                flops: if top { 0 } else { add_flops },
            });
            templates.push(Template {
                name: format!("gemv-{key:?}"),
                region: RegionId(0),
                tasks,
                sram_bytes: fmac_elems * 2,
                fifos: vec![],
            });
            TemplateId(templates.len() as u32 - 1)
        })
    };
    for y in 0..rows {
        tiles.push(Tile { rect: Rect { x: 0, y, w: 1, h: 1 }, template: template(true, y) });
        if cols > 1 {
            tiles.push(Tile { rect: Rect { x: 1, y, w: cols - 1, h: 1 }, template: template(false, y) });
        }
    }
    let mut routes = vec![];
    if cols > 1 {
        routes.push(Route {
            color: ColorId(0),
            senders: Senders::Pes(Rect { x: 0, y: 0, w: 1, h: rows }),
            pattern: Pattern::Line { dir: Dir::East, hops: cols - 1, multicast: true },
            relays: 0,
        });
    }
    // Row y sends its partial south on color 1 + y % 2; one route per row (senders are that row).
    for y in 0..rows.saturating_sub(1) {
        routes.push(Route {
            color: ColorId(1 + y % 2),
            senders: Senders::Pes(Rect { x: 0, y, w: cols, h: 1 }),
            pattern: Pattern::To { dx: 0, dy: 1 },
            relays: 0,
        });
    }
    let flops = (fmac_flops * c * r) + add_flops * c * (r - 1);
    MeshProgram {
        version: PROGRAM_VERSION,
        mesh: hw.mesh,
        timing: Timing::from_hw(hw),
        regions: vec![Region {
            name: "gemv".into(),
            rect: Rect { x: 0, y: 0, w: cols, h: rows },
            ops: vec!["gemv".into()],
            kind: "linear".into(),
            algorithm: "gemv-chain".into(),
            flops,
        }],
        templates,
        tiles,
        routes,
        ports: vec![],
        graph_flops: flops,
        wafer_width: None,
        data: None,
    }
}

/// The same GEMV with a two-level tree reduction over each column (WaferLLM's MeshGEMV with K = 2):
/// rows form groups of `group` consecutive rows; partial sums stream down a chain inside each group
/// to its bottom row (adding as they arrive, colors 1 and 2), then the group bottoms stream down a
/// chain of `group`-hop links to the last row (colors 3 and 4). Streaming adds are paced by the
/// incoming partials, so a stage costs a hop and a pick, not the whole vector.
pub fn gemv_tree(hw: &WaferHw, k: u64, n: u64, cols: u32, rows: u32, group: u32) -> MeshProgram {
    let (r, c) = (rows as u64, cols as u64);
    let group = group.clamp(1, rows);
    let groups = rows.div_ceil(group);
    let k_r = k.div_ceil(r);
    let n_c = n.div_ceil(c);
    let x_wavelets = k_r.div_ceil(2);
    let part = n_c.div_ceil(2);
    let fmac_elems = k_r * n_c;
    let mut templates: Vec<Template> = Vec::new();
    let mut keys: Vec<(bool, u32, bool, u32, bool)> = Vec::new();
    let mut tiles = Vec::new();
    let mut flops = 0u64;
    for y in 0..rows {
        let (gi, i) = (y / group, y % group);
        let g_rows = group.min(rows - gi * group);
        let bottom = i + 1 == g_rows;
        for west in [true, false] {
            if !west && cols == 1 {
                continue;
            }
            // Templates depend on the row's role and its colors' parities, not its absolute position.
            let key = (
                west,
                i.min(2) + if i > 0 && i % 2 == 0 { 10 } else { 0 },
                bottom,
                if bottom { gi.min(1) + (gi % 2) * 2 + if gi + 1 == groups { 4 } else { 0 } } else { 0 },
                i == 0,
            );
            let tid = match keys.iter().position(|k| *k == key) {
                Some(t) => t,
                None => {
                    let mut tasks = Vec::new();
                    tasks.push(Task {
                        name: "fmac".into(),
                        needs: if west { vec![] } else { vec![Need::Recv { color: ColorId(0), wavelets: x_wavelets }] },
                        work: Work {
                            op: SimdOp::FmacF16,
                            elems: fmac_elems,
                            paced_by: if west { None } else { Some(ColorId(0)) },
                        },
                        sends: if west && cols > 1 {
                            vec![Send { color: ColorId(0), wavelets: x_wavelets, streamed: true, runs: None }]
                        } else {
                            vec![]
                        },
                        repeat: 1,
                        flops: 2 * fmac_elems,
                    });
                    let intra_in = ColorId(1 + (i + 1) % 2);
                    let intra_out = ColorId(1 + i % 2);
                    // Intra-group stage: the top row starts the chain; others add the stream from the north.
                    let mut needs = vec![Need::Done { task: TaskIdx(0), times: 1 }];
                    if i > 0 {
                        needs.push(Need::Recv { color: intra_in, wavelets: part });
                    }
                    let intra_sends = if bottom {
                        vec![]
                    } else {
                        vec![Send { color: intra_out, wavelets: part, streamed: true, runs: None }]
                    };
                    tasks.push(Task {
                        name: "reduce".into(),
                        needs,
                        work: Work {
                            op: SimdOp::ArithF16,
                            elems: if i > 0 { n_c } else { 0 },
                            paced_by: if i > 0 { Some(intra_in) } else { None },
                        },
                        sends: intra_sends,
                        repeat: 1,
                        flops: if i > 0 { n_c } else { 0 },
                    });
                    if bottom {
                        let inter_in = ColorId(3 + (gi + 1) % 2);
                        let inter_out = ColorId(3 + gi % 2);
                        let mut needs = vec![Need::Done { task: TaskIdx(1), times: 1 }];
                        if gi > 0 {
                            needs.push(Need::Recv { color: inter_in, wavelets: part });
                        }
                        tasks.push(Task {
                            name: "tree".into(),
                            needs,
                            work: Work {
                                op: SimdOp::ArithF16,
                                elems: if gi > 0 { n_c } else { 0 },
                                paced_by: if gi > 0 { Some(inter_in) } else { None },
                            },
                            sends: if gi + 1 < groups {
                                vec![Send { color: inter_out, wavelets: part, streamed: true, runs: None }]
                            } else {
                                vec![]
                            },
                            repeat: 1,
                            flops: if gi > 0 { n_c } else { 0 },
                        });
                    }
                    templates.push(Template {
                        name: format!("gemv-tree-{key:?}"),
                        region: RegionId(0),
                        tasks,
                        sram_bytes: fmac_elems * 2,
                        fifos: vec![],
                    });
                    keys.push(key);
                    templates.len() - 1
                }
            };
            let per_pe: u64 = templates[tid].tasks.iter().map(|t| t.flops).sum();
            let (x, w) = if west { (0, 1) } else { (1, cols - 1) };
            flops += per_pe * w as u64;
            tiles.push(Tile { rect: Rect { x, y, w, h: 1 }, template: TemplateId(tid as u32) });
        }
    }
    let mut routes = vec![];
    if cols > 1 {
        routes.push(Route {
            color: ColorId(0),
            senders: Senders::Pes(Rect { x: 0, y: 0, w: 1, h: rows }),
            pattern: Pattern::Line { dir: Dir::East, hops: cols - 1, multicast: true },
            relays: 0,
        });
    }
    for y in 0..rows {
        let (gi, i) = (y / group, y % group);
        let g_rows = group.min(rows - gi * group);
        if i + 1 < g_rows {
            routes.push(Route {
                color: ColorId(1 + i % 2),
                senders: Senders::Pes(Rect { x: 0, y, w: cols, h: 1 }),
                pattern: Pattern::To { dx: 0, dy: 1 },
                relays: 0,
            });
        } else if gi + 1 < groups {
            // Group bottom to the next group's bottom.
            let next_bottom = ((gi + 2) * group).min(rows) - 1;
            routes.push(Route {
                color: ColorId(3 + gi % 2),
                senders: Senders::Pes(Rect { x: 0, y, w: cols, h: 1 }),
                pattern: Pattern::To { dx: 0, dy: (next_bottom - y) as i32 },
                relays: 0,
            });
        }
    }
    MeshProgram {
        version: PROGRAM_VERSION,
        mesh: hw.mesh,
        timing: Timing::from_hw(hw),
        regions: vec![Region {
            name: "gemv".into(),
            rect: Rect { x: 0, y: 0, w: cols, h: rows },
            ops: vec!["gemv".into()],
            kind: "linear".into(),
            algorithm: format!("gemv-2tree(group {group})"),
            flops,
        }],
        templates,
        tiles,
        routes,
        ports: vec![],
        graph_flops: flops,
        wafer_width: None,
        data: None,
    }
}
