//! Forward graphs: the transformer families and the single-op workloads.

use super::builder::Builder;
use super::ir::{Role, TensorId};
use super::names::{hf_name, Param, Part};
use super::ops::{Attn, Linear, OpKind, Pick, Route, Rows, WeightLayout};
use super::GraphError;
use crate::model::{prod, Family, FfnKind, ModelSpec, Moe, Phase, Positions, Residual, SingleOp};

/// Builds the forward graph of a transformer; returns the loss tensors (training) or nothing.
pub(crate) fn transformer(b: &mut Builder, spec: &ModelSpec) -> Result<Vec<TensorId>, GraphError> {
    Fwd::new(spec, b)?.build(b)
}

struct Fwd<'a> {
    spec: &'a ModelSpec,
    phase: Phase,
    batch: u64,
    /// New tokens per sequence in this step.
    seq: u64,
    /// Cached tokens per sequence (decode).
    context: u64,
    /// batch * seq.
    rows: u64,
    layout: WeightLayout,
}

impl<'a> Fwd<'a> {
    fn new(spec: &'a ModelSpec, b: &Builder) -> Result<Fwd<'a>, GraphError> {
        let w = &b.workload;
        let rows = prod(&[w.batch, w.seq]).ok_or_else(|| GraphError::Overflow { what: "batch x seq".into() })?;
        // GPT-2 stores Conv1D weights as [in, out]; every other family uses nn.Linear's [out, in].
        let layout = if spec.family == Family::Gpt2 { WeightLayout::InOut } else { WeightLayout::OutIn };
        Ok(Fwd { spec, phase: w.phase, batch: w.batch, seq: w.seq, context: w.context, rows, layout })
    }

    fn name(&self, layer: u64, part: Part, param: Param) -> String {
        hf_name(self.spec.family, layer, part, param)
    }

    /// A linear layer `x[m, k] -> [m, n]` with its weight (and bias) created here.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        b: &mut Builder,
        op: &str,
        x: TensorId,
        m: u64,
        k: u64,
        n: u64,
        part: Part,
        layer: u64,
        bias: bool,
    ) -> Result<TensorId, GraphError> {
        let lin = Linear::plain(m, k, n, bias, self.layout);
        let w = b.weight(self.name(layer, part, Param::Weight), lin.w_shape())?;
        let mut ins = vec![x, w];
        if bias {
            ins.push(b.weight(self.name(layer, part, Param::Bias), lin.b_shape())?);
        }
        b.apply(op, OpKind::Linear(lin), ins)
    }

    fn norm(
        &self,
        b: &mut Builder,
        op: &str,
        x: TensorId,
        rows: u64,
        part: Part,
        layer: u64,
    ) -> Result<TensorId, GraphError> {
        let h = self.spec.hidden;
        let mut ins = vec![x, b.weight(self.name(layer, part, Param::Weight), vec![h])?];
        if self.spec.norm.has_bias() {
            ins.push(b.weight(self.name(layer, part, Param::Bias), vec![h])?);
        }
        b.apply(op, OpKind::Norm { kind: self.spec.norm, rows: Rows { rows, width: h } }, ins)
    }

    fn build(&self, b: &mut Builder) -> Result<Vec<TensorId>, GraphError> {
        let s = self.spec;
        let h = s.hidden;
        let rows = self.rows;
        // Embeddings.
        let ids = b.ids("input_ids", rows)?;
        let table = b.weight(self.name(0, Part::TokenEmbed, Param::Weight), vec![s.vocab, h])?;
        let emb = OpKind::Embedding { rows, vocab: s.vocab, width: h };
        let mut x = b.apply("embed.tokens", emb, vec![ids, table])?;
        let mut sum = vec![x];
        if s.positions == Positions::Learned {
            let pos = b.ids("position_ids", rows)?;
            let wpe = b.weight(self.name(0, Part::PosEmbed, Param::Weight), vec![s.max_positions, h])?;
            let k = OpKind::Embedding { rows, vocab: s.max_positions, width: h };
            sum.push(b.apply("embed.positions", k, vec![pos, wpe])?);
        }
        if s.type_vocab > 0 {
            let tt = b.ids("token_type_ids", rows)?;
            let wtt = b.weight(self.name(0, Part::TypeEmbed, Param::Weight), vec![s.type_vocab, h])?;
            let k = OpKind::Embedding { rows, vocab: s.type_vocab, width: h };
            sum.push(b.apply("embed.token_types", k, vec![tt, wtt])?);
        }
        if sum.len() > 1 {
            let n = sum.len() as u64;
            x = b.apply("embed.sum", OpKind::Add { rows: Rows { rows, width: h }, n }, sum)?;
        }
        if s.family.is_encoder() {
            x = self.norm(b, "embed.norm", x, rows, Part::EmbedNorm, 0)?;
        }
        for l in 0..s.layers {
            b.layer = Some(l as u32);
            x = self.layer(b, l, x)?;
        }
        b.layer = None;
        if s.family.is_encoder() {
            self.bert_head(b, x, table)
        } else {
            self.decoder_head(b, x, table)
        }
    }

    fn layer(&self, b: &mut Builder, l: u64, x: TensorId) -> Result<TensorId, GraphError> {
        let s = self.spec;
        let rows = self.rows;
        let add = |n: u64| OpKind::Add { rows: Rows { rows, width: s.hidden }, n };
        let p = format!("l{l}");
        match s.residual {
            Residual::Sequential => {
                let a_in = self.norm(b, &format!("{p}.norm1"), x, rows, Part::Norm1, l)?;
                let a = self.attention(b, l, a_in)?;
                let x = b.apply(&format!("{p}.attn.residual"), add(2), vec![x, a])?;
                let f_in = self.norm(b, &format!("{p}.norm2"), x, rows, Part::Norm2, l)?;
                let f = self.ffn(b, l, f_in)?;
                b.apply(&format!("{p}.ffn.residual"), add(2), vec![x, f])
            }
            Residual::ParallelSharedNorm => {
                let a_in = self.norm(b, &format!("{p}.norm1"), x, rows, Part::Norm1, l)?;
                let a = self.attention(b, l, a_in)?;
                let f = self.ffn(b, l, a_in)?;
                b.apply(&format!("{p}.residual"), add(3), vec![x, a, f])
            }
            Residual::Parallel => {
                let a_in = self.norm(b, &format!("{p}.norm1"), x, rows, Part::Norm1, l)?;
                let a = self.attention(b, l, a_in)?;
                let f_in = self.norm(b, &format!("{p}.norm2"), x, rows, Part::Norm2, l)?;
                let f = self.ffn(b, l, f_in)?;
                b.apply(&format!("{p}.residual"), add(3), vec![x, a, f])
            }
            Residual::PostNorm => {
                let a = self.attention(b, l, x)?;
                let x = b.apply(&format!("{p}.attn.residual"), add(2), vec![x, a])?;
                let x = self.norm(b, &format!("{p}.norm1"), x, rows, Part::Norm1, l)?;
                let f = self.ffn(b, l, x)?;
                let x = b.apply(&format!("{p}.ffn.residual"), add(2), vec![x, f])?;
                self.norm(b, &format!("{p}.norm2"), x, rows, Part::Norm2, l)
            }
        }
    }

    fn attention(&self, b: &mut Builder, l: u64, x: TensorId) -> Result<TensorId, GraphError> {
        let s = self.spec;
        let (rows, h, d) = (self.rows, s.hidden, s.head_dim);
        let p = format!("l{l}.attn");
        let (qw, kvw) = (s.attn_width(), s.kv_width());
        let fused = matches!(s.family, Family::Gpt2 | Family::GptNeoX);
        let (mut q, mut k, v) = if fused {
            let qkv = self.linear(b, &format!("{p}.qkv"), x, rows, h, s.qkv_width(), Part::Qkv, l, s.biases.qkv)?;
            let split = OpKind::Split { rows, widths: [qw, kvw, kvw] };
            let parts = b.apply_n(&format!("{p}.split"), split, vec![qkv])?;
            (parts[0], parts[1], parts[2])
        } else {
            let q = self.linear(b, &format!("{p}.q"), x, rows, h, qw, Part::Q, l, s.biases.qkv)?;
            let k = self.linear(b, &format!("{p}.k"), x, rows, h, kvw, Part::K, l, s.biases.qkv)?;
            let v = self.linear(b, &format!("{p}.v"), x, rows, h, kvw, Part::V, l, s.biases.qkv)?;
            (q, k, v)
        };
        if let Positions::Rotary { rotary_dims } = s.positions {
            let rot = |heads| OpKind::Rotary { rows, heads, head_dim: d, rot_dims: rotary_dims };
            q = b.apply(&format!("{p}.q_rotary"), rot(s.heads), vec![q])?;
            k = b.apply(&format!("{p}.k_rotary"), rot(s.kv_heads), vec![k])?;
        }
        // The keys and values attention reads: this step's, or the cache's plus this step's.
        let (k_all, v_all, kv_len) = match self.phase {
            Phase::Train => (k, v, self.seq),
            Phase::Prefill => {
                if !s.family.is_encoder() {
                    for (t, name) in [(k, "k"), (v, "v")] {
                        let append = OpKind::KvCacheAppend { batch: self.batch, len: 0, new: self.seq, width: kvw };
                        let c = b.apply(&format!("{p}.{name}_cache_append"), append, vec![t])?;
                        b.tensors[c.idx()].role = Role::KvCache;
                        b.output(c);
                    }
                }
                (k, v, self.seq)
            }
            Phase::Decode => {
                let mut all = Vec::new();
                for (t, name) in [(k, "k"), (v, "v")] {
                    let cache = b.tensor(
                        format!("{p}.{name}_cache"),
                        vec![self.batch * self.context, kvw],
                        b.elem(),
                        Role::KvCache,
                    )?;
                    let read = OpKind::KvCacheRead { batch: self.batch, len: self.context, new: self.seq, width: kvw };
                    all.push(b.apply(&format!("{p}.{name}_cache_read"), read, vec![cache, t])?);
                    let append =
                        OpKind::KvCacheAppend { batch: self.batch, len: self.context, new: self.seq, width: kvw };
                    let c = b.apply(&format!("{p}.{name}_cache_append"), append, vec![cache, t])?;
                    b.tensors[c.idx()].role = Role::KvCache;
                    b.tensors[c.idx()].updates = Some(cache);
                    b.output(c);
                }
                (all[0], all[1], self.context + self.seq)
            }
        };
        let attn = Attn {
            batch: self.batch,
            heads: s.heads,
            kv_heads: s.kv_heads,
            q_len: self.seq,
            kv_len,
            head_dim: d,
            causal: !s.family.is_encoder(),
        };
        let scores = b.apply(&format!("{p}.scores"), OpKind::AttnScores(attn), vec![q, k_all])?;
        let probs = b.apply(&format!("{p}.softmax"), OpKind::AttnSoftmax(attn), vec![scores])?;
        let ctx = b.apply(&format!("{p}.context"), OpKind::AttnContext(attn), vec![probs, v_all])?;
        self.linear(b, &format!("{p}.out"), ctx, rows, qw, h, Part::AttnOut, l, s.biases.attn_out)
    }

    fn ffn(&self, b: &mut Builder, l: u64, x: TensorId) -> Result<TensorId, GraphError> {
        let s = self.spec;
        let (rows, h, f) = (self.rows, s.hidden, s.ffn_hidden);
        let p = format!("l{l}.ffn");
        let bias = s.biases.ffn;
        match (s.moe, s.ffn) {
            (Moe::Dense, FfnKind::Gelu) => {
                let up = self.linear(b, &format!("{p}.up"), x, rows, h, f, Part::FfnIn, l, bias)?;
                let act = b.apply(&format!("{p}.gelu"), OpKind::Gelu(Rows { rows, width: f }), vec![up])?;
                self.linear(b, &format!("{p}.down"), act, rows, f, h, Part::FfnOut, l, bias)
            }
            (Moe::Dense, FfnKind::SwiGlu) => {
                let gate = self.linear(b, &format!("{p}.gate"), x, rows, h, f, Part::Gate, l, bias)?;
                let up = self.linear(b, &format!("{p}.up"), x, rows, h, f, Part::Up, l, bias)?;
                let act = b.apply(&format!("{p}.swiglu"), OpKind::SwiGlu(Rows { rows, width: f }), vec![gate, up])?;
                self.linear(b, &format!("{p}.down"), act, rows, f, h, Part::Down, l, bias)
            }
            (Moe::Experts { experts, top_k, capacity_pct }, _) => {
                let route = Route { rows, width: h, experts, top_k, capacity_pct };
                let logits = self.linear(b, &format!("{p}.router"), x, rows, h, experts, Part::Router, l, false)?;
                let probs = b.apply(&format!("{p}.topk"), OpKind::MoeTopK(route), vec![logits])?;
                let xd = b.apply(&format!("{p}.dispatch"), OpKind::MoeDispatch(route), vec![x, probs])?;
                let (active, cap) = (route.active(), route.capacity());
                let expert = |b: &mut Builder, k, n, part| -> Result<(Linear, TensorId), GraphError> {
                    let lin = Linear {
                        groups: active,
                        weight_groups: experts,
                        m: cap,
                        k,
                        n,
                        bias: false,
                        layout: self.layout,
                    };
                    Ok((lin, b.weight(self.name(l, part, Param::Weight), lin.w_shape())?))
                };
                let (g_lin, g_w) = expert(b, h, f, Part::ExpertGate)?;
                let gate = b.apply(&format!("{p}.experts.gate"), OpKind::Linear(g_lin), vec![xd, g_w])?;
                let (u_lin, u_w) = expert(b, h, f, Part::ExpertUp)?;
                let up = b.apply(&format!("{p}.experts.up"), OpKind::Linear(u_lin), vec![xd, u_w])?;
                let act = OpKind::SwiGlu(Rows { rows: active * cap, width: f });
                let act = b.apply(&format!("{p}.experts.swiglu"), act, vec![gate, up])?;
                let (d_lin, d_w) = expert(b, f, h, Part::ExpertDown)?;
                let yd = b.apply(&format!("{p}.experts.down"), OpKind::Linear(d_lin), vec![act, d_w])?;
                b.apply(&format!("{p}.combine"), OpKind::MoeCombine(route), vec![yd, probs])
            }
        }
    }

    /// Final norm, LM head and (training) the loss; tied heads reuse the token table.
    fn decoder_head(&self, b: &mut Builder, x: TensorId, table: TensorId) -> Result<Vec<TensorId>, GraphError> {
        let s = self.spec;
        let h = s.hidden;
        // Prefill keeps only the last prompt token's logits; decode has one token per sequence already.
        let (x, rows) = if self.phase == Phase::Prefill {
            let pick = OpKind::TokenSelect { batch: self.batch, seq: self.seq, width: h, pick: Pick::Last };
            (b.apply("head.last_token", pick, vec![x])?, self.batch)
        } else {
            (x, self.rows)
        };
        let x = self.norm(b, "head.norm", x, rows, Part::FinalNorm, 0)?;
        let logits = if s.tied_embeddings {
            // The token table [vocab, hidden] is the head's weight in [out, in] layout.
            let lin = Linear::plain(rows, h, s.vocab, false, WeightLayout::OutIn);
            b.apply("head.logits", OpKind::Linear(lin), vec![x, table])?
        } else {
            let lin = Linear::plain(rows, h, s.vocab, s.biases.lm_head, WeightLayout::OutIn);
            let w = b.weight(self.name(0, Part::LmHead, Param::Weight), lin.w_shape())?;
            let mut ins = vec![x, w];
            if lin.bias {
                ins.push(b.weight(self.name(0, Part::LmHead, Param::Bias), lin.b_shape())?);
            }
            b.apply("head.logits", OpKind::Linear(lin), ins)?
        };
        if self.phase == Phase::Train {
            let labels = b.ids("labels", rows)?;
            let ce = OpKind::CrossEntropy { rows, classes: s.vocab };
            Ok(vec![b.apply("head.loss", ce, vec![logits, labels])?])
        } else {
            b.output(logits);
            Ok(vec![])
        }
    }

    /// BERT: hidden states and the pooler for inference; BertForPreTraining's MLM and NSP heads for training.
    fn bert_head(&self, b: &mut Builder, x: TensorId, table: TensorId) -> Result<Vec<TensorId>, GraphError> {
        let s = self.spec;
        let (h, rows) = (s.hidden, self.rows);
        let first = OpKind::TokenSelect { batch: self.batch, seq: self.seq, width: h, pick: Pick::First };
        let cls = b.apply("pooler.first_token", first, vec![x])?;
        let pooled = self.linear(b, "pooler.dense", cls, self.batch, h, h, Part::Pooler, 0, true)?;
        let pooled = b.apply("pooler.tanh", OpKind::Tanh(Rows { rows: self.batch, width: h }), vec![pooled])?;
        if self.phase != Phase::Train {
            b.output(x);
            b.output(pooled);
            return Ok(vec![]);
        }
        // Masked-LM head over every token, as BertForPreTraining computes it.
        let t = self.linear(b, "mlm.dense", x, rows, h, h, Part::MlmDense, 0, true)?;
        let t = b.apply("mlm.gelu", OpKind::Gelu(Rows { rows, width: h }), vec![t])?;
        let t = self.norm(b, "mlm.norm", t, rows, Part::MlmNorm, 0)?;
        let lin = Linear::plain(rows, h, s.vocab, true, WeightLayout::OutIn);
        let bias = b.weight(self.name(0, Part::MlmBias, Param::Bias), lin.b_shape())?;
        let logits = b.apply("mlm.logits", OpKind::Linear(lin), vec![t, table, bias])?;
        let labels = b.ids("mlm_labels", rows)?;
        let mlm = b.apply("mlm.loss", OpKind::CrossEntropy { rows, classes: s.vocab }, vec![logits, labels])?;
        // Next-sentence prediction on the pooled [CLS] token.
        let nsp = self.linear(b, "nsp.logits", pooled, self.batch, h, 2, Part::Nsp, 0, true)?;
        let nsp_labels = b.ids("nsp_labels", self.batch)?;
        let nsp = b.apply("nsp.loss", OpKind::CrossEntropy { rows: self.batch, classes: 2 }, vec![nsp, nsp_labels])?;
        Ok(vec![mlm, nsp])
    }
}

/// Builds the one-op graph of a single-op workload.
pub(crate) fn single(b: &mut Builder, op: SingleOp) -> Result<(), GraphError> {
    let elem = b.elem();
    let input = |b: &mut Builder, name: &str, shape: Vec<u64>| b.tensor(name.into(), shape, elem, Role::Input);
    // A[m, k] is the streamed activation, B[k, n] the weight.
    let matmul = |b: &mut Builder, name: &str, m: u64, k: u64, n: u64| -> Result<TensorId, GraphError> {
        let lin = Linear::plain(m, k, n, false, WeightLayout::InOut);
        let a = input(b, "a", lin.x_shape())?;
        let w = b.weight("b".into(), lin.w_shape())?;
        b.apply(name, OpKind::Linear(lin), vec![a, w])
    };
    let out = match op {
        SingleOp::Gemm { m, n, k } => matmul(b, "gemm", m, k, n)?,
        SingleOp::Gemv { k, n } => matmul(b, "gemv", 1, k, n)?,
        SingleOp::AllReduce { bytes } => {
            let eb = elem.bytes();
            if bytes % eb != 0 {
                return Err(GraphError::Workload(format!(
                    "allreduce:{bytes}: {bytes} bytes is not a whole number of {} elements ({eb} bytes each)",
                    b.dtype()
                )));
            }
            let x = input(b, "x", vec![bytes / eb])?;
            b.apply("allreduce", OpKind::AllReduce { elems: bytes / eb }, vec![x])?
        }
        SingleOp::Elementwise { n } => {
            let rows = Rows { rows: 1, width: n };
            let a = input(b, "a", vec![1, n])?;
            let c = input(b, "b", vec![1, n])?;
            b.apply("elementwise", OpKind::Add { rows, n: 2 }, vec![a, c])?
        }
    };
    b.output(out);
    Ok(())
}
