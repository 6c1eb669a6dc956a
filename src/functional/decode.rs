//! Decode over several tokens on the mesh, each step from the KV cache the previous step left on the
//! wafer, checked against the reference's prefill of the same sequence.
//!
//! Step 0 starts from the KV cache of the context's prefill: the reference's (as a one-step functional
//! decode does), or the wafer's own prefill program's (`Start`). The attention regions of every prefill
//! and decode program keep the cache they leave (their resident rows and the rows the step appended,
//! `mesh::data::Kernel::AttnScores::append`), and the run reads it back like any other result; step
//! s + 1 starts from exactly those values. The new token of step s is token `context + s` of the given
//! sequence (teacher forcing), so step s's logits must be those of the reference's prefill of the
//! sequence's first `context + s + 1` tokens (causal attention: the same position sees the same keys).
//!
//! Each step has its own program (the cache grows by one row per step, so the shapes differ); the
//! caller compiles it. Like `mesh`, this module never evaluates an op for the wafer: the reference
//! runs only for the feeds (weights, the new token) and the comparisons.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::mesh::{self as fmesh, MeshOutput};
use super::run::{numerics_of, prefill, weights_of};
use super::{evaluate, max_rel_error, Feeds, FunctionalError, Options, Tokens, WeightSource};
use crate::engine::{self, EngineOptions, EngineRun};
use crate::graph::{self, Graph, Role};
use crate::mesh::MeshProgram;
use crate::model::{Model, Phase, Workload};
use crate::Error;

/// KV caches by the names a decode step reads them by (`l0.attn.k_cache`), row-major
/// `[batch * len, kv_heads * head_dim]`.
pub type Caches = BTreeMap<String, Vec<f32>>;

/// The name of the decoders' logits in the graph.
const LOGITS: &str = "head.logits";

/// One decode step on the mesh.
#[derive(Debug)]
pub struct DecodeStep {
    /// Keys in the cache before the step: the new token is at this position of its sequence.
    pub context: u64,
    /// The engine's run of the step's program (its timing).
    pub run: EngineRun,
    /// The step's results as the wafer computed them (the logits and every layer's updated K and V
    /// cache), each beside the reference's decode of the same step from the same cache.
    pub outputs: Vec<MeshOutput>,
    /// The wafer's logits, `[batch, vocab]`.
    pub logits: Vec<f32>,
    /// Max relative error of `logits` against the reference's prefill of the first `context + 1`
    /// tokens of each sequence.
    pub vs_prefill: f64,
    /// The cache the wafer left (read back from its attention regions): where the next step starts.
    pub caches: Caches,
}

/// Decoding with the same model, weights and tokens, step by step.
pub struct Decoder<'a> {
    model: &'a Model,
    first: Workload,
    tokens: Tokens,
    weights: super::Weights<f32>,
    numerics: super::Numerics,
    opts: Options,
    seed: u64,
}

impl<'a> Decoder<'a> {
    /// `first`: the first step's decode workload (context C); `tokens`: whole sequences of C + `steps`
    /// tokens (`first.batch` of them).
    pub fn new(
        model: &'a Model,
        first: &Workload,
        source: &WeightSource,
        tokens: &Tokens,
        steps: u64,
        opts: &Options,
    ) -> Result<Decoder<'a>, Error> {
        if first.phase != Phase::Decode {
            return Err(FunctionalError::Input(format!(
                "decoding over several tokens takes a decode workload; this one is {}",
                first.phase.name()
            ))
            .into());
        }
        if steps == 0 {
            return Err(FunctionalError::Input("decoding takes at least one step".into()).into());
        }
        let want = first.context + steps;
        if tokens.batch as u64 != first.batch
            || tokens.len() as u64 != want
            || tokens.ids.len() != tokens.batch * tokens.len()
        {
            return Err(FunctionalError::Input(format!(
                "decoding {steps} token(s) after a context of {} takes {} sequence(s) of {want} tokens; got {} of {}",
                first.context,
                first.batch,
                tokens.batch,
                tokens.len()
            ))
            .into());
        }
        if let Model::Transformer(spec) = model {
            if want > spec.max_positions {
                return Err(FunctionalError::Input(format!(
                    "decoding {steps} token(s) after a context of {} needs {want} positions; {} has {}",
                    first.context, spec.name, spec.max_positions
                ))
                .into());
            }
        }
        let graph = graph::build(model, first)?;
        if !graph.tensors.iter().any(|t| t.name == LOGITS) {
            return Err(FunctionalError::Unsupported(format!("decoding a model without `{LOGITS}`")).into());
        }
        let (weights, seed) = weights_of(model, &graph, source)?;
        let numerics = numerics_of(model)?;
        Ok(Decoder { model, first: first.clone(), tokens: tokens.clone(), weights, numerics, opts: opts.clone(), seed })
    }

    /// Step `s`'s workload: the first one with `s` more tokens in the cache.
    pub fn workload(&self, s: u64) -> Workload {
        Workload { context: self.first.context + s, ..self.first.clone() }
    }

    /// The caches step 0 starts from: the reference's prefill of the context.
    pub fn context_caches(&self) -> Result<Caches, Error> {
        let ctx = self.tokens.prefix(self.first.context as usize);
        let (_, values, graph) = prefill(self.model, &self.first, &self.weights, &ctx, &self.opts, self.seed)?;
        Ok(super::caches_from(&graph, &values))
    }

    /// The reference's prefill of the first `len` tokens of each sequence: its logits (the last
    /// token's) and the KV caches it leaves.
    pub fn prefill(&self, len: u64) -> Result<(Vec<f32>, Caches), Error> {
        let toks = self.tokens.prefix(len as usize);
        let (_, values, graph) = prefill(self.model, &self.first, &self.weights, &toks, &self.opts, self.seed)?;
        let t = graph
            .tensors
            .iter()
            .position(|t| t.name == LOGITS)
            .ok_or_else(|| FunctionalError::Internal(format!("the prefill graph has no `{LOGITS}`")))?;
        Ok((values.f(graph::TensorId(t as u32)).to_vec(), super::caches_from(&graph, &values)))
    }

    /// Runs step `s` on the mesh: `graph` and `program` are the compile of `self.workload(s)`, the
    /// wafer starts from `caches` (and the weights and the new token), and its logits are checked
    /// against the reference's prefill of the sequence up to the new token.
    pub fn step(
        &self,
        s: u64,
        graph: &Graph,
        program: &MeshProgram,
        caches: &Caches,
        engine: &EngineOptions,
    ) -> Result<DecodeStep, Error> {
        let workload = self.workload(s);
        if graph.workload != workload {
            return Err(FunctionalError::Internal(format!(
                "decode step {s} was given the graph of another workload (context {}, expected {})",
                graph.workload.context, workload.context
            ))
            .into());
        }
        let len = workload.context + 1;
        let (run, outputs, caches) = self.on_mesh(graph, program, len, caches, engine)?;
        let logits = outputs
            .iter()
            .find(|o| o.name == LOGITS)
            .map(|o| o.values.clone())
            .ok_or_else(|| FunctionalError::Mesh(format!("the decode program leaves no `{LOGITS}` to read")))?;
        let (want, _) = self.prefill(len)?;
        let vs_prefill = max_rel_error(&logits, &want);
        Ok(DecodeStep { context: workload.context, run, outputs, logits, vs_prefill, caches })
    }

    /// The prefill of the context (C tokens per sequence), whose program leaves the cache step 0
    /// starts from when the wafer computes it too.
    pub fn context_workload(&self) -> Workload {
        Workload { phase: Phase::Prefill, seq: self.first.context, context: 0, ..self.first.clone() }
    }

    /// The context's prefill on the mesh (`graph` and `program`: the compile of
    /// `context_workload()`): its results beside the reference's, and the K and V caches its attention
    /// regions leave, where step 0 starts.
    pub fn context_on_mesh(
        &self,
        graph: &Graph,
        program: &MeshProgram,
        engine: &EngineOptions,
    ) -> Result<ContextRun, Error> {
        if graph.workload != self.context_workload() {
            return Err(FunctionalError::Internal(format!(
                "the context's prefill was given the graph of another workload ({} of {} tokens)",
                graph.workload.phase.name(),
                graph.workload.seq
            ))
            .into());
        }
        let (run, outputs, caches) = self.on_mesh(graph, program, self.first.context, &Caches::new(), engine)?;
        Ok(ContextRun { run, outputs, caches })
    }

    /// A functional run of `program` (compiled from `graph`) on the first `len` tokens of each
    /// sequence from `caches`: the engine's run, its results beside the reference's run of the same
    /// graph from the same inputs, and the KV caches its attention regions left (under the names the
    /// next decode step reads them by).
    fn on_mesh(
        &self,
        graph: &Graph,
        program: &MeshProgram,
        len: u64,
        caches: &Caches,
        engine: &EngineOptions,
    ) -> Result<(EngineRun, Vec<MeshOutput>, Caches), Error> {
        let tokens = self.tokens.prefix(len as usize);
        let feeds = Feeds::for_graph(graph, &self.weights, &tokens, caches, self.seed)?;
        let values = evaluate(graph, &self.numerics, &feeds, &self.opts)?;
        let setup = fmesh::setup(program, graph, &self.numerics, &values)?;
        let (run, results) = engine::run_functional(program, engine, Arc::new(setup))?;
        let outputs = fmesh::outputs(program, graph, &results, &values)?;
        let mut left = Caches::new();
        for &t in graph.outputs.iter().filter(|t| graph.tensor(**t).role == Role::KvCache) {
            let name = &graph.tensor(t).name;
            let out = outputs.iter().find(|o| o.tensor == t).ok_or_else(|| {
                FunctionalError::Mesh(format!("the program leaves no read-back of the KV cache `{name}`"))
            })?;
            let key = name.strip_suffix("_append").unwrap_or(name).to_string();
            left.insert(key, out.values.clone());
        }
        Ok((run, outputs, left))
    }
}

/// The context's prefill on the mesh.
#[derive(Debug)]
pub struct ContextRun {
    pub run: EngineRun,
    /// Its results (the last context token's logits, every layer's K and V cache) beside the
    /// reference's prefill of the same tokens.
    pub outputs: Vec<MeshOutput>,
    /// The K and V caches its attention regions left.
    pub caches: Caches,
}

/// Where step 0's cache comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The reference's prefill of the context (as a one-step functional decode).
    Reference,
    /// The context's prefill program on the mesh: every K and V row is the wafer's.
    Mesh,
}

/// Several decode steps on the mesh.
#[derive(Debug)]
pub struct Decoded {
    /// The context's prefill on the mesh (`Start::Mesh`).
    pub context: Option<ContextRun>,
    pub steps: Vec<DecodeStep>,
}

/// Decodes `steps` tokens on the mesh after `first.context` tokens of context: step 0 from the cache
/// of the context's prefill (`start`: the reference's, or the wafer's own), every later step from the
/// cache the previous step's program left. `compile` gives the graph and program of a workload (the
/// context's prefill, then each step's decode); `engine` runs every program (a trace it asks for
/// records the first decode step only).
#[allow(clippy::too_many_arguments)]
pub fn decode_on_mesh(
    model: &Model,
    first: &Workload,
    source: &WeightSource,
    tokens: &Tokens,
    steps: u64,
    start: Start,
    opts: &Options,
    engine: &EngineOptions,
    mut compile: impl FnMut(&Workload) -> Result<(Graph, MeshProgram), Error>,
) -> Result<Decoded, Error> {
    let dec = Decoder::new(model, first, source, tokens, steps, opts)?;
    let untraced = EngineOptions { trace: None, ..engine.clone() };
    let (context, mut caches) = match start {
        Start::Reference => (None, dec.context_caches()?),
        Start::Mesh => {
            let (graph, program) = compile(&dec.context_workload())?;
            let ran = dec.context_on_mesh(&graph, &program, &untraced)?;
            let caches = ran.caches.clone();
            (Some(ran), caches)
        }
    };
    let mut out = Vec::with_capacity(steps as usize);
    for s in 0..steps {
        let (graph, program) = compile(&dec.workload(s))?;
        let step = dec.step(s, &graph, &program, &caches, if s == 0 { engine } else { &untraced })?;
        caches = step.caches.clone();
        out.push(step);
    }
    Ok(Decoded { context, steps: out })
}
