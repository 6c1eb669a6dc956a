//! Hugging Face `config.json` parsing into a [`ModelSpec`].
//!
//! Every error names the file and the key. Nothing here panics on user input.

use serde_json::{Map, Value};

use super::spec::{Biases, Family, FfnKind, ModelSpec, Moe, NormKind, Positions, Residual};
use super::ModelError;

/// Reads keys out of one config object, turning every problem into a `ModelError` that names file and key.
struct Keys<'a> {
    path: &'a str,
    obj: &'a Map<String, Value>,
}

impl<'a> Keys<'a> {
    fn missing(&self, key: &str) -> ModelError {
        ModelError::MissingKey { path: self.path.to_string(), key: key.to_string() }
    }

    fn bad(&self, key: &str, value: &Value, expected: &str) -> ModelError {
        ModelError::BadValue {
            path: self.path.to_string(),
            key: key.to_string(),
            value: short(value),
            expected: expected.to_string(),
        }
    }

    /// The value of the first of `keys` that is present and not null.
    fn find(&self, keys: &[&'static str]) -> Option<(&'static str, &'a Value)> {
        keys.iter().find_map(|k| match self.obj.get(*k) {
            None | Some(Value::Null) => None,
            Some(v) => Some((*k, v)),
        })
    }

    /// A positive integer under one of `keys` (aliases, first wins).
    fn size(&self, keys: &[&'static str]) -> Result<u64, ModelError> {
        match self.opt_size(keys)? {
            Some(v) => Ok(v),
            None => Err(self.missing(keys[0])),
        }
    }

    fn opt_size(&self, keys: &[&'static str]) -> Result<Option<u64>, ModelError> {
        let Some((key, v)) = self.find(keys) else {
            return Ok(None);
        };
        match v.as_u64() {
            Some(0) => Err(self.bad(key, v, "a positive integer")),
            Some(n) => Ok(Some(n)),
            None => Err(self.bad(key, v, "a positive integer that fits in 64 bits")),
        }
    }

    fn opt_bool(&self, key: &'static str) -> Result<Option<bool>, ModelError> {
        match self.find(&[key]) {
            None => Ok(None),
            Some((_, Value::Bool(b))) => Ok(Some(*b)),
            Some((k, v)) => Err(self.bad(k, v, "true or false")),
        }
    }

    fn opt_fraction(&self, key: &'static str) -> Result<Option<f64>, ModelError> {
        match self.find(&[key]) {
            None => Ok(None),
            Some((k, v)) => match v.as_f64() {
                Some(f) if f > 0.0 && f <= 1.0 => Ok(Some(f)),
                _ => Err(self.bad(k, v, "a number in (0, 1]")),
            },
        }
    }

    fn opt_str(&self, key: &'static str) -> Option<&'a str> {
        self.obj.get(key).and_then(Value::as_str)
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}...", &s[..s.char_indices().nth(37).map_or(s.len(), |(i, _)| i)])
    } else {
        s
    }
}

/// Detects the family from `model_type`, falling back to `architectures`.
fn detect_family(keys: &Keys) -> Result<Family, ModelError> {
    let by_type = |t: &str| match t {
        "gpt2" => Some(Family::Gpt2),
        "gptj" | "gpt-j" => Some(Family::GptJ),
        "gpt_neox" | "gpt-neox" => Some(Family::GptNeoX),
        "llama" => Some(Family::Llama),
        "mistral" => Some(Family::Mistral),
        "mixtral" => Some(Family::Mixtral),
        "bert" => Some(Family::Bert),
        _ => None,
    };
    let by_arch = |a: &str| match a {
        "GPT2LMHeadModel" | "GPT2Model" => Some(Family::Gpt2),
        "GPTJForCausalLM" | "GPTJModel" => Some(Family::GptJ),
        "GPTNeoXForCausalLM" | "GPTNeoXModel" => Some(Family::GptNeoX),
        "LlamaForCausalLM" | "LlamaModel" => Some(Family::Llama),
        "MistralForCausalLM" | "MistralModel" => Some(Family::Mistral),
        "MixtralForCausalLM" | "MixtralModel" => Some(Family::Mixtral),
        "BertModel" | "BertForMaskedLM" | "BertForPreTraining" => Some(Family::Bert),
        _ => None,
    };
    if let Some(t) = keys.opt_str("model_type") {
        return by_type(t).ok_or_else(|| ModelError::UnknownFamily {
            path: keys.path.to_string(),
            key: "model_type".into(),
            value: t.to_string(),
        });
    }
    if let Some(Value::Array(archs)) = keys.obj.get("architectures") {
        let names: Vec<&str> = archs.iter().filter_map(Value::as_str).collect();
        if let Some(f) = names.iter().find_map(|a| by_arch(a)) {
            return Ok(f);
        }
        return Err(ModelError::UnknownFamily {
            path: keys.path.to_string(),
            key: "architectures".into(),
            value: names.join(", "),
        });
    }
    Err(ModelError::MissingKey { path: keys.path.to_string(), key: "model_type".into() })
}

/// Parses a Hugging Face config from its JSON text. `path` names the file in errors.
pub fn parse_config(name: &str, path: &str, text: &str) -> Result<ModelSpec, ModelError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ModelError::Json {
        path: path.to_string(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    let Value::Object(obj) = &value else {
        return Err(ModelError::Json {
            path: path.to_string(),
            line: 1,
            column: 1,
            message: "the top level is not a JSON object".into(),
        });
    };
    let keys = Keys { path, obj };
    let family = detect_family(&keys)?;
    let spec = match family {
        Family::Gpt2 => gpt2(&keys, name)?,
        Family::GptJ => gptj(&keys, name)?,
        Family::GptNeoX => neox(&keys, name)?,
        Family::Llama | Family::Mistral | Family::Mixtral => llama(&keys, name, family)?,
        Family::Bert => bert(&keys, name)?,
    };
    validate(&keys, &spec)?;
    Ok(spec)
}

fn base(keys: &Keys, name: &str, family: Family) -> ModelSpec {
    ModelSpec {
        name: name.to_string(),
        source: keys.path.to_string(),
        family,
        hidden: 0,
        layers: 0,
        heads: 0,
        kv_heads: 0,
        head_dim: 0,
        ffn_hidden: 0,
        vocab: 0,
        max_positions: 0,
        norm: NormKind::LayerNorm,
        ffn: FfnKind::Gelu,
        positions: Positions::Learned,
        residual: Residual::Sequential,
        final_norm: true,
        tied_embeddings: false,
        biases: Biases { qkv: true, attn_out: true, ffn: true, lm_head: false },
        moe: Moe::Dense,
        type_vocab: 0,
        pooler: false,
    }
}

/// `hidden` split over `heads` heads; the error names both keys.
fn head_dim(keys: &Keys, hidden: (&str, u64), heads: (&str, u64)) -> Result<u64, ModelError> {
    if !hidden.1.is_multiple_of(heads.1) {
        return Err(ModelError::NotDivisible {
            path: keys.path.to_string(),
            key: hidden.0.to_string(),
            value: hidden.1,
            by_key: heads.0.to_string(),
            by: heads.1,
        });
    }
    Ok(hidden.1 / heads.1)
}

fn gpt2(keys: &Keys, name: &str) -> Result<ModelSpec, ModelError> {
    let mut s = base(keys, name, Family::Gpt2);
    s.hidden = keys.size(&["n_embd"])?;
    s.layers = keys.size(&["n_layer"])?;
    s.heads = keys.size(&["n_head"])?;
    s.kv_heads = s.heads;
    s.head_dim = head_dim(keys, ("n_embd", s.hidden), ("n_head", s.heads))?;
    s.ffn_hidden = match keys.opt_size(&["n_inner"])? {
        Some(f) => f,
        None => s.hidden.checked_mul(4).ok_or_else(|| overflow(keys, "n_inner = 4 * n_embd"))?,
    };
    s.vocab = keys.size(&["vocab_size"])?;
    s.max_positions = keys.size(&["n_positions", "n_ctx"])?;
    s.tied_embeddings = keys.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    Ok(s)
}

fn gptj(keys: &Keys, name: &str) -> Result<ModelSpec, ModelError> {
    let mut s = base(keys, name, Family::GptJ);
    s.hidden = keys.size(&["n_embd"])?;
    s.layers = keys.size(&["n_layer"])?;
    s.heads = keys.size(&["n_head"])?;
    s.kv_heads = s.heads;
    s.head_dim = head_dim(keys, ("n_embd", s.hidden), ("n_head", s.heads))?;
    s.ffn_hidden = match keys.opt_size(&["n_inner"])? {
        Some(f) => f,
        None => s.hidden.checked_mul(4).ok_or_else(|| overflow(keys, "n_inner = 4 * n_embd"))?,
    };
    s.vocab = keys.size(&["vocab_size"])?;
    s.max_positions = keys.size(&["n_positions"])?;
    let rotary_dims = keys.opt_size(&["rotary_dim"])?.unwrap_or(s.head_dim);
    s.positions = Positions::Rotary { rotary_dims };
    s.residual = Residual::ParallelSharedNorm;
    s.tied_embeddings = keys.opt_bool("tie_word_embeddings")?.unwrap_or(false);
    // GPT-J: q, k, v and out_proj have no bias; the MLP and lm_head do.
    s.biases = Biases { qkv: false, attn_out: false, ffn: true, lm_head: true };
    Ok(s)
}

fn neox(keys: &Keys, name: &str) -> Result<ModelSpec, ModelError> {
    let mut s = base(keys, name, Family::GptNeoX);
    s.hidden = keys.size(&["hidden_size"])?;
    s.layers = keys.size(&["num_hidden_layers"])?;
    s.heads = keys.size(&["num_attention_heads"])?;
    s.kv_heads = s.heads;
    s.head_dim = head_dim(keys, ("hidden_size", s.hidden), ("num_attention_heads", s.heads))?;
    s.ffn_hidden = keys.size(&["intermediate_size"])?;
    s.vocab = keys.size(&["vocab_size"])?;
    s.max_positions = keys.size(&["max_position_embeddings"])?;
    let pct = keys.opt_fraction("rotary_pct")?.unwrap_or(1.0);
    // rotary_ndims = int(head_size * rotary_pct), as in GPTNeoXAttention.
    let rotary_dims = ((s.head_dim as f64) * pct) as u64;
    if rotary_dims == 0 {
        return Err(ModelError::BadValue {
            path: keys.path.to_string(),
            key: "rotary_pct".into(),
            value: pct.to_string(),
            expected: "a fraction that leaves at least one rotary dimension per head".into(),
        });
    }
    s.positions = Positions::Rotary { rotary_dims };
    s.residual =
        if keys.opt_bool("use_parallel_residual")?.unwrap_or(true) { Residual::Parallel } else { Residual::Sequential };
    s.tied_embeddings = keys.opt_bool("tie_word_embeddings")?.unwrap_or(false);
    s.biases = Biases { qkv: true, attn_out: true, ffn: true, lm_head: false };
    Ok(s)
}

fn llama(keys: &Keys, name: &str, family: Family) -> Result<ModelSpec, ModelError> {
    let mut s = base(keys, name, family);
    s.hidden = keys.size(&["hidden_size"])?;
    s.layers = keys.size(&["num_hidden_layers"])?;
    s.heads = keys.size(&["num_attention_heads"])?;
    s.kv_heads = keys.opt_size(&["num_key_value_heads"])?.unwrap_or(s.heads);
    if !s.heads.is_multiple_of(s.kv_heads) {
        return Err(ModelError::NotDivisible {
            path: keys.path.to_string(),
            key: "num_attention_heads".into(),
            value: s.heads,
            by_key: "num_key_value_heads".into(),
            by: s.kv_heads,
        });
    }
    s.head_dim = match keys.opt_size(&["head_dim"])? {
        Some(d) => d,
        None => head_dim(keys, ("hidden_size", s.hidden), ("num_attention_heads", s.heads))?,
    };
    s.ffn_hidden = keys.size(&["intermediate_size"])?;
    s.vocab = keys.size(&["vocab_size"])?;
    s.max_positions = keys.size(&["max_position_embeddings"])?;
    s.norm = NormKind::RmsNorm;
    s.ffn = FfnKind::SwiGlu;
    s.positions = Positions::Rotary { rotary_dims: s.head_dim };
    s.tied_embeddings = keys.opt_bool("tie_word_embeddings")?.unwrap_or(false);
    let attn_bias = keys.opt_bool("attention_bias")?.unwrap_or(false);
    let mlp_bias = keys.opt_bool("mlp_bias")?.unwrap_or(false);
    s.biases = Biases { qkv: attn_bias, attn_out: attn_bias, ffn: mlp_bias, lm_head: false };
    if family == Family::Mixtral {
        let experts = keys.size(&["num_local_experts"])?;
        let top_k = keys.size(&["num_experts_per_tok"])?;
        if top_k > experts {
            return Err(ModelError::BadValue {
                path: keys.path.to_string(),
                key: "num_experts_per_tok".into(),
                value: top_k.to_string(),
                expected: format!("at most num_local_experts = {experts}"),
            });
        }
        // Not a Hugging Face key (Mixtral has no capacity): the capacity factor of the wafer's fixed
        // dispatch buffer, as Switch Transformer's and GShard's; experts / top_k never drops a token.
        let capacity_pct = match keys.find(&["moe_capacity_factor"]) {
            None => 100,
            Some((k, v)) => match v.as_f64() {
                Some(f) if (0.01..=experts as f64).contains(&f) => (f * 100.0).round() as u64,
                _ => return Err(keys.bad(k, v, &format!("a number in [0.01, num_local_experts = {experts}]"))),
            },
        };
        s.moe = Moe::Experts { experts, top_k, capacity_pct };
    }
    Ok(s)
}

fn bert(keys: &Keys, name: &str) -> Result<ModelSpec, ModelError> {
    let mut s = base(keys, name, Family::Bert);
    s.hidden = keys.size(&["hidden_size"])?;
    s.layers = keys.size(&["num_hidden_layers"])?;
    s.heads = keys.size(&["num_attention_heads"])?;
    s.kv_heads = s.heads;
    s.head_dim = head_dim(keys, ("hidden_size", s.hidden), ("num_attention_heads", s.heads))?;
    s.ffn_hidden = keys.size(&["intermediate_size"])?;
    s.vocab = keys.size(&["vocab_size"])?;
    s.max_positions = keys.size(&["max_position_embeddings"])?;
    s.type_vocab = keys.opt_size(&["type_vocab_size"])?.unwrap_or(2);
    s.residual = Residual::PostNorm;
    s.final_norm = false;
    s.pooler = true;
    // The MLM decoder is tied to the word embeddings in BertForPreTraining.
    s.tied_embeddings = true;
    s.biases = Biases { qkv: true, attn_out: true, ffn: true, lm_head: true };
    if let Some(act) = keys.opt_str("hidden_act") {
        if !act.starts_with("gelu") {
            return Err(ModelError::BadValue {
                path: keys.path.to_string(),
                key: "hidden_act".into(),
                value: format!("\"{act}\""),
                expected: "a GELU variant (gelu, gelu_new)".into(),
            });
        }
    }
    Ok(s)
}

fn overflow(keys: &Keys, what: &str) -> ModelError {
    ModelError::Overflow { path: keys.path.to_string(), what: what.to_string() }
}

/// Cross-key checks that every family shares.
fn validate(keys: &Keys, s: &ModelSpec) -> Result<(), ModelError> {
    if let Positions::Rotary { rotary_dims } = s.positions {
        if rotary_dims > s.head_dim || rotary_dims % 2 != 0 {
            let key = if s.family == Family::GptJ { "rotary_dim" } else { "rotary_pct" };
            return Err(ModelError::BadValue {
                path: keys.path.to_string(),
                key: key.into(),
                value: rotary_dims.to_string(),
                expected: format!("an even number of rotary dimensions <= head size {}", s.head_dim),
            });
        }
    }
    // Every count the graph derives from the sizes must fit in u64; the parameter count is the largest
    // of the per-model ones, so checking it here turns later overflow into an error naming the file.
    s.param_count()?;
    Ok(())
}
