//! `ModelSpec`: the family-independent description of a transformer that the graph builder reads.
//!
//! A spec is plain data: sizes, structure flags and the source it came from.
//! It knows nothing of workloads, graphs, meshes or time.

use super::ModelError;

/// The model families the frontend understands, detected from `model_type` / `architectures`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    Gpt2,
    GptJ,
    GptNeoX,
    Llama,
    Mistral,
    Mixtral,
    Bert,
}

impl Family {
    /// Short lower-case name used in printers and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::GptJ => "gptj",
            Family::GptNeoX => "gpt_neox",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Mixtral => "mixtral",
            Family::Bert => "bert",
        }
    }

    /// True for encoder-only families (no causal mask, no KV cache, no decode phase).
    pub fn is_encoder(self) -> bool {
        matches!(self, Family::Bert)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}

impl NormKind {
    pub fn name(self) -> &'static str {
        match self {
            NormKind::LayerNorm => "layernorm",
            NormKind::RmsNorm => "rmsnorm",
        }
    }
    /// LayerNorm has a shift (beta) as well as a scale (gamma).
    pub fn has_bias(self) -> bool {
        matches!(self, NormKind::LayerNorm)
    }
}

/// The feed-forward block's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnKind {
    /// up (h -> f) + GELU + down (f -> h).
    Gelu,
    /// gate and up (h -> f each), SiLU(gate) * up, down (f -> h).
    SwiGlu,
}

/// How token positions enter the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// A learned table of `max_positions` rows added to the token embeddings (GPT-2, BERT).
    Learned,
    /// Rotary embeddings applied to the first `rotary_dims` dimensions of every query and key head.
    Rotary { rotary_dims: u64 },
}

/// How residual branches combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residual {
    /// x = x + attn(norm1(x)); x = x + ffn(norm2(x)) (GPT-2, Llama).
    Sequential,
    /// x = x + attn(norm1(x)) + ffn(norm1(x)): one shared norm (GPT-J).
    ParallelSharedNorm,
    /// x = x + attn(norm1(x)) + ffn(norm2(x)) (GPT-NeoX with `use_parallel_residual`).
    Parallel,
    /// BERT's post-norm: x = norm1(x + attn(x)); x = norm2(x + ffn(x)).
    PostNorm,
}

/// Mixture-of-experts feed-forward (Mixtral).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moe {
    Dense,
    /// `capacity_pct`: each expert's capacity in percent of a balanced routing's share (the config's
    /// `moe_capacity_factor`, default 1.0): copies routed past it are dropped.
    Experts {
        experts: u64,
        top_k: u64,
        capacity_pct: u64,
    },
}

/// Which linear layers carry biases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Biases {
    pub qkv: bool,
    pub attn_out: bool,
    pub ffn: bool,
    pub lm_head: bool,
}

/// A transformer, as far as timing and structure need to know it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Short name (file stem for shipped models).
    pub name: String,
    /// Where the config came from, for error messages (`models/gpt2-small.json`).
    pub source: String,
    pub family: Family,
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub ffn_hidden: u64,
    pub vocab: u64,
    pub max_positions: u64,
    pub norm: NormKind,
    pub ffn: FfnKind,
    pub positions: Positions,
    pub residual: Residual,
    /// Separate norms for q/k etc. are not modelled; this is the final norm before the head.
    pub final_norm: bool,
    pub tied_embeddings: bool,
    pub biases: Biases,
    pub moe: Moe,
    /// BERT token-type vocabulary (0 for decoders).
    pub type_vocab: u64,
    /// BERT pooler (dense + tanh on the first token).
    pub pooler: bool,
}

/// Checked u64 arithmetic for counts derived from user-controlled sizes.
pub(crate) fn prod(factors: &[u64]) -> Option<u64> {
    factors.iter().try_fold(1u64, |acc, &f| acc.checked_mul(f))
}

pub(crate) fn sum(terms: &[u64]) -> Option<u64> {
    terms.iter().try_fold(0u64, |acc, &t| acc.checked_add(t))
}

impl ModelSpec {
    /// Width of the fused q, k, v projection output.
    pub fn qkv_width(&self) -> u64 {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Width of the attention output (heads * head_dim); equals `hidden` for every shipped family.
    pub fn attn_width(&self) -> u64 {
        self.heads * self.head_dim
    }

    pub fn kv_width(&self) -> u64 {
        self.kv_heads * self.head_dim
    }

    /// Parameters of the model as its reference implementation counts them
    /// (`sum(p.numel() for p in model.parameters())` in Hugging Face transformers, tied weights once).
    pub fn param_count(&self) -> Result<u64, ModelError> {
        self.try_param_count()
            .ok_or_else(|| ModelError::Overflow { path: self.source.clone(), what: "parameter count".into() })
    }

    fn try_param_count(&self) -> Option<u64> {
        let h = self.hidden;
        let norm = |n: u64| if self.norm.has_bias() { 2 * n } else { n };
        let linear =
            |i: u64, o: u64, bias: bool| -> Option<u64> { prod(&[i, o])?.checked_add(if bias { o } else { 0 }) };
        let b = self.biases;
        // Attention: q, k, v (possibly fused; the count is the same) and the output projection.
        let attn = sum(&[linear(h, self.qkv_width(), b.qkv)?, linear(self.attn_width(), h, b.attn_out)?])?;
        let one_ffn = match self.ffn {
            FfnKind::Gelu => sum(&[linear(h, self.ffn_hidden, b.ffn)?, linear(self.ffn_hidden, h, b.ffn)?])?,
            FfnKind::SwiGlu => {
                sum(&[prod(&[2, linear(h, self.ffn_hidden, b.ffn)?])?, linear(self.ffn_hidden, h, b.ffn)?])?
            }
        };
        let ffn = match self.moe {
            Moe::Dense => one_ffn,
            Moe::Experts { experts, .. } => sum(&[prod(&[experts, one_ffn])?, prod(&[h, experts])?])?,
        };
        let norms_per_layer = match self.residual {
            Residual::ParallelSharedNorm => 1,
            _ => 2,
        };
        let layer = sum(&[attn, ffn, prod(&[norms_per_layer, norm(h)])?])?;
        let mut total = prod(&[self.layers, layer])?;
        // Embeddings.
        total = total.checked_add(prod(&[self.vocab, h])?)?;
        if self.positions == Positions::Learned {
            total = total.checked_add(prod(&[self.max_positions, h])?)?;
        }
        if self.type_vocab > 0 {
            total = total.checked_add(prod(&[self.type_vocab, h])?)?;
        }
        if self.family.is_encoder() {
            // BERT normalises the summed embeddings.
            total = total.checked_add(norm(h))?;
        }
        if self.final_norm {
            total = total.checked_add(norm(h))?;
        }
        if self.pooler {
            total = total.checked_add(linear(h, h, true)?)?;
        }
        if !self.family.is_encoder() && !self.tied_embeddings {
            total = total.checked_add(linear(h, self.vocab, b.lm_head)?)?;
        }
        Some(total)
    }
}
