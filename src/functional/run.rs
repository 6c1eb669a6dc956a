//! One reference run of a workload, end to end: graph, weights, inputs, evaluation; decode first
//! runs prefill over the context to fill the KV cache, as a serving system would.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{evaluate, Feeds, FunctionalError, Numerics, Options, Real, Tokens, Values, Weights};
use crate::graph::{self, Graph, Role, TensorId};
use crate::model::{Model, Phase, Workload};
use crate::Error;

/// Where the weights come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightSource {
    Seeded(u64),
    File(PathBuf),
}

/// The graph of the step and the value of each of its tensors.
pub struct Run<T> {
    pub graph: Graph,
    pub values: Values<T>,
    pub weights: Weights<T>,
}

impl<T: Real> Run<T> {
    /// The step's results under the names transformers gives them (`logits`, `last_hidden_state`,
    /// `pooler_output`, `loss`), single ops' under their graph names; caches and optimizer state left out.
    pub fn primary_outputs(&self) -> Vec<(String, TensorId)> {
        let g = &self.graph;
        let encoder = g.tensors.iter().any(|t| t.name == "pooler.tanh");
        g.outputs
            .iter()
            .enumerate()
            .filter(|(_, t)| !matches!(g.tensor(**t).role, Role::KvCache | Role::Weight | Role::OptimizerState))
            .map(|(i, &t)| {
                let name = match g.tensor(t).name.as_str() {
                    "head.logits" => "logits".to_string(),
                    "head.loss" => "loss".to_string(),
                    "mlm.loss" => "mlm_loss".to_string(),
                    "nsp.loss" => "nsp_loss".to_string(),
                    "pooler.tanh" => "pooler_output".to_string(),
                    _ if encoder && i == 0 => "last_hidden_state".to_string(),
                    other => other.to_string(),
                };
                (name, t)
            })
            .collect()
    }
}

impl<T: Real> Run<T> {
    /// Training: each weight's gradient (`grad.NAME`) and its value after the Adam step
    /// (`updated.NAME`), NAME the weight's checkpoint name, in the graph's layout; empty otherwise.
    pub fn training_outputs(&self) -> Vec<(String, TensorId)> {
        let g = &self.graph;
        let mut out = Vec::new();
        for o in g.op_ids() {
            let op = g.op(o);
            if let crate::graph::OpKind::Adam { .. } = op.kind {
                let name = &g.tensor(op.inputs[0]).name;
                out.push((format!("grad.{name}"), op.inputs[1]));
                out.push((format!("updated.{name}"), op.outputs[0]));
            }
        }
        out
    }
}

/// The KV caches a step leaves (`l0.attn.k_cache_append`), under the names the next decode step
/// reads them by (`l0.attn.k_cache`).
pub fn caches_from<T: Real>(graph: &Graph, values: &Values<T>) -> BTreeMap<String, Vec<T>> {
    graph
        .outputs
        .iter()
        .filter(|t| graph.tensor(**t).role == Role::KvCache)
        .filter_map(|&t| {
            let name = graph.tensor(t).name.strip_suffix("_append")?.to_string();
            Some((name, values.f(t).to_vec()))
        })
        .collect()
}

/// Numerics of a model (defaults for single ops).
pub fn numerics_of(model: &Model) -> Result<Numerics, FunctionalError> {
    match model {
        Model::Transformer(spec) => Numerics::for_model(spec),
        Model::Op(_) => Ok(Numerics::default()),
    }
}

/// Runs one step of `workload` on the reference. `tokens` are whole sequences: `seq` tokens for
/// train and prefill, `context + 1` for decode (the context is prefilled into the KV cache first).
pub fn run<T: Real>(
    model: &Model,
    workload: &Workload,
    source: &WeightSource,
    tokens: &Tokens,
    opts: &Options,
) -> Result<Run<T>, Error> {
    let numerics = numerics_of(model)?;
    let graph = graph::build(model, workload)?;
    let (weights, seed) = weights_of(model, &graph, source)?;
    let mut caches = BTreeMap::new();
    if workload.phase == Phase::Decode {
        let want = workload.context as usize + 1;
        if tokens.batch != workload.batch as usize || tokens.len() != want || tokens.ids.len() != tokens.batch * want {
            return Err(FunctionalError::Input(format!(
                "decode with context {} takes {} sequence(s) of {want} tokens (the context and the new token); got {} of {}",
                workload.context,
                workload.batch,
                tokens.batch,
                tokens.len()
            ))
            .into());
        }
        let (_, pv, pg) = prefill(model, workload, &weights, &tokens.prefix(workload.context as usize), opts, seed)?;
        caches = caches_from(&pg, &pv);
    }
    let feeds = Feeds::for_graph(&graph, &weights, tokens, &caches, seed)?;
    let values = evaluate(&graph, &numerics, &feeds, opts)?;
    Ok(Run { graph, values, weights })
}

/// The reference's prefill of `tokens` (whole sequences) with `workload`'s batch and dtype: its
/// workload, values and graph.
pub(crate) fn prefill<T: Real>(
    model: &Model,
    workload: &Workload,
    weights: &Weights<T>,
    tokens: &Tokens,
    opts: &Options,
    seed: u64,
) -> Result<(Workload, Values<T>, Graph), Error> {
    let prefill = Workload { phase: Phase::Prefill, seq: tokens.len() as u64, context: 0, ..workload.clone() };
    let graph = graph::build(model, &prefill)?;
    let feeds = Feeds::for_graph(&graph, weights, tokens, &BTreeMap::new(), seed)?;
    let values = evaluate(&graph, &numerics_of(model)?, &feeds, opts)?;
    Ok((prefill, values, graph))
}

/// The weights `source` gives for `graph`'s weight tensors; the seed of seeded values (0 for a file).
pub(crate) fn weights_of<T: Real>(
    model: &Model,
    graph: &Graph,
    source: &WeightSource,
) -> Result<(Weights<T>, u64), Error> {
    let family = match model {
        Model::Transformer(s) => Some(s.family),
        Model::Op(_) => None,
    };
    Ok(match source {
        WeightSource::Seeded(s) => (Weights::seeded(graph, *s), *s),
        WeightSource::File(p) => (Weights::load(p, graph, family)?, 0),
    })
}
