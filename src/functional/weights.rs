//! Weights for the reference: a Hugging Face safetensors checkpoint, or seeded random values; and
//! safetensors output files.
//!
//! Names are the graph's (`graph::hf_name`), which are the family's checkpoint names; a checkpoint
//! saved from a task model with a base-model prefix (`transformer.` for GPT-2, `bert.` for BERT) is
//! found too. Layouts the graph and the checkpoint do not share are converted here, and only here:
//! - GPT-2's Conv1D weights are `[in, out]` on disk and in the graph (`WeightLayout::InOut`), so they
//!   load as they are; every other family's `nn.Linear` is `[out, in]` in both.
//! - GPT-NeoX's fused `query_key_value` interleaves heads on disk (per head: q, k, v rows); the graph
//!   splits its output into three contiguous blocks (all q, all k, all v), so its rows are permuted
//!   on load and back on save.
//! - Mixtral stores each expert apart (`experts.3.w1.weight`); the graph stacks them into one
//!   `[experts, out, in]` tensor named with `*`.
//!
//! Rounding model: F32 and F64 tensors convert to the evaluator's type by a plain cast (F64 to f32
//! rounds to nearest); F16 and BF16 convert exactly (every fp16/bf16 value is an f32).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::rng::SplitMix64;
use super::{FunctionalError, Real};
use crate::graph::{Graph, OpKind, Role};
use crate::model::Family;

/// Every weight a graph reads, by its graph (checkpoint) name, in the graph's layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights<T> {
    pub tensors: BTreeMap<String, (Vec<u64>, Vec<T>)>,
    /// Where they came from, for messages (`seed 7`, a file path).
    pub source: String,
}

/// The weight tensors of a graph (sources with role `Weight`), by name, with their shapes.
fn graph_weights(graph: &Graph) -> BTreeMap<String, Vec<u64>> {
    let producers = graph.producers();
    graph
        .tensors
        .iter()
        .enumerate()
        .filter(|(i, t)| t.role == Role::Weight && producers[*i].is_none())
        .map(|(_, t)| (t.name.clone(), t.shape.clone()))
        .collect()
}

/// Checkpoint names a graph name may be stored under, in the order tried.
fn candidates(family: Option<Family>, name: &str) -> Vec<String> {
    let mut c = vec![name.to_string()];
    match family {
        Some(Family::Gpt2) => c.push(format!("transformer.{name}")),
        Some(Family::Bert) => c.push(format!("bert.{name}")),
        _ => {}
    }
    c
}

fn is_neox_qkv(family: Option<Family>, name: &str) -> bool {
    family == Some(Family::GptNeoX) && name.contains(".attention.query_key_value.")
}

/// Row permutation of GPT-NeoX's fused qkv: graph row `part * heads * d + head * d + j` is checkpoint
/// row `head * 3d + part * d + j`. Returns, for each graph row, its checkpoint row.
fn neox_rows(rows: usize, heads: usize) -> Vec<usize> {
    let d = rows / (3 * heads);
    let mut map = Vec::with_capacity(rows);
    for part in 0..3 {
        for h in 0..heads {
            for j in 0..d {
                map.push(h * 3 * d + part * d + j);
            }
        }
    }
    map
}

fn to_f32s(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    let le2 = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
    Some(match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_bits(le2(c)).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_bits(le2(c)).to_f32()).collect(),
        _ => return None,
    })
}

impl<T: Real> Weights<T> {
    /// Seeded random weights for every weight of `graph`; each tensor's values depend only on the
    /// seed and its name. Norm scales are 1 + U(-0.1, 0.1); other vectors (biases) U(-0.1, 0.1);
    /// matrices U(-r, r) with r = sqrt(3 / last dimension) (unit variance over a dot product's terms
    /// for `[out, in]` weights).
    pub fn seeded(graph: &Graph, seed: u64) -> Weights<T> {
        let producers = graph.producers();
        let mut gammas = BTreeSet::new();
        for o in graph.op_ids() {
            let op = graph.op(o);
            if let OpKind::Norm { .. } = op.kind {
                gammas.insert(graph.tensor(op.inputs[1]).name.clone());
            }
        }
        let mut tensors = BTreeMap::new();
        for (i, t) in graph.tensors.iter().enumerate() {
            if t.role != Role::Weight || producers[i].is_some() {
                continue;
            }
            let mut g = SplitMix64::for_name(seed, &t.name);
            let n = t.elems() as usize;
            let vals: Vec<T> = if gammas.contains(&t.name) {
                (0..n).map(|_| T::from_f64(1.0 + g.symmetric(0.1))).collect()
            } else if t.shape.len() == 1 {
                (0..n).map(|_| T::from_f64(g.symmetric(0.1))).collect()
            } else {
                let r = (3.0 / *t.shape.last().unwrap_or(&1) as f64).sqrt();
                (0..n).map(|_| T::from_f64(g.symmetric(r))).collect()
            };
            tensors.insert(t.name.clone(), (t.shape.clone(), vals));
        }
        Weights { tensors, source: format!("seed {seed}") }
    }

    /// The values of weight `name`.
    pub fn get(&self, name: &str) -> Result<&[T], FunctionalError> {
        self.tensors.get(name).map(|(_, v)| v.as_slice()).ok_or_else(|| {
            FunctionalError::Input(format!(
                "the weights ({}) have no tensor `{name}`: they were made for another model or graph",
                self.source
            ))
        })
    }

    /// Loads every weight `graph` reads from a safetensors file, checking names and shapes.
    pub fn load(path: &Path, graph: &Graph, family: Option<Family>) -> Result<Weights<T>, FunctionalError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| FunctionalError::Read { path: p.clone(), source })?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| FunctionalError::Corrupt { path: p.clone(), reason: e.to_string() })?;
        let mut names: Vec<&str> = st.names();
        names.sort_unstable();
        let missing = |name: &str| {
            let shown: Vec<String> = names.iter().take(3).map(|n| format!("`{n}`")).collect();
            FunctionalError::MissingTensor {
                path: p.clone(),
                name: name.to_string(),
                model: graph.model.clone(),
                hint: if names.is_empty() {
                    "; the file holds no tensors".into()
                } else {
                    format!(
                        "; the file holds {} tensors: {}{}",
                        names.len(),
                        shown.join(", "),
                        if names.len() > 3 { ", ..." } else { "" }
                    )
                },
            }
        };
        // One checkpoint tensor as f32, with its name and shape checked against `want`.
        let read = |name: &str, want: &[u64]| -> Result<Vec<f32>, FunctionalError> {
            let found = candidates(family, name).into_iter().find(|c| names.contains(&c.as_str()));
            let found = found.ok_or_else(|| missing(name))?;
            let view =
                st.tensor(&found).map_err(|e| FunctionalError::Corrupt { path: p.clone(), reason: e.to_string() })?;
            let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
            if shape != want {
                return Err(FunctionalError::Shape {
                    path: p.clone(),
                    name: found,
                    expected: want.to_vec(),
                    found: shape,
                });
            }
            to_f32s(view.dtype(), view.data()).ok_or_else(|| FunctionalError::DType {
                path: p.clone(),
                name: found,
                dtype: format!("{:?}", view.dtype()),
            })
        };
        let mut tensors = BTreeMap::new();
        for (name, shape) in graph_weights(graph) {
            let vals: Vec<f32> = if name.contains(".*.") {
                // Stacked experts: experts.0 .. experts.{E-1}, each [out, in].
                let mut all = Vec::new();
                for e in 0..shape[0] {
                    all.extend(read(&name.replace(".*.", &format!(".{e}.")), &shape[1..])?);
                }
                all
            } else if is_neox_qkv(family, &name) {
                let disk = read(&name, &shape)?;
                let heads = graph_heads(graph);
                let rows = shape[0] as usize;
                let cols = disk.len() / rows;
                neox_rows(rows, heads).iter().flat_map(|&r| disk[r * cols..(r + 1) * cols].to_vec()).collect()
            } else {
                read(&name, &shape)?
            };
            tensors.insert(name, (shape, vals.into_iter().map(T::from_f32).collect()));
        }
        Ok(Weights { tensors, source: p })
    }

    /// Writes the weights as a checkpoint in the family's on-disk layout (so `load` reads them back).
    pub fn save(&self, path: &Path, graph: &Graph, family: Option<Family>) -> Result<(), FunctionalError> {
        write_f32(path, &self.on_disk(graph, family))
    }

    /// The weights as a checkpoint holds them: names, shapes and values in the family's on-disk layout.
    pub fn on_disk(&self, graph: &Graph, family: Option<Family>) -> Vec<(String, Vec<u64>, Vec<f32>)> {
        let mut out: Vec<(String, Vec<u64>, Vec<f32>)> = Vec::new();
        for (name, (shape, vals)) in &self.tensors {
            let f: Vec<f32> = vals.iter().map(|v| v.to_f32()).collect();
            if name.contains(".*.") {
                let per = f.len() / shape[0] as usize;
                for e in 0..shape[0] as usize {
                    out.push((
                        name.replace(".*.", &format!(".{e}.")),
                        shape[1..].to_vec(),
                        f[e * per..(e + 1) * per].to_vec(),
                    ));
                }
            } else if is_neox_qkv(family, name) {
                let rows = shape[0] as usize;
                let cols = f.len() / rows;
                let map = neox_rows(rows, graph_heads(graph));
                let mut disk = vec![0.0f32; f.len()];
                for (g, &d) in map.iter().enumerate() {
                    disk[d * cols..(d + 1) * cols].copy_from_slice(&f[g * cols..(g + 1) * cols]);
                }
                out.push((name.clone(), shape.clone(), disk));
            } else {
                out.push((name.clone(), shape.clone(), f));
            }
        }
        out
    }
}

/// Heads of the graph's attention (GPT-NeoX's qkv permutation needs them).
fn graph_heads(graph: &Graph) -> usize {
    graph
        .op_ids()
        .find_map(|o| match graph.op(o).kind {
            OpKind::AttnScores(a) => Some(a.heads as usize),
            _ => None,
        })
        .unwrap_or(1)
}

/// Writes named f32 tensors to a safetensors file (through a temporary file renamed into place).
pub fn write_f32(path: &Path, tensors: &[(String, Vec<u64>, Vec<f32>)]) -> Result<(), FunctionalError> {
    let p = path.display().to_string();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (n.clone(), s.iter().map(|&d| d as usize).collect(), v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| FunctionalError::Internal(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let data = safetensors::serialize(views, None).map_err(|e| FunctionalError::Internal(e.to_string()))?;
    let tmp = format!("{p}.tmp-{}", std::process::id());
    let res = std::fs::write(&tmp, data).and_then(|_| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|source| FunctionalError::Write { path: p, source })
}
