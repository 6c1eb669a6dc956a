//! Text and Graphviz printers of a graph. `--dump-after graph` and the snapshots use `print_graph`.

use std::fmt::Write as _;

use super::ir::Graph;

/// One line per tensor, then one line per op, in id order.
pub fn print_graph(g: &Graph) -> String {
    let mut s = String::new();
    let w = &g.workload;
    let _ = writeln!(
        s,
        "graph {} phase={} batch={} seq={} context={} dtype={} sparsity={} recompute={}",
        g.model,
        w.phase.name(),
        w.batch,
        w.seq,
        w.context,
        w.dtype,
        w.sparsity,
        w.recompute
    );
    let _ = writeln!(s, "tensors {}", g.tensors.len());
    for (i, t) in g.tensors.iter().enumerate() {
        let mut extra = String::new();
        if let Some(w) = t.grad_of {
            let _ = write!(extra, " grad_of=t{}", w.0);
        }
        if let Some(u) = t.updates {
            let _ = write!(extra, " updates=t{}", u.0);
        }
        if t.sparsity > 0.0 {
            let _ = write!(extra, " sparsity={}", t.sparsity);
        }
        let _ = writeln!(s, "  t{i} {} {} {:?} {}{extra}", t.role.name(), t.elem.name(), t.shape, t.name);
    }
    let _ = writeln!(s, "ops {}", g.n_ops());
    for o in g.op_ids() {
        let op = g.op(o);
        let ids = |v: &[super::TensorId]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
        let layer = op.layer.map_or("-".to_string(), |l| l.to_string());
        let _ = writeln!(
            s,
            "  {o} {} l={layer} {} {} ({}) -> ({}) flops={} mm={} rd={} wr={}",
            op.pass.name(),
            op.kind.name(),
            op.name,
            ids(&op.inputs),
            ids(&op.outputs),
            op.cost.flops,
            op.cost.matmul_flops,
            op.cost.bytes_read,
            op.cost.bytes_written
        );
    }
    let outs = g.outputs.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    let _ = writeln!(s, "outputs ({outs})");
    s
}

/// Graphviz: ops as boxes labelled with kind and FLOPs, edges labelled with the tensor shape.
pub fn print_dot(g: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "digraph \"{}\" {{", g.model.replace('"', "'"));
    let _ = writeln!(s, "  rankdir=TB; node [shape=box, fontname=monospace, fontsize=10];");
    for o in g.op_ids() {
        let op = g.op(o);
        let color = match op.pass {
            super::Pass::Forward => "black",
            super::Pass::Recompute => "gray50",
            super::Pass::Backward => "firebrick",
            super::Pass::Optimizer => "darkgreen",
        };
        let _ = writeln!(
            s,
            "  {o} [label=\"{}\\n{} {} FLOP\", color={color}];",
            op.name.replace('"', "'"),
            op.kind.name(),
            op.cost.flops
        );
    }
    for e in g.ops.edge_indices() {
        if let (Some((a, b)), Some(t)) = (g.ops.edge_endpoints(e), g.ops.edge_weight(e)) {
            let _ =
                writeln!(s, "  op{} -> op{} [label=\"{:?}\", fontsize=8];", a.index(), b.index(), g.tensor(*t).shape);
        }
    }
    let _ = writeln!(s, "}}");
    s
}
