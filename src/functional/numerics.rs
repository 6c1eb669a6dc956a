//! The numerics a family's Hugging Face implementation uses that the graph does not carry: norm
//! epsilon, the GELU variant, the rotary layout and frequencies, a sliding attention window.
//! Read from the same `config.json` the model came from, with the defaults of each family's
//! `PretrainedConfig` class where a key is absent.

use serde_json::Value;

use super::FunctionalError;
use crate::model::{embedded_models, Family, ModelSpec};

/// The GELU of a family's MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// 0.5 x (1 + erf(x / sqrt 2)): `gelu` in transformers (BERT, GPT-NeoX's `gelu`).
    GeluErf,
    /// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): `gelu_new`, `gelu_fast`, `gelu_pytorch_tanh`.
    GeluTanh,
}

/// Which dimensions rotary embeddings rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotaryStyle {
    /// Dimension i pairs with i + rot/2 (`rotate_half`: GPT-NeoX, Llama, Mistral, Mixtral as stored on the Hub).
    Half,
    /// Dimension 2i pairs with 2i + 1 (`rotate_every_two`: GPT-J).
    Interleaved,
}

/// Llama 3.1's `rope_scaling = {rope_type: "llama3", ...}` frequency adjustment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_positions: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Numerics {
    pub norm_eps: f64,
    pub act: Act,
    pub rotary_style: RotaryStyle,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    /// Mistral's sliding window: a query at position p sees keys at positions > p - window.
    pub sliding_window: Option<u64>,
}

impl Default for Numerics {
    /// What single-op graphs use (they have no norms, activations or rotary embeddings).
    fn default() -> Numerics {
        Numerics {
            norm_eps: 1e-5,
            act: Act::GeluTanh,
            rotary_style: RotaryStyle::Half,
            rope_theta: 10000.0,
            rope_scaling: None,
            sliding_window: None,
        }
    }
}

impl Numerics {
    /// Numerics of a model, reading its config text again (an embedded model by its path, else the file).
    pub fn for_model(spec: &ModelSpec) -> Result<Numerics, FunctionalError> {
        let text = match embedded_models().iter().find(|f| f.path == spec.source) {
            Some(f) => f.text.to_string(),
            None => std::fs::read_to_string(&spec.source)
                .map_err(|source| FunctionalError::Read { path: spec.source.clone(), source })?,
        };
        Numerics::from_config(spec, &text)
    }

    /// Numerics from a config's JSON text (already parsed once into `spec`, so it is valid JSON).
    pub fn from_config(spec: &ModelSpec, text: &str) -> Result<Numerics, FunctionalError> {
        let value: Value = serde_json::from_str(text).map_err(|e| FunctionalError::Config {
            path: spec.source.clone(),
            key: "(file)".into(),
            value: String::new(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let get = |k: &str| value.get(k).filter(|v| !v.is_null());
        let bad = |key: &str, v: &Value, reason: &str| FunctionalError::Config {
            path: spec.source.clone(),
            key: key.to_string(),
            value: v.to_string(),
            reason: reason.to_string(),
        };
        let num = |keys: &[&str], default: f64| -> Result<f64, FunctionalError> {
            for k in keys {
                if let Some(v) = get(k) {
                    return v
                        .as_f64()
                        .filter(|x| x.is_finite() && *x > 0.0)
                        .ok_or_else(|| bad(k, v, "expected a positive number"));
                }
            }
            Ok(default)
        };
        // Defaults of GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig/MistralConfig/MixtralConfig, BertConfig.
        let (eps_keys, eps_default): (&[&str], f64) = match spec.family {
            Family::Gpt2 | Family::GptJ => (&["layer_norm_epsilon"], 1e-5),
            Family::GptNeoX => (&["layer_norm_eps"], 1e-5),
            Family::Llama => (&["rms_norm_eps"], 1e-6),
            Family::Mistral | Family::Mixtral => (&["rms_norm_eps"], 1e-5),
            Family::Bert => (&["layer_norm_eps"], 1e-12),
        };
        let norm_eps = num(eps_keys, eps_default)?;
        let (act_key, act_default) = match spec.family {
            Family::Gpt2 | Family::GptJ => ("activation_function", "gelu_new"),
            Family::GptNeoX | Family::Bert => ("hidden_act", "gelu"),
            // SwiGLU families use SiLU, which the graph names explicitly; the GELU variant is unused.
            Family::Llama | Family::Mistral | Family::Mixtral => ("hidden_act", "silu"),
        };
        let act_value = get(act_key).cloned().unwrap_or(Value::String(act_default.into()));
        let act =
            match act_value.as_str() {
                Some("gelu") => Act::GeluErf,
                Some("gelu_new" | "gelu_fast" | "gelu_pytorch_tanh") => Act::GeluTanh,
                Some("silu" | "swish") if spec.ffn == crate::model::FfnKind::SwiGlu => Act::GeluTanh,
                _ => return Err(bad(
                    act_key,
                    &act_value,
                    "the reference implements gelu, gelu_new, gelu_fast and gelu_pytorch_tanh (silu for SwiGLU models)",
                )),
            };
        let rotary_style = if spec.family == Family::GptJ { RotaryStyle::Interleaved } else { RotaryStyle::Half };
        let rope_theta = num(&["rope_theta", "rotary_emb_base"], 10000.0)?;
        let rope_scaling = match get("rope_scaling") {
            None => None,
            Some(v) => {
                let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str);
                if kind != Some("llama3") {
                    return Err(bad("rope_scaling", v, "the reference implements only rope_type \"llama3\""));
                }
                let f = |k: &str| {
                    v.get(k)
                        .and_then(Value::as_f64)
                        .filter(|x| *x > 0.0)
                        .ok_or_else(|| bad("rope_scaling", v, &format!("`{k}` must be a positive number")))
                };
                Some(Llama3Scaling {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_positions: f("original_max_position_embeddings")?,
                })
            }
        };
        let sliding_window = match get("sliding_window") {
            Some(v) if matches!(spec.family, Family::Mistral | Family::Mixtral) => Some(
                v.as_u64().filter(|w| *w > 0).ok_or_else(|| bad("sliding_window", v, "expected a positive integer"))?,
            ),
            _ => None,
        };
        Ok(Numerics { norm_eps, act, rotary_style, rope_theta, rope_scaling, sliding_window })
    }

    /// The inverse frequencies of `rot_dims` rotary dimensions, as transformers computes them
    /// (`1 / theta^(2i / rot_dims)`, then Llama 3's scaling), in f64.
    pub fn inv_freq(&self, rot_dims: u64) -> Vec<f64> {
        (0..rot_dims / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf((2 * i) as f64 / rot_dims as f64);
                match self.rope_scaling {
                    None => f,
                    Some(s) => {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let low_wavelen = s.original_max_positions / s.low_freq_factor;
                        let high_wavelen = s.original_max_positions / s.high_freq_factor;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / s.factor
                        } else {
                            let smooth = (s.original_max_positions / wavelen - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        }
                    }
                }
            })
            .collect()
    }
}
