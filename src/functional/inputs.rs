//! What the reference is fed besides the weights: token ids and the inputs derived from them
//! (positions, token types, labels), optimizer state, KV caches, and seeded values for the float
//! inputs of single-op graphs. Every source tensor of a graph (no op produces it) is fed by name.

use std::collections::BTreeMap;

use super::reference::{Value, IGNORE_INDEX};
use super::rng::SplitMix64;
use super::{FunctionalError, Real, Weights};
use crate::graph::{Elem, Graph, Role, TensorId};
use crate::model::Phase;

/// Token ids of `batch` sequences of equal length, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    pub batch: usize,
    pub ids: Vec<i64>,
}

impl Tokens {
    /// One sequence.
    pub fn one(ids: Vec<i64>) -> Tokens {
        Tokens { batch: 1, ids }
    }

    /// Sequences of `len` ids drawn uniformly from `[0, vocab)` with `seed`.
    pub fn seeded(seed: u64, batch: usize, len: usize, vocab: u64) -> Tokens {
        let mut g = SplitMix64::for_name(seed, "input_ids");
        Tokens { batch, ids: (0..batch * len).map(|_| g.below(vocab) as i64).collect() }
    }

    pub fn len(&self) -> usize {
        self.ids.len() / self.batch.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The first `n` ids of every sequence.
    pub fn prefix(&self, n: usize) -> Tokens {
        let len = self.len();
        Tokens {
            batch: self.batch,
            ids: (0..self.batch).flat_map(|b| self.ids[b * len..b * len + n].to_vec()).collect(),
        }
    }

    /// Parses `1,2,3` (one sequence).
    pub fn parse(s: &str) -> Result<Tokens, FunctionalError> {
        let ids = s
            .split(',')
            .map(|t| {
                t.trim().parse::<i64>().map_err(|_| {
                    FunctionalError::Input(format!("--tokens: `{}` is not a token id (expected e.g. 1,2,3)", t.trim()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tokens::one(ids))
    }
}

/// The value of every source tensor, by tensor name.
#[derive(Clone, Debug, Default)]
pub struct Feeds<T> {
    pub values: BTreeMap<String, Value<T>>,
}

impl<T: Real> Feeds<T> {
    /// Feeds for one step of `graph`: the weights; token ids, positions, token types and labels from
    /// `tokens` (for decode, the last token of each sequence is the new one and the ones before it
    /// must be in `caches`, by the names of the graph's cache tensors, `l0.attn.k_cache`); zero Adam
    /// moments and master weights equal to the weights; seeded values for single ops' float inputs.
    ///
    /// Labels for training are the next token of the same sequence, with -100 (ignored) at its end,
    /// as transformers' causal-LM loss shifts them; BERT's masked-LM labels are the tokens themselves
    /// and its next-sentence label is 0.
    pub fn for_graph(
        graph: &Graph,
        weights: &Weights<T>,
        tokens: &Tokens,
        caches: &BTreeMap<String, Vec<T>>,
        seed: u64,
    ) -> Result<Feeds<T>, FunctionalError> {
        let w = &graph.workload;
        let batch = w.batch as usize;
        let producers = graph.producers();
        let is_transformer = graph.tensors.iter().any(|t| t.name == "input_ids");
        if is_transformer {
            let want = if w.phase == Phase::Decode { w.context + 1 } else { w.seq } as usize;
            if tokens.batch != batch || tokens.len() != want || tokens.ids.len() != batch * want {
                return Err(FunctionalError::Input(format!(
                    "the workload takes {batch} sequence(s) of {want} tokens{}; got {} sequence(s) of {} tokens",
                    if w.phase == Phase::Decode { " (the cached context and the new token)" } else { "" },
                    tokens.batch,
                    tokens.len()
                )));
            }
        }
        let (len, seq) = (tokens.len(), w.seq as usize);
        // The ids this step feeds: all of them, or in decode the last one of each sequence.
        let first = if w.phase == Phase::Decode { len - seq } else { 0 };
        let step_ids: Vec<i64> = (0..batch).flat_map(|b| tokens.ids[b * len + first..(b + 1) * len].to_vec()).collect();
        let mut values = BTreeMap::new();
        for (i, t) in graph.tensors.iter().enumerate() {
            if producers[i].is_some() {
                continue;
            }
            let v = match (t.role, t.name.as_str()) {
                (Role::Weight, name) => Value::F(weights.get(name)?.to_vec()),
                (Role::Input, "input_ids") => Value::I(step_ids.clone()),
                (Role::Input, "position_ids") => Value::I((0..batch * seq).map(|r| (first + r % seq) as i64).collect()),
                (Role::Input, "token_type_ids" | "nsp_labels") => Value::I(vec![0; t.elems() as usize]),
                (Role::Input, "mlm_labels") => Value::I(step_ids.clone()),
                (Role::Input, "labels") => Value::I(
                    (0..batch * seq).map(|r| if r % seq + 1 < seq { step_ids[r + 1] } else { IGNORE_INDEX }).collect(),
                ),
                (Role::Input, name) if matches!(t.elem, Elem::Float(_)) => {
                    let mut g = SplitMix64::for_name(seed, name);
                    Value::F((0..t.elems()).map(|_| T::from_f64(g.symmetric(1.0))).collect())
                }
                (Role::OptimizerState, name) => {
                    if let Some(wname) = name.strip_suffix(".master") {
                        Value::F(weights.get(wname)?.to_vec())
                    } else {
                        Value::F(vec![T::zero(); t.elems() as usize])
                    }
                }
                (Role::KvCache, name) => match caches.get(name) {
                    Some(c) => Value::F(c.clone()),
                    None => {
                        return Err(FunctionalError::Input(format!(
                            "decode needs the KV cache `{name}` (run prefill over the context first)"
                        )))
                    }
                },
                (role, name) => {
                    return Err(FunctionalError::Internal(format!(
                        "no feed for source tensor `{name}` (role {})",
                        role.name()
                    )))
                }
            };
            values.insert(t.name.clone(), v);
        }
        Ok(Feeds { values })
    }
}

/// The fed value of source tensor `t`, checked against its shape and element type.
pub(crate) fn feeds_check<T: Real>(graph: &Graph, t: TensorId, feeds: &Feeds<T>) -> Result<Value<T>, FunctionalError> {
    let tensor = graph.tensor(t);
    let v = feeds
        .values
        .get(&tensor.name)
        .ok_or_else(|| FunctionalError::Input(format!("no value fed for `{}`", tensor.name)))?;
    let ok_kind = matches!((tensor.elem, v), (Elem::I32, Value::I(_)) | (Elem::Float(_), Value::F(_)));
    if !ok_kind || v.len() as u64 != tensor.elems() {
        return Err(FunctionalError::Input(format!(
            "`{}` was fed {} values of the wrong kind or count; its shape is {:?} ({})",
            tensor.name,
            v.len(),
            tensor.shape,
            tensor.elem.name()
        )));
    }
    Ok(v.clone())
}
