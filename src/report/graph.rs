//! The graph summary: what `wafer graph` prints (text or JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::fmt::{human, thousands};
use crate::graph::{Graph, Pass, Role};
use crate::model::{Model, Phase};

/// The workload, as reports state it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkloadSummary {
    pub phase: String,
    pub batch: u64,
    pub seq: u64,
    pub context: u64,
    pub dtype: String,
    pub sparsity: f64,
    pub recompute: bool,
    /// Tokens processed by the step.
    pub tokens: u64,
}

/// Ops and FLOPs of one op kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KindRow {
    pub ops: u64,
    pub flops: u64,
    pub matmul_flops: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GraphSummary {
    pub model: String,
    /// Model family, or `single-op`.
    pub family: String,
    /// Config file the model came from (empty for single ops).
    pub source: String,
    pub workload: WorkloadSummary,
    /// Parameters in the graph (weights, counting tied weights once).
    pub params: u64,
    pub flops: u64,
    pub matmul_flops: u64,
    pub weight_bytes: u64,
    pub activation_bytes: u64,
    pub activation_grad_bytes: u64,
    pub weight_grad_bytes: u64,
    pub optimizer_state_bytes: u64,
    pub kv_cache_bytes: u64,
    pub input_bytes: u64,
    pub ops: u64,
    pub tensors: u64,
    /// Ops on the longest dependency chain.
    pub longest_path_ops: u64,
    pub flops_by_kind: BTreeMap<String, KindRow>,
    pub flops_by_pass: BTreeMap<String, u64>,
}

impl GraphSummary {
    /// Summarises a graph from `graph::build` (which guarantees the step's FLOP and byte totals fit u64).
    pub fn new(model: &Model, g: &Graph) -> GraphSummary {
        let w = &g.workload;
        let (family, source) = match model {
            Model::Transformer(s) => (s.family.name().to_string(), s.source.clone()),
            Model::Op(_) => ("single-op".to_string(), String::new()),
        };
        let mut bytes: BTreeMap<Role, u64> = BTreeMap::new();
        let mut params = 0u64;
        for t in &g.tensors {
            // A next version (Adam's output, an appended cache) shares its predecessor's storage.
            if t.updates.is_some() {
                continue;
            }
            *bytes.entry(t.role).or_default() += t.bytes;
            if t.role == Role::Weight {
                params += t.elems();
            }
        }
        let mut by_kind: BTreeMap<String, KindRow> = BTreeMap::new();
        let mut by_pass: BTreeMap<String, u64> = BTreeMap::new();
        let (mut flops, mut matmul_flops) = (0u64, 0u64);
        for o in g.op_ids() {
            let op = g.op(o);
            let row = by_kind.entry(op.kind.name().to_string()).or_default();
            row.ops += 1;
            row.flops += op.cost.flops;
            row.matmul_flops += op.cost.matmul_flops;
            *by_pass.entry(op.pass.name().to_string()).or_default() += op.cost.flops;
            flops += op.cost.flops;
            matmul_flops += op.cost.matmul_flops;
        }
        let b = |r: Role| bytes.get(&r).copied().unwrap_or(0);
        GraphSummary {
            model: g.model.clone(),
            family,
            source,
            workload: WorkloadSummary {
                phase: w.phase.name().to_string(),
                batch: w.batch,
                seq: w.seq,
                context: w.context,
                dtype: w.dtype.name().to_string(),
                sparsity: w.sparsity,
                recompute: w.recompute,
                tokens: w.tokens(),
            },
            params,
            flops,
            matmul_flops,
            weight_bytes: b(Role::Weight),
            activation_bytes: b(Role::Activation),
            activation_grad_bytes: b(Role::ActivationGrad),
            weight_grad_bytes: b(Role::WeightGrad),
            optimizer_state_bytes: b(Role::OptimizerState),
            kv_cache_bytes: b(Role::KvCache),
            input_bytes: b(Role::Input),
            ops: g.n_ops() as u64,
            tensors: g.tensors.len() as u64,
            longest_path_ops: g.longest_path_ops(),
            flops_by_kind: by_kind,
            flops_by_pass: by_pass,
        }
    }

    /// The human-readable summary.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let w = &self.workload;
        let src = if self.source.is_empty() { String::new() } else { format!(", {}", self.source) };
        let _ = writeln!(s, "model       {}  ({}{src})", self.model, self.family);
        let shape = match w.phase.as_str() {
            "decode" => format!("batch {} x 1 new token, KV cache {} tokens", w.batch, w.context),
            _ if self.family == "single-op" => "one op".to_string(),
            _ => format!("batch {} x seq {} = {} tokens", w.batch, w.seq, thousands(w.tokens)),
        };
        let mut extras = String::new();
        if w.phase == Phase::Train.name() {
            extras.push_str(", Adam");
        }
        if w.recompute {
            extras.push_str(", activation recompute");
        }
        if w.sparsity > 0.0 {
            let _ = write!(extras, ", weight sparsity {}", w.sparsity);
        }
        let phase = if self.family == "single-op" { "op" } else { w.phase.as_str() };
        let _ = writeln!(s, "workload    {phase}: {shape}, {}{extras}", w.dtype);
        let _ = writeln!(s, "params      {:>26}  {}", thousands(self.params), human(self.params as f64, ""));
        let _ = writeln!(s, "flops       {:>26}  {}", thousands(self.flops), human(self.flops as f64, "FLOP"));
        let share = if self.flops > 0 { 100.0 * self.matmul_flops as f64 / self.flops as f64 } else { 0.0 };
        let _ = writeln!(
            s,
            "matmul      {:>26}  {}  ({share:.2}% of flops)",
            thousands(self.matmul_flops),
            human(self.matmul_flops as f64, "FLOP")
        );
        let _ = writeln!(
            s,
            "ops         {:>26}  tensors {}, longest path {} ops",
            thousands(self.ops),
            thousands(self.tensors),
            self.longest_path_ops
        );
        let _ = writeln!(s, "\nbytes");
        for (name, v) in [
            ("weights", self.weight_bytes),
            ("activations", self.activation_bytes),
            ("activation grads", self.activation_grad_bytes),
            ("weight grads", self.weight_grad_bytes),
            ("optimizer state", self.optimizer_state_bytes),
            ("kv cache", self.kv_cache_bytes),
            ("inputs", self.input_bytes),
        ] {
            if v > 0 {
                let _ = writeln!(s, "  {name:<18}{:>22}  {}", thousands(v), human(v as f64, "B"));
            }
        }
        let _ = writeln!(s, "\nflops by op kind            ops                   flops   share");
        let mut rows: Vec<_> = self.flops_by_kind.iter().collect();
        // Largest first, ties by name: a stable order for snapshots.
        rows.sort_by(|a, b| b.1.flops.cmp(&a.1.flops).then(a.0.cmp(b.0)));
        for (kind, r) in rows {
            let share = if self.flops > 0 { 100.0 * r.flops as f64 / self.flops as f64 } else { 0.0 };
            let _ = writeln!(s, "  {kind:<20}{:>10}{:>24}  {share:>5.1}%", thousands(r.ops), thousands(r.flops));
        }
        if self.flops_by_pass.len() > 1 {
            let _ = writeln!(s, "\nflops by pass");
            for pass in [Pass::Forward, Pass::Recompute, Pass::Backward, Pass::Optimizer] {
                if let Some(v) = self.flops_by_pass.get(pass.name()) {
                    let _ = writeln!(s, "  {:<18}{:>22}  {}", pass.name(), thousands(*v), human(*v as f64, "FLOP"));
                }
            }
        }
        s
    }
}
