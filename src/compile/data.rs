//! The data side table of a region (`mesh::data`): for every task of the region's templates, what it
//! does to values, derived from the stage, its tiling and the graph op it runs, with the same slicing
//! rules (`kernel::split`, fan-in roles) the region's program was built with.
//!
//! A region whose algorithm has no data semantics yet gets `TaskData::None` for its tasks and a line
//! in `unsupported`, so a functional run refuses the program instead of giving a wrong answer.

use crate::graph::{Graph, OpKind, WeightLayout};
use crate::mesh::data::{Grid, Kernel, Readout, TaskData};
use crate::mesh::{Coord, Rect, Task};

use super::kernel::{Algo, Tiling};
use super::stage::{Stage, Work};

/// The data of one region's templates.
pub(crate) struct RegionData {
    pub tasks: Vec<Vec<TaskData>>,
    pub readouts: Vec<Readout>,
    pub unsupported: Option<String>,
}

fn unsupported(templates: &[(String, Vec<Task>, u64)], why: String) -> RegionData {
    RegionData {
        tasks: templates.iter().map(|(_, ts, _)| vec![TaskData::None; ts.len()]).collect(),
        readouts: Vec::new(),
        unsupported: Some(why),
    }
}

/// The data table of the region `st` runs on `rect` with tiling `t`, for the templates its program has.
pub(crate) fn region(
    g: &Graph,
    st: &Stage,
    t: &Tiling,
    rect: Rect,
    templates: &[(String, Vec<Task>, u64)],
) -> RegionData {
    if st.iters != 1 {
        return unsupported(
            templates,
            format!("region `{}`: functional mode does not run folded layer loops (weight streaming) yet", st.name),
        );
    }
    match (&st.work, t.algo) {
        (Work::SingleGemv { k, n }, _) => single_gemv(g, st, t, rect, templates, *k, *n),
        _ => unsupported(
            templates,
            format!(
                "region `{}` ({} with {}): functional mode has no data semantics for this algorithm yet",
                st.name,
                st.kind_name(g),
                t.algo.name()
            ),
        ),
    }
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
        return unsupported(templates, format!("region `{}`: a single GEMV that is not a linear op", st.name));
    };
    if t.algo == Algo::Cannon || op.inputs.len() < 2 || op.outputs.is_empty() {
        return unsupported(templates, format!("region `{}`: an unexpected single-GEMV layout", st.name));
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
                    _ => TaskData::Kernel(Kernel::Accumulate),
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
            rect: root,
            rows: 1,
            cols: n,
            cover: k,
        }],
        unsupported: None,
    }
}
