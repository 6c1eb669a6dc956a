//! The data side table of a region (`mesh::data`): for every task of the region's templates, what it
//! does to values, derived from the stage, its tiling, its interface and the graph op it runs, with
//! the same slicing rules (`kernel::split`, `Flat`, fan-in roles) the region's program was built with.
//!
//! Tasks are recognised by the names `kernel.rs` gives them (`in0.0`, `mm`, `bias`, `stats`, `red1`,
//! `apply`, `look`, `sel1`, `ew`, `gather0`, `out0`, `drain0`, ...). A region whose algorithm, op or
//! task has no data semantics yet gets `TaskData::Refused` for its tasks and a line in `unsupported`, so a
//! functional run refuses the program instead of giving a wrong answer.

use std::collections::BTreeMap;

use crate::graph::{Attn, Elem, Graph, OpKind, TensorId, WeightLayout};
use crate::mesh::data::{AttnShape, EwOp, Grid, Grouped, Kernel, LoopMap, Readout, RowOp, TaskData, TreeRows, View};
use crate::mesh::{ColorId, Coord, Rect, Task};
use crate::model::{NormKind, Phase};

use super::kernel::{Algo, Iface, Tiling, Tree};
use super::stage::{Operand, SlotKind, Stage, Work};

/// The data of one region's templates.
pub(crate) struct RegionData {
    pub tasks: Vec<Vec<TaskData>>,
    pub readouts: Vec<Readout>,
    pub unsupported: Option<String>,
}

fn refuse(templates: &[(String, Vec<Task>, u64)], why: String) -> RegionData {
    RegionData {
        tasks: templates.iter().map(|(_, ts, _)| vec![TaskData::Refused; ts.len()]).collect(),
        readouts: Vec::new(),
        unsupported: Some(why),
    }
}

/// The view of tensor `t`: a split output is columns of the split's input (what really moves); ids
/// (token ids, positions) are one per row.
pub(crate) fn view(g: &Graph, t: TensorId) -> View {
    view_with(g, &g.producers(), t)
}

/// `view` with the graph's producers at hand.
fn view_with(g: &Graph, producers: &[Option<crate::graph::OpId>], t: TensorId) -> View {
    if let Some(p) = producers[t.idx()] {
        let op = g.op(p);
        if let OpKind::Split { widths, .. } = &op.kind {
            let i = op.outputs.iter().position(|&o| o == t).unwrap_or(0);
            let cols: u64 = widths.iter().sum();
            let c0: u64 = widths[..i].iter().sum();
            return View { base: op.inputs[0].0, cols, c0, width: widths.get(i).copied().unwrap_or(0) };
        }
    }
    let tt = g.tensor(t);
    let cols = match tt.elem {
        Elem::Float(_) => tt.shape.last().copied().unwrap_or(1).max(1),
        Elem::I32 => 1,
    };
    View { base: t.0, cols, c0: 0, width: cols }
}

/// The tensors that are concatenations of others' columns (`split_grad` outputs, which never move
/// themselves: their parts do), with their parts' views in column order.
pub(crate) fn concats(g: &Graph) -> BTreeMap<u32, Vec<View>> {
    let producers = g.producers();
    g.op_ids()
        .map(|o| g.op(o))
        .filter(|op| matches!(op.kind, OpKind::SplitGrad { .. }))
        .map(|op| (op.outputs[0].0, op.inputs.iter().map(|&t| view_with(g, &producers, t)).collect()))
        .collect()
}

/// Rows of a view's tensor.
pub(crate) fn view_rows(g: &Graph, t: TensorId, v: &View) -> u64 {
    g.tensor(t).elems() / v.width.max(1)
}

/// The tensors of a folded stage's iterations (`iters`: the ones the program emits, in order): for each,
/// the map from the first layer's tensor ids to that layer's, pairing the instances' ops input by input
/// and output by output (and the tensors a view slices). A first-layer tensor that would stand for two
/// tensors of one layer is an error (the kernels could not tell them apart).
pub(crate) fn loop_map(g: &Graph, st: &Stage, iters: &[u32]) -> Result<LoopMap, String> {
    let producers = g.producers();
    let mut maps = Vec::new();
    for &it in iters {
        let inst = st.inst.get(it as usize).ok_or_else(|| format!("region `{}`: no iteration {it}", st.name))?;
        let mut m: BTreeMap<u32, u32> = BTreeMap::new();
        let mut pair = |a: u32, b: u32| -> Result<(), String> {
            match m.insert(a, b) {
                Some(c) if c != b => Err(format!(
                    "region `{}`: tensor `{}` of the first layer stands for two tensors of layer {it}",
                    st.name,
                    g.tensor(TensorId(a)).name
                )),
                _ => Ok(()),
            }
        };
        for (&a, &b) in st.inst[0].iter().zip(inst) {
            let (oa, ob) = (g.op(a), g.op(b));
            for (&x, &y) in oa.inputs.iter().zip(&ob.inputs).chain(oa.outputs.iter().zip(&ob.outputs)) {
                pair(x.0, y.0)?;
                let (vx, vy) = (view_with(g, &producers, x), view_with(g, &producers, y));
                pair(vx.base, vy.base)?;
            }
        }
        m.retain(|a, b| a != b);
        maps.push(m);
    }
    Ok(LoopMap { maps })
}

/// A folded region's task table with its iteration-bound kernels looped (`TaskData::Looped`) on loop
/// `lp` of `iters` iterations: a task's runs split evenly over the iterations, or (a pair of tasks of
/// the same name, one after the other: odd and even chunks on their own colors) the pair's do, the
/// first taking chunks 1, 3, ... and the second 2, 4, ...; else a reason.
pub(crate) fn looped(
    templates: &[(String, Vec<Task>, u64)],
    tasks: Vec<Vec<TaskData>>,
    lp: u32,
    iters: u64,
) -> (Vec<Vec<TaskData>>, Option<String>) {
    let mut bad = None;
    let out = templates
        .iter()
        .zip(tasks)
        .map(|((tname, ts, _), tds)| {
            let looped: Vec<bool> =
                tds.iter().map(|td| matches!(td, TaskData::Kernel(k) if iteration_bound(k))).collect();
            let pair =
                |i: usize, j: usize| j < ts.len() && looped[i] && looped[j] && ts[i].name == ts[j].name && i != j;
            tds.into_iter()
                .enumerate()
                .map(|(i, td)| {
                    let TaskData::Kernel(kernel) = td else { return td };
                    if !looped[i] {
                        return TaskData::Kernel(kernel);
                    }
                    let rep = ts[i].repeat as u64;
                    let (chunks, stride, offset) = if pair(i, i + 1) {
                        (rep + ts[i + 1].repeat as u64, 2, 0)
                    } else if i > 0 && pair(i - 1, i) {
                        (rep + ts[i - 1].repeat as u64, 2, 1)
                    } else {
                        (rep, 1, 0)
                    };
                    if iters == 0 || !chunks.is_multiple_of(iters) {
                        bad.get_or_insert(format!(
                            "`{tname}` task `{}`: {chunks} runs do not split evenly into the loop's {iters} iterations",
                            ts[i].name
                        ));
                        return TaskData::Refused;
                    }
                    TaskData::Looped { kernel, lp, per_iter: chunks / iters, stride, offset }
                })
                .collect()
        })
        .collect();
    (out, bad)
}

/// Whether a kernel must see the tensors and run numbers of its loop iteration (else it only moves
/// what it claimed, and runs as it is in every iteration).
pub(crate) fn iteration_bound(k: &Kernel) -> bool {
    !matches!(
        k,
        Kernel::Relay
            | Kernel::Store
            | Kernel::Load
            | Kernel::Collect
            | Kernel::Accumulate { .. }
            | Kernel::RowCombine { .. }
            | Kernel::Reduce { bias: None, .. }
    )
}

/// The compute kernels of a stage: (task name -> kernel), by template role; `final_of` says which
/// templates' last task finishes a reduction (lookup trees) with how many terms.
struct Compute {
    by_name: BTreeMap<&'static str, Kernel>,
    final_total: Option<(String, u64)>,
    /// Results the compute block holds at the end (an attention region's updated KV cache).
    readouts: Vec<Readout>,
    /// An attention gradient on summa (dK, dV): its output gateways sum the per-head blocks over each
    /// KV head's query heads (`Kernel::HeadSum`).
    head_sum: Option<(AttnShape, u32)>,
    /// An expert linear's weight gradient with fewer slots than experts: its output gateways sum the
    /// per-slot blocks into each slot's expert (`Kernel::ExpertSum`, written here without its views).
    expert_sum: Option<Kernel>,
}

/// The data table of the region `st` runs on `rect` with tiling `t`, for the templates its program has.
pub(crate) fn region(
    g: &Graph,
    st: &Stage,
    t: &Tiling,
    rect: Rect,
    iface: &Iface,
    templates: &[(String, Vec<Task>, u64)],
) -> RegionData {
    if let Work::SingleGemv { k, n } = st.work {
        return single_gemv(g, st, t, rect, templates, k, n);
    }
    if let (Work::SingleAdd { n }, OpKind::Add { .. }) = (&st.work, &g.op(st.main).kind) {
        let op = g.op(st.main);
        let f = t.frame;
        let grid = Grid { origin: Coord { x: rect.x, y: rect.y + f.row0() }, rows: f.rc(), cols: f.w };
        let (inputs, out) = (op.inputs.iter().map(|t| t.0).collect(), op.outputs[0].0);
        let kernel = Kernel::LocalAdd { grid, inputs, n: *n, out };
        return RegionData {
            tasks: templates.iter().map(|(_, ts, _)| vec![TaskData::Kernel(kernel.clone()); ts.len()]).collect(),
            readouts: vec![Readout {
                tensor: out,
                name: g.tensor(op.outputs[0]).name.clone(),
                rect: Some(Rect { x: rect.x, y: rect.y + f.row0(), w: f.w, h: f.rc() }),
                rows: 1,
                cols: *n,
                cover: 0,
            }],
            unsupported: None,
        };
    }
    let compute = match compute(g, st, t, rect) {
        Ok(c) => c,
        Err(why) => {
            return refuse(
                templates,
                format!("region `{}` ({} with {}): {why}", st.name, st.kind_name(g), t.algo.name()),
            )
        }
    };
    // Output gateways: each send carries the slice its destination stream takes. In a folded loop the
    // destination's tensor may be another layer's instance (the next layer's input, or the head's input
    // from the last layer): the same slice of this region's own output.
    let mut dest_view: BTreeMap<ColorId, Option<View>> = BTreeMap::new();
    for (o, oi) in iface.outs.iter().enumerate() {
        let own = st.outputs.get(o).map(|s| s.tensor.0);
        for d in &oi.dests {
            let v = d.tensor.map(|t| view(g, t)).map(|v| match own {
                // Adam's updated weight refreshes the copies of the weight other regions hold.
                Some(b) if st.iters > 1 || matches!(g.op(st.main).kind, OpKind::Adam { .. }) => View { base: b, ..v },
                _ => v,
            });
            dest_view.insert(d.color, v);
        }
    }
    let mut tasks = Vec::new();
    let mut bad = None;
    for (tname, ts, _) in templates {
        let mut row = Vec::new();
        for (i, task) in ts.iter().enumerate() {
            let name = task.name.as_str();
            let base = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
            let td = match base {
                "in" | "gather" | "w" => TaskData::Kernel(Kernel::Relay),
                _ if name.starts_with('w') && name.contains(".band") => TaskData::Kernel(Kernel::Relay),
                // Weights streamed in: kept for the PE's kernels (also by PEs that only drain them).
                "wload" => TaskData::Kernel(Kernel::Load),
                "drain" if weight_slot(st, name) => TaskData::Kernel(Kernel::Load),
                "out" => {
                    let views = task.sends.iter().map(|s| dest_view.get(&s.color).copied().flatten()).collect();
                    TaskData::Kernel(match (compute.head_sum, &compute.expert_sum) {
                        (Some((attn, out)), _) => Kernel::HeadSum { attn, out, views },
                        (None, Some(Kernel::ExpertSum { slots, experts, k, n, w_out_in, out, .. })) => {
                            let (slots, experts, k, n, w_out_in, out) = (*slots, *experts, *k, *n, *w_out_in, *out);
                            Kernel::ExpertSum { slots, experts, k, n, w_out_in, out, views }
                        }
                        _ => Kernel::Route { views },
                    })
                }
                // The optimizer's updated weights (pipelined training), kept by the PEs that hold the
                // weight for the next step; this step's kernels read the resident image.
                "refresh" => TaskData::Kernel(Kernel::Load),
                "drain" | "credit" => TaskData::None,
                "store" => TaskData::Kernel(Kernel::Store),
                "sel" => {
                    let total = compute
                        .final_total
                        .as_ref()
                        .filter(|(suffix, _)| {
                            // The template's last task before any gather credits.
                            let last = ts.iter().filter(|t| !t.name.starts_with("credit")).count();
                            tname.ends_with(suffix.as_str()) && i + 1 == last
                        })
                        .map(|(_, n)| *n);
                    TaskData::Kernel(Kernel::Accumulate { total })
                }
                _ => match compute.by_name.get(name).or_else(|| compute.by_name.get(base)) {
                    Some(k) => TaskData::Kernel(k.clone()),
                    None => {
                        bad.get_or_insert(format!(
                            "region `{}` ({} with {}): task `{name}` of `{tname}` has no data semantics yet",
                            st.name,
                            st.kind_name(g),
                            t.algo.name()
                        ));
                        TaskData::Refused
                    }
                },
            };
            row.push(td);
        }
        tasks.push(row);
    }
    RegionData { tasks, readouts: compute.readouts, unsupported: bad }
}

/// Whether the task `drain{s}` drains a streamed weight slot.
fn weight_slot(st: &Stage, name: &str) -> bool {
    let s = name.trim_start_matches("drain").parse::<usize>().ok();
    s.and_then(|s| st.inputs.get(s)).is_some_and(|s| s.kind == SlotKind::Weights)
}

/// Whether a matmul kernel reads its weight as `[n, k]` of its own contraction k and output n: a
/// linear's `nn.Linear` layout, or the transpose a data gradient multiplies by (`dx = dy W^T`: its k is
/// the linear's n), which reads an `[in, out]` weight that way.
fn w_out_in(kind: &OpKind, layout: WeightLayout) -> bool {
    (layout == WeightLayout::OutIn) != matches!(kind, OpKind::LinearDgrad(_))
}

/// A stationary operand: resident, or (weight streaming) streamed in every iteration.
fn stationary(st: &Stage, b: Operand) -> bool {
    match b {
        Operand::Held(_) => true,
        Operand::Slot(s) => st.inputs.get(s).is_some_and(|s| s.kind == SlotKind::Weights),
        Operand::Internal => false,
    }
}

/// The kernels of the stage's compute tasks.
fn compute(g: &Graph, st: &Stage, t: &Tiling, rect: Rect) -> Result<Compute, String> {
    let f = t.frame;
    let grid = Grid { origin: Coord { x: rect.x, y: rect.y + f.row0() }, rows: f.rc(), cols: f.w };
    let op = g.op(st.main);
    let runs = t.runs.max(1) as u64;
    let mut by_name = BTreeMap::new();
    let mut final_total = None;
    let mut readouts = Vec::new();
    let mut head_sum = None;
    let mut expert_sum = None;
    let out_of = |o: usize| st.outputs.get(o).map(|s| s.tensor.0).ok_or("no output slot");
    // The main op's input j (streamed in as slot s): a concatenation (`split_grad`) is read as itself,
    // from its parts' slots (`ProgramData::concats`).
    let producers = g.producers();
    let in_view = |j: usize, s: usize| match op.inputs.get(j).and_then(|t| producers[t.idx()]) {
        Some(p) if matches!(g.op(p).kind, OpKind::SplitGrad { .. }) => view(g, op.inputs[j]),
        _ => view(g, st.inputs[s].tensor),
    };
    match (&st.work, t.algo) {
        (&Work::Matmul { a, b, fresh, rows, k, cols, bias, out, .. }, Algo::GemvBroadcast) => {
            let av = in_view(0, a);
            let rows_per_run = rows / runs;
            let out = out_of(out)?;
            match op.kind {
                OpKind::Linear(l) | OpKind::LinearDgrad(l) => {
                    let (av, k, n, grouped) = grouped_operands(&op.kind, &l, av, k, cols)?;
                    if !stationary(st, b) {
                        return Err("a streamed (non-weight) stationary operand".into());
                    }
                    let w = op.inputs[1].0;
                    let w_out_in = w_out_in(&op.kind, l.layout);
                    by_name.insert("mm", Kernel::Linear { grid, a: av, w, w_out_in, k, n, rows_per_run, out, grouped });
                    if bias {
                        by_name.insert("bias", Kernel::Bias { b: op.inputs[2].0 });
                    }
                }
                // dP = dO . V^T is the scores product with dO as queries and V as keys; dQ = dS . K the
                // context product with dS as probabilities and K as values.
                OpKind::AttnScores(at)
                | OpKind::AttnContext(at)
                | OpKind::AttnContextGradP(at)
                | OpKind::AttnScoresGradQ(at) => {
                    let read = st.ops.iter().map(|&o| g.op(o)).find(|o| {
                        matches!(o.kind, OpKind::KvCacheRead { .. }) && o.outputs.first() == op.inputs.get(1)
                    });
                    // Keys (values) from a resident cache and the fresh rows (decode), or all stored
                    // ahead in SRAM (prefill).
                    let (len, cache, fresh) = match (read, fresh, b) {
                        (Some(read), Some(_), Operand::Held(_)) => {
                            let OpKind::KvCacheRead { len, .. } = read.kind else {
                                return Err("attention without a readable KV cache".into());
                            };
                            (len, read.inputs[0].0, view(g, read.inputs[1]))
                        }
                        (None, _, Operand::Slot(s)) => (0, u32::MAX, view(g, st.inputs[s].tensor)),
                        _ => return Err("attention with this KV layout has no data semantics yet".into()),
                    };
                    if runs != 1 {
                        return Err("attention in token chunks has no data semantics yet".into());
                    }
                    let shape = attn_shape(&at, len);
                    // The cache append fused here (the same fresh rows): its PEs keep the updated
                    // cache, which a later decode step starts from.
                    let append = st.ops.iter().map(|&o| g.op(o)).find(|o| {
                        matches!(o.kind, OpKind::KvCacheAppend { .. })
                            && o.inputs.last().map(|&t| view(g, t)) == Some(fresh)
                    });
                    let append = append.and_then(|o| o.outputs.first().copied());
                    if let Some(t) = append {
                        let (tensor, cols) = (g.tensor(t), at.kv_heads * at.head_dim);
                        if tensor.elems() != at.batch * at.kv_len * cols {
                            return Err(format!("a KV cache `{}` of an unexpected shape", tensor.name));
                        }
                        readouts.push(Readout {
                            tensor: t.0,
                            name: tensor.name.clone(),
                            rect: Some(Rect { x: grid.origin.x, y: grid.origin.y, w: grid.cols, h: grid.rows }),
                            rows: at.batch * at.kv_len,
                            cols,
                            cover: 0,
                        });
                    }
                    let append = append.map(|t| t.0);
                    let kernel = if matches!(op.kind, OpKind::AttnScores(_) | OpKind::AttnContextGradP(_)) {
                        Kernel::AttnScores { grid, q: av, cache, fresh, attn: shape, out, append }
                    } else {
                        Kernel::AttnContext { grid, p: av, cache, fresh, attn: shape, out, append }
                    };
                    by_name.insert("mm", kernel);
                }
                _ => return Err("this matmul has no data semantics yet".into()),
            }
        }
        (&Work::RowReduce { main, rows, width, out, colsum: None, scalar, .. }, Algo::RowReduce)
            if matches!(op.kind, OpKind::CrossEntropy { .. } | OpKind::CrossEntropyGrad { .. }) =>
        {
            // Cross-entropy: the loss (a scalar, summed down the rows' roots once per step) or its
            // gradient (the apply pass).
            let x = view(g, st.inputs[main].tensor);
            let labels = view(g, op.inputs[1]);
            let grad = matches!(op.kind, OpKind::CrossEntropyGrad { .. });
            let rop = RowOp::CrossEntropy { labels, grad };
            let rows_per_run = rows / runs;
            by_name.insert("stats", Kernel::RowStats { grid, op: rop, x, rows_per_run, width });
            by_name.insert("red", Kernel::RowCombine { op: rop, width });
            match (out, scalar) {
                (Some(o), None) if grad => {
                    let out = out_of(o)?;
                    by_name.insert("apply", Kernel::RowApply { grid, op: rop, x, rows_per_run, width, out });
                }
                (None, Some(o)) if !grad => {
                    let out = out_of(o)?;
                    by_name.insert("colsum", Kernel::LossSum { grid, total: rows, labels: labels.base, out });
                }
                _ => return Err("a cross-entropy with unexpected outputs".into()),
            }
        }
        (
            &Work::RowReduce { main, rows, width, out: Some(out), colsum: Some(_), scalar: None, .. },
            Algo::RowReduce,
        ) if matches!(op.kind, OpKind::NormGrad { .. }) => {
            let OpKind::NormGrad { kind, .. } = op.kind else { unreachable!("matched above") };
            let dy = view(g, st.inputs[main].tensor);
            let rop = RowOp::NormGrad {
                x: view(g, op.inputs[0]),
                gamma: op.inputs[1].0,
                rms: kind == NormKind::RmsNorm,
                dgamma: op.outputs[1].0,
                dbeta: op.outputs.get(2).map(|t| t.0),
            };
            let rows_per_run = rows / runs;
            by_name.insert("stats", Kernel::RowStats { grid, op: rop, x: dy, rows_per_run, width });
            by_name.insert("red", Kernel::RowCombine { op: rop, width });
            by_name.insert("apply", Kernel::RowApply { grid, op: rop, x: dy, rows_per_run, width, out: out_of(out)? });
            by_name.insert("colsum", Kernel::ColSum { grid, total: rows });
        }
        (&Work::RowReduce { main, rows, width, out: Some(out), colsum: None, scalar: None, .. }, Algo::RowReduce) => {
            let x = view(g, st.inputs[main].tensor);
            let rop = match op.kind {
                OpKind::Norm { kind, .. } => RowOp::Norm {
                    gamma: op.inputs[1].0,
                    beta: (kind == NormKind::LayerNorm).then(|| op.inputs.get(2).map(|t| t.0)).flatten(),
                    rms: kind == NormKind::RmsNorm,
                },
                OpKind::AttnSoftmax(a) => {
                    RowOp::Softmax { q: a.q_len, kv: a.kv_len, head_dim: a.head_dim, causal: a.causal }
                }
                OpKind::AttnSoftmaxGrad(a) => RowOp::SoftmaxGrad { p: view(g, op.inputs[0]), head_dim: a.head_dim },
                OpKind::MoeTopK(r) => RowOp::MoeTopK { k: r.top_k },
                // The renormalised top-k is a softmax over the chosen logits: its gradient is the
                // softmax's, `p * (dp - sum(p * dp))`, unscaled (the probabilities are zero elsewhere).
                OpKind::MoeTopKGrad(_) => RowOp::SoftmaxGrad { p: view(g, op.inputs[0]), head_dim: 1 },
                _ => return Err("this row reduction has no data semantics yet".into()),
            };
            let rows_per_run = rows / runs;
            by_name.insert("stats", Kernel::RowStats { grid, op: rop, x, rows_per_run, width });
            by_name.insert("red", Kernel::RowCombine { op: rop, width });
            by_name.insert("apply", Kernel::RowApply { grid, op: rop, x, rows_per_run, width, out: out_of(out)? });
        }
        (&Work::Matmul { a, b, rows, k, cols, bias, out, .. }, Algo::GemvTree) => {
            let (OpKind::Linear(l) | OpKind::LinearDgrad(l)) = op.kind else {
                return Err("this matmul has no data semantics yet".into());
            };
            let (av, kg, n, grouped) = grouped_operands(&op.kind, &l, in_view(0, a), k, cols)?;
            if !stationary(st, b) {
                return Err("a streamed (non-weight) stationary operand".into());
            }
            let tree = TreeRows { rc: f.rc() as u64, g: Tree::new(f.rc() as u64).g };
            let (w, w_out_in) = (op.inputs[1].0, w_out_in(&op.kind, l.layout));
            let out = out_of(out)?;
            let rows_per_run = rows / runs;
            by_name.insert(
                "mm",
                Kernel::TreePartial { grid, tree, a: av, w, w_out_in, k: kg, n, rows_per_run, out, grouped },
            );
            by_name.insert("red1", Kernel::Reduce { total: None, bias: None });
            let b = bias.then(|| op.inputs[2].0);
            by_name.insert("red2", Kernel::Reduce { total: Some(k), bias: b });
        }
        (&Work::Elementwise { rows, width, accumulate: false, .. }, Algo::Elementwise)
            if matches!(op.kind, OpKind::Adam { .. }) =>
        {
            let OpKind::Adam { master, .. } = op.kind else { unreachable!("matched above") };
            let ins: Vec<u32> = op.inputs.iter().map(|t| t.0).collect();
            let outs: Vec<u32> = op.outputs.iter().map(|t| t.0).collect();
            if ins.len() < 4 + master as usize || outs.len() < 3 + master as usize {
                return Err("an Adam op with unexpected operands".into());
            }
            let gv = view(g, op.inputs[1]);
            let rows_per_run = rows / runs;
            // The gradient (where it is a whole tensor laid out as the weight), the updated weight and
            // the moments stay on the Adam region's PEs, each element on one.
            let whole = gv.c0 == 0 && gv.width == gv.cols && g.tensor(op.inputs[1]).elems() == rows * width;
            if whole {
                readouts.push(Readout {
                    tensor: gv.base,
                    name: g.tensor(TensorId(gv.base)).name.clone(),
                    rect: Some(Rect { x: grid.origin.x, y: grid.origin.y, w: grid.cols, h: grid.rows }),
                    rows: rows * width / gv.cols.max(1),
                    cols: gv.cols,
                    cover: 0,
                });
            }
            for &t in &outs {
                readouts.push(Readout {
                    tensor: t,
                    name: g.tensor(TensorId(t)).name.clone(),
                    rect: Some(Rect { x: grid.origin.x, y: grid.origin.y, w: grid.cols, h: grid.rows }),
                    rows,
                    cols: width,
                    cover: 0,
                });
            }
            by_name.insert(
                "ew",
                Kernel::Adam {
                    grid,
                    w: ins[0],
                    g: gv,
                    m: ins[2],
                    v: ins[3],
                    master: master.then(|| ins[4]),
                    rows,
                    rows_per_run,
                    width,
                    outs: outs.clone(),
                    keep_grad: whole,
                },
            );
        }
        (&Work::Elementwise { accumulate: false, .. }, Algo::Elementwise)
            if matches!(
                op.kind,
                OpKind::MoeDispatch(_) | OpKind::MoeCombine(_) | OpKind::MoeDispatchGrad(_) | OpKind::MoeCombineGrad(_)
            ) =>
        {
            // The routing of every token decides which rows go where: only one run over them all has it.
            if runs != 1 {
                return Err(format!("a MoE dispatch or combine in {runs} token chunks has no data semantics"));
            }
            let (x, probs, out) = (view(g, op.inputs[0]), view(g, op.inputs[1]), out_of(0)?);
            let kernel = match op.kind {
                OpKind::MoeDispatch(route) => Kernel::MoeDispatch { grid, x, probs, route, out },
                OpKind::MoeCombine(route) => Kernel::MoeCombine { grid, yd: x, probs, route, out },
                OpKind::MoeDispatchGrad(route) => Kernel::MoeDispatchGrad { grid, dxd: x, probs, route, out },
                OpKind::MoeCombineGrad(route) => {
                    let (yd, probs) = (view(g, op.inputs[1]), view(g, op.inputs[2]));
                    Kernel::MoeCombineGrad { grid, dy: x, yd, probs, route, out, dprobs: out_of(1)? }
                }
                _ => unreachable!("matched above"),
            };
            by_name.insert("ew", kernel);
        }
        (&Work::Elementwise { rows, accumulate: false, .. }, Algo::Elementwise) => {
            let pos0 = if g.workload.phase == Phase::Decode { g.workload.context } else { 0 };
            let (ewop, inputs) = match op.kind {
                OpKind::Add { .. } => (EwOp::Add, op.inputs.clone()),
                OpKind::Gelu(_) => (EwOp::Gelu, vec![op.inputs[0]]),
                OpKind::SwiGlu(_) => (EwOp::SwiGlu, op.inputs.clone()),
                OpKind::SwiGluGrad(_) => (EwOp::SwiGluGrad, op.inputs.clone()),
                OpKind::Tanh(_) => (EwOp::Tanh, vec![op.inputs[0]]),
                OpKind::TanhGrad(_) => (EwOp::TanhGrad, op.inputs.clone()),
                OpKind::TokenSelectGrad { seq, pick, .. } => {
                    (EwOp::SelectGrad { seq, last: pick == crate::graph::Pick::Last }, vec![op.inputs[0]])
                }
                OpKind::GeluGrad(_) => (EwOp::GeluGrad, op.inputs.clone()),
                OpKind::TokenSelect { seq, pick, .. } => {
                    (EwOp::Select { seq, last: pick == crate::graph::Pick::Last }, vec![op.inputs[0]])
                }
                OpKind::Rotary { heads, head_dim, rot_dims, .. }
                | OpKind::RotaryGrad { heads, head_dim, rot_dims, .. } => {
                    let inverse = matches!(op.kind, OpKind::RotaryGrad { .. });
                    let seq = g.workload.seq;
                    (EwOp::Rotary { heads, head_dim, rot_dims, pos0, seq, inverse }, vec![op.inputs[0]])
                }
                _ => return Err("this elementwise op has no data semantics yet".into()),
            };
            let inputs: Vec<View> = inputs.iter().map(|&t| view(g, t)).collect();
            let out = out_of(0)?;
            let out2 = match ewop {
                EwOp::SwiGluGrad => Some(out_of(1)?),
                _ => None,
            };
            let width = view(g, TensorId(out)).width;
            // (A token select's gradient runs per sequence: its rows are sequences of `seq` output rows.)
            let rows_per_run = match op.kind {
                OpKind::TokenSelectGrad { seq, .. } => rows * seq / runs,
                _ => rows / runs,
            };
            by_name.insert("ew", Kernel::Elementwise { grid, op: ewop, inputs, rows_per_run, width, out, out2 });
        }
        (&Work::Relay { rows, width, .. }, Algo::Elementwise) => {
            // Rows MemoryX looked up (`Kernel::Gather`), relayed on as the embedding's output.
            let out = out_of(0)?;
            let inputs = vec![view(g, TensorId(out))];
            by_name.insert(
                "ew",
                Kernel::Elementwise { grid, op: EwOp::Copy, inputs, rows_per_run: rows / runs, width, out, out2: None },
            );
        }
        (&Work::Lookup { ids, rows, width, out }, Algo::LookupTree) => {
            let OpKind::Embedding { vocab, .. } = op.kind else {
                return Err("a lookup that is not an embedding".into());
            };
            let idv = view(g, st.inputs[ids].tensor);
            let table = op.inputs[1].0;
            let out = out_of(out)?;
            by_name
                .insert("look", Kernel::Lookup { grid, ids: idv, table, vocab, width, rows_per_run: rows / runs, out });
            final_total = Some(("look2".to_string(), f.rc() as u64));
        }
        (&Work::Accum { x, dy, out, .. }, Algo::Summa)
            if matches!(op.kind, OpKind::AttnScoresGradK(_) | OpKind::AttnContextGradV(_)) =>
        {
            let (OpKind::AttnScoresGradK(at) | OpKind::AttnContextGradV(at)) = op.kind else {
                unreachable!("matched above")
            };
            if runs != 1 {
                return Err("attention gradients in token chunks have no data semantics yet".into());
            }
            let attn = attn_shape(&at, 0);
            let (p, xv) = (view(g, st.inputs[x].tensor), view(g, st.inputs[dy].tensor));
            let out = out_of(out)?;
            by_name.insert("acc", Kernel::AttnKvGrad { grid, p, x: xv, attn, out });
            by_name.insert("emit", Kernel::WgradEmit);
            head_sum = Some((attn, out));
        }
        (&Work::Elementwise { main: Some(dy), rows, width, accumulate: true, .. }, Algo::Elementwise)
            if matches!(op.kind, OpKind::EmbeddingGrad { .. }) =>
        {
            let OpKind::EmbeddingGrad { vocab, .. } = op.kind else { unreachable!("matched above") };
            let (ids, dyv) = (view(g, op.inputs[0]), view(g, st.inputs[dy].tensor));
            let out = out_of(0)?;
            let rows_per_run = rows / runs;
            by_name.insert("ew", Kernel::EmbedGradAcc { grid, ids, dy: dyv, vocab, width, rows_per_run, out });
            by_name.insert("emit", Kernel::WgradEmit);
        }
        (&Work::Accum { x, dy, rows, k, cols, out, bias_out }, Algo::Summa) => {
            let OpKind::LinearWgrad(l) = op.kind else {
                return Err("this accumulation has no data semantics yet".into());
            };
            let (mut xv, mut dyv) = (in_view(0, x), in_view(1, dy));
            let (mut k, mut cols, mut grouped) = (k, cols, None);
            if l.groups != 1 || l.weight_groups != 1 {
                // Slot e is expert e's when every expert is active (`Route::dispatch`): the block of
                // slot e's columns is expert e's gradient. With fewer slots than experts (each copy in
                // its own slot) two slots may hold one expert, whose gradient is the sum of their
                // blocks, held by other PEs: the output gateway, which gathers every block, sums them.
                if l.groups > l.weight_groups {
                    return Err("an expert linear's weight gradient with more slots than experts".into());
                }
                if bias_out.is_some() {
                    return Err("a grouped (expert) linear layer with a bias has no data semantics yet".into());
                }
                let whole = |v: &View, w: u64| v.c0 == 0 && v.width == v.cols && v.width == w;
                if !whole(&xv, l.k) || !whole(&dyv, l.n) {
                    return Err("a grouped (expert) linear layer on a slice of its operand".into());
                }
                let s = l.groups;
                xv = View { base: xv.base, cols: s * l.k, c0: 0, width: s * l.k };
                dyv = View { base: dyv.base, cols: s * l.n, c0: 0, width: s * l.n };
                (k, cols, grouped) = (l.k, l.n, Some(Grouped { slots: s, experts: l.weight_groups }));
            }
            let out = out_of(out)?;
            if let Some(gr) = grouped.filter(|g| g.slots < g.experts) {
                let (slots, experts, w_out_in) = (gr.slots, gr.experts, l.layout == WeightLayout::OutIn);
                expert_sum = Some(Kernel::ExpertSum { slots, experts, k, n: cols, w_out_in, out, views: Vec::new() });
            }
            let bias = match bias_out {
                Some(b) => Some(out_of(b)?),
                None => None,
            };
            let w_out_in = l.layout == WeightLayout::OutIn;
            let rows_per_run = rows / runs;
            let kernel =
                Kernel::WgradAcc { grid, x: xv, dy: dyv, k, n: cols, rows_per_run, w_out_in, out, bias, grouped };
            by_name.insert("acc", kernel);
            // The bias gradient is summed by `acc`, which holds the rows of dy.
            by_name.insert("dbias", Kernel::Relay);
            by_name.insert("emit", Kernel::WgradEmit);
        }
        _ => return Err("functional mode has no data semantics for this algorithm yet".into()),
    }
    Ok(Compute { by_name, final_total, readouts, head_sum, expert_sum })
}

/// `gemv:KxN` on pre-placed operands (`kernel::prog_single_gemv`): the PE at (r, c) of the compute
/// block holds x's k-slice r and W's block (r, c); partial sums chain down each group of rows, the
/// group sums chain over the leaders to the root (the last row), whose accumulators hold y.
fn single_gemv(
    g: &Graph,
    st: &Stage,
    t: &Tiling,
    rect: Rect,
    templates: &[(String, Vec<Task>, u64)],
    k: u64,
    n: u64,
) -> RegionData {
    let op = g.op(st.main);
    let OpKind::Linear(l) = op.kind else {
        return refuse(templates, format!("region `{}`: a single GEMV that is not a linear op", st.name));
    };
    if t.algo == Algo::Cannon || op.inputs.len() < 2 || op.outputs.is_empty() {
        return refuse(templates, format!("region `{}`: an unexpected single-GEMV layout", st.name));
    }
    let f = t.frame;
    let (rows, cols) = ((f.rc() as u64).min(k) as u32, (f.w as u64).min(n) as u32);
    let origin = Coord { x: rect.x, y: rect.y + f.row0() };
    let grid = Grid { origin, rows, cols };
    let (x, w, out) = (op.inputs[0].0, op.inputs[1].0, op.outputs[0].0);
    let w_out_in = l.layout == WeightLayout::OutIn;
    let tasks = templates
        .iter()
        .map(|(_, ts, _)| {
            ts.iter()
                .map(|task| match task.name.as_str() {
                    "mm" => TaskData::Kernel(Kernel::GemvPartial { grid, x, w, w_out_in, k, n, out }),
                    _ => TaskData::Kernel(Kernel::Accumulate { total: None }),
                })
                .collect()
        })
        .collect();
    let root = Rect { x: origin.x, y: origin.y + rows.saturating_sub(1), w: cols, h: 1 };
    RegionData {
        tasks,
        readouts: vec![Readout {
            tensor: out,
            name: g.tensor(op.outputs[0]).name.clone(),
            rect: Some(root),
            rows: 1,
            cols: n,
            cover: k,
        }],
        unsupported: None,
    }
}

/// A linear's operand view, contraction and output columns as its kernel reads them: a plain layer's
/// as they are; a grouped (expert) linear's operand as `[capacity, slots * k]` (the capacity-major
/// dispatched rows, `Route::dispatch`), with `k` and `n` per slot and the slot count.
fn grouped_operands(
    kind: &OpKind,
    l: &crate::graph::Linear,
    a: View,
    k: u64,
    cols: u64,
) -> Result<(View, u64, u64, Option<Grouped>), String> {
    if l.groups == 1 && l.weight_groups == 1 {
        return Ok((a, k, cols, None));
    }
    if l.bias {
        return Err("a grouped (expert) linear layer with a bias has no data semantics yet".into());
    }
    // The data gradient multiplies by the transposed weight: its contraction is the layer's n.
    let per_slot = if matches!(kind, OpKind::LinearDgrad(_)) { l.k } else { l.n };
    if a.c0 != 0 || a.width != a.cols || a.width != k || cols != l.groups * per_slot {
        return Err("a grouped (expert) linear layer on a slice of its operand".into());
    }
    let grouped = Grouped { slots: l.groups, experts: l.weight_groups };
    Ok((View { base: a.base, cols: l.groups * k, c0: 0, width: l.groups * k }, k, per_slot, Some(grouped)))
}

/// The values kernels' view of an attention op: its sizes, with `len` rows of KV cache already resident.
fn attn_shape(at: &Attn, len: u64) -> AttnShape {
    AttnShape {
        batch: at.batch,
        heads: at.heads,
        kv_heads: at.kv_heads,
        kv: at.kv_len,
        head_dim: at.head_dim,
        q_len: at.q_len,
        len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The data table's restatement of the gemv-tree's rows agrees with the tiling's own.
    #[test]
    fn tree_rows_agree_with_the_tiling() {
        for rc in 1..200u64 {
            let t = Tree::new(rc);
            let d = TreeRows { rc, g: t.g };
            for r in 0..rc {
                assert_eq!(d.role(r), t.role(r), "rc {rc} row {r}");
            }
            assert_eq!(d.compute_rows(), t.compute_rows(), "rc {rc}");
        }
    }
}
