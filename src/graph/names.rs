//! Weight names as each family's Hugging Face checkpoint spells them, so that a weight tensor in the
//! graph maps one-to-one to a tensor in a `.safetensors` file.

use crate::model::Family;

/// A weight's role in the model, family-independent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    TokenEmbed,
    PosEmbed,
    TypeEmbed,
    EmbedNorm,
    Norm1,
    Norm2,
    Qkv,
    Q,
    K,
    V,
    AttnOut,
    FfnIn,
    FfnOut,
    Gate,
    Up,
    Down,
    Router,
    ExpertGate,
    ExpertUp,
    ExpertDown,
    FinalNorm,
    LmHead,
    Pooler,
    MlmDense,
    MlmNorm,
    MlmBias,
    Nsp,
}

/// `.weight` or `.bias`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    Weight,
    Bias,
}

/// The checkpoint name of `part`'s `param` in `layer` (ignored for parts outside the layers).
///
/// Mixtral's experts are stacked into one `[experts, out, in]` tensor per projection; its name
/// replaces the expert index with `*` (`model.layers.0.block_sparse_moe.experts.*.w1.weight`).
pub fn hf_name(family: Family, layer: u64, part: Part, param: Param) -> String {
    use Part::*;
    let p = match param {
        Param::Weight => "weight",
        Param::Bias => "bias",
    };
    let stem = match family {
        Family::Gpt2 => {
            let l = format!("h.{layer}");
            match part {
                TokenEmbed => "wte".into(),
                PosEmbed => "wpe".into(),
                Norm1 => format!("{l}.ln_1"),
                Norm2 => format!("{l}.ln_2"),
                Qkv => format!("{l}.attn.c_attn"),
                AttnOut => format!("{l}.attn.c_proj"),
                FfnIn => format!("{l}.mlp.c_fc"),
                FfnOut => format!("{l}.mlp.c_proj"),
                FinalNorm => "ln_f".into(),
                other => format!("{other:?}"),
            }
        }
        Family::GptJ => {
            let l = format!("transformer.h.{layer}");
            match part {
                TokenEmbed => "transformer.wte".into(),
                Norm1 => format!("{l}.ln_1"),
                Q => format!("{l}.attn.q_proj"),
                K => format!("{l}.attn.k_proj"),
                V => format!("{l}.attn.v_proj"),
                AttnOut => format!("{l}.attn.out_proj"),
                FfnIn => format!("{l}.mlp.fc_in"),
                FfnOut => format!("{l}.mlp.fc_out"),
                FinalNorm => "transformer.ln_f".into(),
                LmHead => "lm_head".into(),
                other => format!("{other:?}"),
            }
        }
        Family::GptNeoX => {
            let l = format!("gpt_neox.layers.{layer}");
            match part {
                TokenEmbed => "gpt_neox.embed_in".into(),
                Norm1 => format!("{l}.input_layernorm"),
                Norm2 => format!("{l}.post_attention_layernorm"),
                Qkv => format!("{l}.attention.query_key_value"),
                AttnOut => format!("{l}.attention.dense"),
                FfnIn => format!("{l}.mlp.dense_h_to_4h"),
                FfnOut => format!("{l}.mlp.dense_4h_to_h"),
                FinalNorm => "gpt_neox.final_layer_norm".into(),
                LmHead => "embed_out".into(),
                other => format!("{other:?}"),
            }
        }
        Family::Llama | Family::Mistral | Family::Mixtral => {
            let l = format!("model.layers.{layer}");
            match part {
                TokenEmbed => "model.embed_tokens".into(),
                Norm1 => format!("{l}.input_layernorm"),
                Norm2 => format!("{l}.post_attention_layernorm"),
                Q => format!("{l}.self_attn.q_proj"),
                K => format!("{l}.self_attn.k_proj"),
                V => format!("{l}.self_attn.v_proj"),
                AttnOut => format!("{l}.self_attn.o_proj"),
                Gate => format!("{l}.mlp.gate_proj"),
                Up => format!("{l}.mlp.up_proj"),
                Down => format!("{l}.mlp.down_proj"),
                Router => format!("{l}.block_sparse_moe.gate"),
                ExpertGate => format!("{l}.block_sparse_moe.experts.*.w1"),
                ExpertDown => format!("{l}.block_sparse_moe.experts.*.w2"),
                ExpertUp => format!("{l}.block_sparse_moe.experts.*.w3"),
                FinalNorm => "model.norm".into(),
                LmHead => "lm_head".into(),
                other => format!("{other:?}"),
            }
        }
        Family::Bert => {
            let l = format!("encoder.layer.{layer}");
            match part {
                TokenEmbed => "embeddings.word_embeddings".into(),
                PosEmbed => "embeddings.position_embeddings".into(),
                TypeEmbed => "embeddings.token_type_embeddings".into(),
                EmbedNorm => "embeddings.LayerNorm".into(),
                Q => format!("{l}.attention.self.query"),
                K => format!("{l}.attention.self.key"),
                V => format!("{l}.attention.self.value"),
                AttnOut => format!("{l}.attention.output.dense"),
                Norm1 => format!("{l}.attention.output.LayerNorm"),
                FfnIn => format!("{l}.intermediate.dense"),
                FfnOut => format!("{l}.output.dense"),
                Norm2 => format!("{l}.output.LayerNorm"),
                Pooler => "pooler.dense".into(),
                MlmDense => "cls.predictions.transform.dense".into(),
                MlmNorm => "cls.predictions.transform.LayerNorm".into(),
                // The MLM decoder's bias is a bare parameter, not a module's `.bias`.
                MlmBias => return "cls.predictions.bias".into(),
                Nsp => "cls.seq_relationship".into(),
                other => format!("{other:?}"),
            }
        }
    };
    format!("{stem}.{p}")
}
