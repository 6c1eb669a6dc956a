//! What `wafer reference` prints: a report type (serde), with a text form.

use serde::Serialize;

use super::{Real, Run};
use crate::graph::Role;

/// One output tensor, summarised.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutputSummary {
    pub name: String,
    pub shape: Vec<u64>,
    /// FNV-1a (64-bit) over the little-endian bytes of the values as f32: equal iff bit-identical.
    pub checksum: String,
    pub sum: f64,
    pub mean_abs: f64,
    /// The first (up to 8) values.
    pub first: Vec<f32>,
    /// For logits: the most likely token of each row (ties to the lower id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub argmax: Option<Vec<u64>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReferenceSummary {
    pub model: String,
    pub phase: String,
    pub batch: u64,
    pub seq: u64,
    pub context: u64,
    pub dtype: String,
    pub weights: String,
    /// The step's token ids (the whole sequences, context included), row-major.
    pub tokens: Vec<i64>,
    pub outputs: Vec<OutputSummary>,
    /// Weights updated by the optimizer step (training only).
    pub updated_weights: u64,
}

/// FNV-1a 64 of the values' f32 bytes.
pub fn checksum<T: Real>(values: &[T]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_f32().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

impl ReferenceSummary {
    pub fn new<T: Real>(run: &Run<T>, tokens: &[i64]) -> ReferenceSummary {
        let g = &run.graph;
        let w = &g.workload;
        let outputs = run
            .primary_outputs()
            .into_iter()
            .map(|(name, t)| {
                let v = run.values.f(t);
                let shape = g.tensor(t).shape.clone();
                let argmax = (name == "logits").then(|| {
                    let cols = *shape.last().unwrap_or(&1) as usize;
                    v.chunks(cols)
                        .map(|row| {
                            let mut best = 0;
                            for (j, x) in row.iter().enumerate() {
                                if *x > row[best] {
                                    best = j;
                                }
                            }
                            best as u64
                        })
                        .collect()
                });
                OutputSummary {
                    name,
                    shape,
                    checksum: format!("{:016x}", checksum(v)),
                    sum: v.iter().map(|x| x.to_f64()).sum(),
                    mean_abs: v.iter().map(|x| x.to_f64().abs()).sum::<f64>() / v.len().max(1) as f64,
                    first: v.iter().take(8).map(|x| x.to_f32()).collect(),
                    argmax,
                }
            })
            .collect();
        let updated_weights =
            g.outputs.iter().filter(|t| g.tensor(**t).role == Role::Weight && g.tensor(**t).updates.is_some()).count();
        ReferenceSummary {
            model: g.model.clone(),
            phase: w.phase.name().into(),
            batch: w.batch,
            seq: w.seq,
            context: w.context,
            dtype: w.dtype.name().into(),
            weights: run.weights.source.clone(),
            tokens: tokens.to_vec(),
            outputs,
            updated_weights: updated_weights as u64,
        }
    }

    pub fn to_text(&self) -> String {
        let mut s = format!(
            "reference: {} {}, batch {}, seq {}{}, {} storage, weights {}\n",
            self.model,
            self.phase,
            self.batch,
            self.seq,
            if self.phase == "decode" { format!(", context {}", self.context) } else { String::new() },
            self.dtype,
            self.weights
        );
        let shown: Vec<String> = self.tokens.iter().take(32).map(|t| t.to_string()).collect();
        if !self.tokens.is_empty() {
            s.push_str(&format!(
                "tokens: {}{}\n",
                shown.join(","),
                if self.tokens.len() > 32 { format!(",... ({} in all)", self.tokens.len()) } else { String::new() }
            ));
        }
        for o in &self.outputs {
            s.push_str(&format!(
                "{} {:?}: checksum {}, sum {:.6e}, mean |x| {:.6e}\n  first: {}\n",
                o.name,
                o.shape,
                o.checksum,
                o.sum,
                o.mean_abs,
                o.first.iter().map(|x| format!("{x:.6}")).collect::<Vec<_>>().join(" ")
            ));
            if let Some(a) = &o.argmax {
                let shown: Vec<String> = a.iter().take(32).map(|t| t.to_string()).collect();
                s.push_str(&format!("  argmax: {}{}\n", shown.join(","), if a.len() > 32 { ",..." } else { "" }));
            }
        }
        if self.updated_weights > 0 {
            s.push_str(&format!("adam: {} weights updated\n", self.updated_weights));
        }
        s
    }
}
