//! Op kinds: their parameters, the tensor shapes they take and give (the verifier's contract),
//! and their FLOPs.
//!
//! FLOP conventions: a multiply-add is two FLOPs; matrix multiplications count 2 x batch x M x N x K
//! (their `matmul_flops`); vector ops count the per-element constants below, which are stated once
//! here so that every machine model charges the same work.

use crate::model::{prod, sum, NormKind};

/// Per-element FLOPs of the vector ops. Approximate operation counts of straightforward kernels;
/// they are small next to the matmuls, but every machine model must execute exactly these.
pub mod flops_per_elem {
    /// Scale, row max, subtract, exp, row sum, divide.
    pub const SOFTMAX: u64 = 6;
    /// p * dp, row sum, subtract, multiply, scale.
    pub const SOFTMAX_GRAD: u64 = 5;
    /// Mean, centre, square, variance sum, normalise, scale, shift.
    pub const LAYERNORM: u64 = 7;
    pub const LAYERNORM_GRAD: u64 = 14;
    /// Square, sum, normalise, scale.
    pub const RMSNORM: u64 = 4;
    pub const RMSNORM_GRAD: u64 = 9;
    /// tanh-approximated GELU: cube, multiply-add, tanh, add, two multiplies.
    pub const GELU: u64 = 8;
    pub const GELU_GRAD: u64 = 16;
    /// SiLU(gate) * up: exp, add, divide, two multiplies.
    pub const SWIGLU: u64 = 5;
    pub const SWIGLU_GRAD: u64 = 11;
    pub const TANH: u64 = 4;
    /// (1 - y^2) * dy.
    pub const TANH_GRAD: u64 = 3;
    /// x * cos + rotate(x) * sin, per rotated element.
    pub const ROTARY: u64 = 3;
    /// Max, subtract, exp, sum, log over the logits.
    pub const CROSS_ENTROPY: u64 = 5;
    /// softmax - one_hot, scaled by 1 / rows.
    pub const CROSS_ENTROPY_GRAD: u64 = 2;
    /// Adam: two moment updates, bias corrections, sqrt, divide, weight update.
    pub const ADAM: u64 = 12;
}
use flops_per_elem as fpe;

pub type Shape = Vec<u64>;

/// How a linear layer's weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]`, as GPT-2's Conv1D stores it.
    InOut,
    /// `[out, in]`, as `torch.nn.Linear` stores it.
    OutIn,
}

/// y[g*m, n] = x[g*m, k] · W_g[k, n] (+ b[n]) for each of `groups` weight groups (experts); groups = 1
/// for an ordinary linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    /// Groups that compute (the experts that received tokens).
    pub groups: u64,
    /// Groups the weight tensor holds (all experts); equals `groups` except for lightly loaded MoE layers.
    pub weight_groups: u64,
    pub m: u64,
    pub k: u64,
    pub n: u64,
    pub bias: bool,
    pub layout: WeightLayout,
}

impl Linear {
    pub fn x_shape(&self) -> Shape {
        vec![self.groups * self.m, self.k]
    }
    pub fn y_shape(&self) -> Shape {
        vec![self.groups * self.m, self.n]
    }
    pub fn w_shape(&self) -> Shape {
        let (a, b) = match self.layout {
            WeightLayout::InOut => (self.k, self.n),
            WeightLayout::OutIn => (self.n, self.k),
        };
        if self.weight_groups == 1 {
            vec![a, b]
        } else {
            vec![self.weight_groups, a, b]
        }
    }
    pub fn b_shape(&self) -> Shape {
        if self.weight_groups == 1 {
            vec![self.n]
        } else {
            vec![self.weight_groups, self.n]
        }
    }
    /// A plain (ungrouped) linear layer.
    pub fn plain(m: u64, k: u64, n: u64, bias: bool, layout: WeightLayout) -> Linear {
        Linear { groups: 1, weight_groups: 1, m, k, n, bias, layout }
    }
    fn matmul_flops(&self) -> Option<u64> {
        prod(&[2, self.groups, self.m, self.n, self.k])
    }
    fn bias_flops(&self) -> Option<u64> {
        if self.bias {
            prod(&[self.groups, self.m, self.n])
        } else {
            Some(0)
        }
    }
}

/// Multi-head attention over head groups: `heads` query heads share `kv_heads` key/value heads
/// (GQA; kv_heads = heads is plain multi-head attention). The matmuls are batched over
/// batch x kv_heads head groups, each M = (heads / kv_heads) x q_len rows against kv_len keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attn {
    pub batch: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub q_len: u64,
    pub kv_len: u64,
    pub head_dim: u64,
    /// Causal mask (decoders); the matmuls are still counted dense.
    pub causal: bool,
}

impl Attn {
    pub fn q_shape(&self) -> Shape {
        vec![self.batch * self.q_len, self.heads * self.head_dim]
    }
    pub fn kv_shape(&self) -> Shape {
        vec![self.batch * self.kv_len, self.kv_heads * self.head_dim]
    }
    pub fn scores_shape(&self) -> Shape {
        vec![self.batch, self.heads, self.q_len, self.kv_len]
    }
    fn group(&self) -> u64 {
        self.heads / self.kv_heads
    }
    /// (batch, M, N, K) of the scores matmul S = Q · K^T per head group.
    pub fn scores_bmnk(&self) -> [u64; 4] {
        [self.batch * self.kv_heads, self.group() * self.q_len, self.kv_len, self.head_dim]
    }
    fn scores_elems(&self) -> Option<u64> {
        prod(&[self.batch, self.heads, self.q_len, self.kv_len])
    }
    /// Every attention matmul (forward and its gradients) has the same FLOPs: 2·B·H·q·kv·d.
    fn matmul_flops(&self) -> Option<u64> {
        prod(&[2, self.batch, self.heads, self.q_len, self.kv_len, self.head_dim])
    }
}

/// Mixture-of-experts routing sizes: `rows` tokens, each sent to `top_k` of `experts`. Routing is
/// taken as balanced: min(experts, rows * top_k) experts are active and each receives
/// `capacity` = ceil(rows * top_k / active) rows, times the capacity factor (`capacity_pct` / 100,
/// at most `rows`: no expert gets a token twice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub rows: u64,
    pub width: u64,
    pub experts: u64,
    pub top_k: u64,
    /// The capacity factor in percent (100: a balanced share).
    pub capacity_pct: u64,
}

impl Route {
    /// Experts that receive at least one token.
    pub fn active(&self) -> u64 {
        self.experts.min(self.rows * self.top_k)
    }
    pub fn capacity(&self) -> u64 {
        if self.active() < self.experts {
            // One copy per slot.
            return 1;
        }
        let pct = self.capacity_pct.max(1);
        (self.rows * self.top_k * pct).div_ceil(self.active() * 100).clamp(1, self.rows.max(1))
    }
    fn dispatched_shape(&self) -> Shape {
        vec![self.active() * self.capacity(), self.width]
    }

    /// Where a real routing puts each token's copies in the dispatched buffer: the one layout the
    /// reference and the wafer's values kernels share. The buffer is `active` slots of `capacity` rows,
    /// laid out capacity-major: position p of slot s is row `p * active + s`, so that the grouped
    /// linears' `[capacity, active * n]` view of their operands (a run's rows are positions of every
    /// slot) is the buffer itself.
    /// - With every expert active (`active == experts`), slot e is expert e's and holds at most
    ///   `capacity` copies: first choices before second choices (GShard's priority), tokens in order
    ///   within a choice; a copy over its expert's capacity is dropped (it adds nothing to the token's
    ///   output), as Switch Transformer and GShard drop overflow tokens.
    /// - Otherwise `active = rows * top_k` and `capacity = 1`: every copy takes its own slot, copies in
    ///   expert order and tokens in order within an expert; nothing is dropped.
    ///
    /// `chosen[t]` are token t's `top_k` experts in choice order.
    pub fn dispatch(&self, chosen: &[Vec<usize>]) -> Dispatch {
        let (a, cap) = (self.active() as usize, self.capacity() as usize);
        debug_assert!(cap >= 1);
        let mut d = Dispatch {
            slot_expert: vec![None; a],
            slot_rows: vec![0; a],
            copies: chosen.iter().map(|top| top.iter().map(|&e| (e, None)).collect()).collect(),
        };
        if self.active() == self.experts {
            let k = chosen.iter().map(Vec::len).max().unwrap_or(0);
            for rank in 0..k {
                for (t, top) in chosen.iter().enumerate() {
                    let Some(&e) = top.get(rank) else { continue };
                    if e < a && d.slot_rows[e] < cap {
                        d.copies[t][rank].1 = Some(d.slot_rows[e] * a + e);
                        d.slot_expert[e] = Some(e);
                        d.slot_rows[e] += 1;
                    }
                }
            }
        } else {
            let mut next = 0usize;
            for e in 0..self.experts as usize {
                for (t, top) in chosen.iter().enumerate() {
                    for (rank, &x) in top.iter().enumerate() {
                        if x == e && next < a {
                            d.copies[t][rank].1 = Some(next);
                            d.slot_expert[next] = Some(e);
                            d.slot_rows[next] = 1;
                            next += 1;
                        }
                    }
                }
            }
        }
        d
    }
}

/// A routing's dispatched layout ([`Route::dispatch`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    /// The expert of each slot (None: it received no copy).
    pub slot_expert: Vec<Option<usize>>,
    /// Copies in each slot (its positions `0..slot_rows[s]` are used).
    pub slot_rows: Vec<usize>,
    /// Token t's copies in choice order: (expert, its row of the dispatched buffer, None: dropped).
    pub copies: Vec<Vec<(usize, Option<usize>)>>,
}

impl Dispatch {
    /// Copies dropped over capacity.
    pub fn dropped(&self) -> usize {
        self.copies.iter().flatten().filter(|c| c.1.is_none()).count()
    }
}

/// Which token of each sequence a [`OpKind::TokenSelect`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// BERT's pooler reads the first ([CLS]) token.
    First,
    /// Prefill computes logits for the last prompt token only.
    Last,
}

/// Sizes shared by the row-wise ops: `rows` rows of `width` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub rows: u64,
    pub width: u64,
}

impl Rows {
    fn shape(&self) -> Shape {
        vec![self.rows, self.width]
    }
    fn elems(&self) -> Option<u64> {
        prod(&[self.rows, self.width])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// y[rows, width] = table[ids]; inputs (ids[rows], table[vocab, width]).
    Embedding { rows: u64, vocab: u64, width: u64 },
    /// Scatter-add of dy into the table gradient; inputs (ids, dy) -> dtable.
    EmbeddingGrad { rows: u64, vocab: u64, width: u64 },
    /// Inputs (x, w[, b]) -> y.
    Linear(Linear),
    /// Inputs (dy, w) -> dx.
    LinearDgrad(Linear),
    /// Splits a fused projection's output into q, k and v column blocks (a view: no FLOPs, no bytes);
    /// inputs (x[rows, sum(widths)]) -> three outputs.
    Split { rows: u64, widths: [u64; 3] },
    /// Concatenates the three gradients back; inputs (dq, dk, dv) -> dx.
    SplitGrad { rows: u64, widths: [u64; 3] },
    /// Inputs (x, dy) -> dw[, db].
    LinearWgrad(Linear),
    /// S = Q · K^T per head group; inputs (q, k) -> scores.
    AttnScores(Attn),
    /// dQ = dS · K; inputs (dscores, k) -> dq.
    AttnScoresGradQ(Attn),
    /// dK = dS^T · Q; inputs (dscores, q) -> dk.
    AttnScoresGradK(Attn),
    /// Scale, mask and softmax over keys; inputs (scores) -> probs.
    AttnSoftmax(Attn),
    /// Inputs (probs, dprobs) -> dscores.
    AttnSoftmaxGrad(Attn),
    /// O = P · V per head group; inputs (probs, v) -> out.
    AttnContext(Attn),
    /// dP = dO · V^T; inputs (dout, v) -> dprobs.
    AttnContextGradP(Attn),
    /// dV = P^T · dO; inputs (probs, dout) -> dv.
    AttnContextGradV(Attn),
    /// Inputs (x, gamma[, beta]) -> y.
    Norm { kind: NormKind, rows: Rows },
    /// Inputs (x, gamma, dy) -> dx, dgamma[, dbeta].
    NormGrad { kind: NormKind, rows: Rows },
    /// Inputs (x) -> y.
    Gelu(Rows),
    /// Inputs (x, dy) -> dx.
    GeluGrad(Rows),
    /// Inputs (x) -> y.
    Tanh(Rows),
    /// Inputs (y, dy) -> dx.
    TanhGrad(Rows),
    /// SiLU(gate) * up; inputs (gate, up) -> y.
    SwiGlu(Rows),
    /// Inputs (gate, up, dy) -> dgate, dup.
    SwiGluGrad(Rows),
    /// Elementwise sum of `n` same-shaped inputs (residual adds, gradient accumulation, `elementwise:N`).
    Add { rows: Rows, n: u64 },
    /// Rotary position embedding on the first `rot_dims` of every head; inputs (x) -> y.
    Rotary { rows: u64, heads: u64, head_dim: u64, rot_dims: u64 },
    /// The inverse rotation; inputs (dy) -> dx.
    RotaryGrad { rows: u64, heads: u64, head_dim: u64, rot_dims: u64 },
    /// Streams `len` cached rows per sequence plus the `new` fresh ones to attention;
    /// inputs (cache[batch*len, width], fresh[batch*new, width]) -> all[batch*(len+new), width].
    KvCacheRead { batch: u64, len: u64, new: u64, width: u64 },
    /// Appends `new` rows per sequence to the cache in place; inputs ([cache,] fresh) -> cache'.
    /// With len = 0 (prefill) there is no cache input.
    KvCacheAppend { batch: u64, len: u64, new: u64, width: u64 },
    /// Keeps one token per sequence; inputs (x[batch*seq, width]) -> y[batch, width].
    TokenSelect { batch: u64, seq: u64, width: u64, pick: Pick },
    /// Inputs (dy[batch, width]) -> dx[batch*seq, width] (zeros elsewhere).
    TokenSelectGrad { batch: u64, seq: u64, width: u64, pick: Pick },
    /// Softmax over router logits and top-k selection; inputs (logits[rows, experts]) -> probs (zero off the top k).
    MoeTopK(Route),
    /// Inputs (probs, dprobs) -> dlogits.
    MoeTopKGrad(Route),
    /// Copies each token to its experts' buffers; inputs (x[rows, width], probs) -> xd[experts*capacity, width].
    MoeDispatch(Route),
    /// Sums the dispatched copies' gradients back; inputs (dxd, probs) -> dx.
    MoeDispatchGrad(Route),
    /// Weighted sum of expert outputs; inputs (yd, probs) -> y[rows, width].
    MoeCombine(Route),
    /// Inputs (dy, yd, probs) -> dyd, dprobs.
    MoeCombineGrad(Route),
    /// Mean cross-entropy; inputs (logits[rows, classes], labels[rows]) -> loss[1].
    CrossEntropy { rows: u64, classes: u64 },
    /// Inputs (logits, labels) -> dlogits.
    CrossEntropyGrad { rows: u64, classes: u64 },
    /// Adam step for one weight of `params` elements; inputs (w, g, m, v[, master]) -> w', m', v'[, master'].
    Adam { params: u64, master: bool },
    /// Sum all-reduce over the participants of the machine that runs it; inputs (x[elems]) -> y[elems].
    /// The reduction's additions depend on the participant count, so the graph counts no FLOPs for it.
    AllReduce { elems: u64 },
}

/// Expected input and output shapes of an op: the verifier's contract with the builders.
pub struct Signature {
    pub inputs: Vec<Shape>,
    pub outputs: Vec<Shape>,
}

impl OpKind {
    /// Short kind name used in printers, summaries and JSON keys.
    pub fn name(&self) -> &'static str {
        match self {
            OpKind::Embedding { .. } => "embedding",
            OpKind::EmbeddingGrad { .. } => "embedding_grad",
            OpKind::Linear(_) => "linear",
            OpKind::LinearDgrad(_) => "linear_dgrad",
            OpKind::LinearWgrad(_) => "linear_wgrad",
            OpKind::Split { .. } => "split",
            OpKind::SplitGrad { .. } => "split_grad",
            OpKind::AttnScores(_) => "attn_scores",
            OpKind::AttnScoresGradQ(_) => "attn_scores_dq",
            OpKind::AttnScoresGradK(_) => "attn_scores_dk",
            OpKind::AttnSoftmax(_) => "attn_softmax",
            OpKind::AttnSoftmaxGrad(_) => "attn_softmax_grad",
            OpKind::AttnContext(_) => "attn_context",
            OpKind::AttnContextGradP(_) => "attn_context_dp",
            OpKind::AttnContextGradV(_) => "attn_context_dv",
            OpKind::Norm { kind: NormKind::LayerNorm, .. } => "layernorm",
            OpKind::Norm { kind: NormKind::RmsNorm, .. } => "rmsnorm",
            OpKind::NormGrad { kind: NormKind::LayerNorm, .. } => "layernorm_grad",
            OpKind::NormGrad { kind: NormKind::RmsNorm, .. } => "rmsnorm_grad",
            OpKind::Gelu(_) => "gelu",
            OpKind::GeluGrad(_) => "gelu_grad",
            OpKind::Tanh(_) => "tanh",
            OpKind::TanhGrad(_) => "tanh_grad",
            OpKind::SwiGlu(_) => "swiglu",
            OpKind::SwiGluGrad(_) => "swiglu_grad",
            OpKind::Add { .. } => "add",
            OpKind::Rotary { .. } => "rotary",
            OpKind::RotaryGrad { .. } => "rotary_grad",
            OpKind::KvCacheRead { .. } => "kv_cache_read",
            OpKind::KvCacheAppend { .. } => "kv_cache_append",
            OpKind::TokenSelect { .. } => "token_select",
            OpKind::TokenSelectGrad { .. } => "token_select_grad",
            OpKind::MoeTopK(_) => "moe_topk",
            OpKind::MoeTopKGrad(_) => "moe_topk_grad",
            OpKind::MoeDispatch(_) => "moe_dispatch",
            OpKind::MoeDispatchGrad(_) => "moe_dispatch_grad",
            OpKind::MoeCombine(_) => "moe_combine",
            OpKind::MoeCombineGrad(_) => "moe_combine_grad",
            OpKind::CrossEntropy { .. } => "cross_entropy",
            OpKind::CrossEntropyGrad { .. } => "cross_entropy_grad",
            OpKind::Adam { .. } => "adam",
            OpKind::AllReduce { .. } => "allreduce",
        }
    }

    /// The (batch, M, N, K) of the op's matrix multiplication, if it is one.
    pub fn matmul_bmnk(&self) -> Option<[u64; 4]> {
        match *self {
            OpKind::Linear(l) => Some([l.groups, l.m, l.n, l.k]),
            OpKind::LinearDgrad(l) => Some([l.groups, l.m, l.k, l.n]),
            OpKind::LinearWgrad(l) => Some([l.groups, l.k, l.n, l.m]),
            OpKind::AttnScores(a) => Some(a.scores_bmnk()),
            OpKind::AttnScoresGradQ(a) => {
                let [b, m, n, k] = a.scores_bmnk();
                Some([b, m, k, n])
            }
            OpKind::AttnScoresGradK(a) => {
                let [b, m, n, k] = a.scores_bmnk();
                Some([b, n, k, m])
            }
            OpKind::AttnContext(a) => {
                let [b, m, n, k] = a.scores_bmnk();
                Some([b, m, k, n])
            }
            OpKind::AttnContextGradP(a) => Some(a.scores_bmnk()),
            OpKind::AttnContextGradV(a) => {
                let [b, m, n, k] = a.scores_bmnk();
                Some([b, n, k, m])
            }
            _ => None,
        }
    }

    /// Expected shapes of inputs and outputs.
    pub fn signature(&self) -> Signature {
        let sig = |inputs: Vec<Shape>, outputs: Vec<Shape>| Signature { inputs, outputs };
        match *self {
            OpKind::Embedding { rows, vocab, width } => {
                sig(vec![vec![rows], vec![vocab, width]], vec![vec![rows, width]])
            }
            OpKind::EmbeddingGrad { rows, vocab, width } => {
                sig(vec![vec![rows], vec![rows, width]], vec![vec![vocab, width]])
            }
            OpKind::Linear(l) => {
                let mut ins = vec![l.x_shape(), l.w_shape()];
                if l.bias {
                    ins.push(l.b_shape());
                }
                sig(ins, vec![l.y_shape()])
            }
            OpKind::LinearDgrad(l) => sig(vec![l.y_shape(), l.w_shape()], vec![l.x_shape()]),
            OpKind::LinearWgrad(l) => {
                let mut outs = vec![l.w_shape()];
                if l.bias {
                    outs.push(l.b_shape());
                }
                sig(vec![l.x_shape(), l.y_shape()], outs)
            }
            OpKind::Split { rows, widths } => {
                sig(vec![vec![rows, widths.iter().sum()]], widths.iter().map(|&w| vec![rows, w]).collect())
            }
            OpKind::SplitGrad { rows, widths } => {
                sig(widths.iter().map(|&w| vec![rows, w]).collect(), vec![vec![rows, widths.iter().sum()]])
            }
            OpKind::AttnScores(a) => sig(vec![a.q_shape(), a.kv_shape()], vec![a.scores_shape()]),
            OpKind::AttnScoresGradQ(a) => sig(vec![a.scores_shape(), a.kv_shape()], vec![a.q_shape()]),
            OpKind::AttnScoresGradK(a) => sig(vec![a.scores_shape(), a.q_shape()], vec![a.kv_shape()]),
            OpKind::AttnSoftmax(a) => sig(vec![a.scores_shape()], vec![a.scores_shape()]),
            OpKind::AttnSoftmaxGrad(a) => sig(vec![a.scores_shape(), a.scores_shape()], vec![a.scores_shape()]),
            OpKind::AttnContext(a) => sig(vec![a.scores_shape(), a.kv_shape()], vec![a.q_shape()]),
            OpKind::AttnContextGradP(a) => sig(vec![a.q_shape(), a.kv_shape()], vec![a.scores_shape()]),
            OpKind::AttnContextGradV(a) => sig(vec![a.scores_shape(), a.q_shape()], vec![a.kv_shape()]),
            OpKind::Norm { kind, rows } => {
                let mut ins = vec![rows.shape(), vec![rows.width]];
                if kind.has_bias() {
                    ins.push(vec![rows.width]);
                }
                sig(ins, vec![rows.shape()])
            }
            OpKind::NormGrad { kind, rows } => {
                let mut outs = vec![rows.shape(), vec![rows.width]];
                if kind.has_bias() {
                    outs.push(vec![rows.width]);
                }
                sig(vec![rows.shape(), vec![rows.width], rows.shape()], outs)
            }
            OpKind::Gelu(r) | OpKind::Tanh(r) => sig(vec![r.shape()], vec![r.shape()]),
            OpKind::GeluGrad(r) | OpKind::TanhGrad(r) | OpKind::SwiGlu(r) => {
                sig(vec![r.shape(), r.shape()], vec![r.shape()])
            }
            OpKind::SwiGluGrad(r) => sig(vec![r.shape(); 3], vec![r.shape(), r.shape()]),
            OpKind::Add { rows, n } => sig(vec![rows.shape(); n as usize], vec![rows.shape()]),
            OpKind::Rotary { rows, heads, head_dim, .. } | OpKind::RotaryGrad { rows, heads, head_dim, .. } => {
                sig(vec![vec![rows, heads * head_dim]], vec![vec![rows, heads * head_dim]])
            }
            OpKind::KvCacheRead { batch, len, new, width } => {
                sig(vec![vec![batch * len, width], vec![batch * new, width]], vec![vec![batch * (len + new), width]])
            }
            OpKind::KvCacheAppend { batch, len, new, width } => {
                let mut ins = Vec::new();
                if len > 0 {
                    ins.push(vec![batch * len, width]);
                }
                ins.push(vec![batch * new, width]);
                sig(ins, vec![vec![batch * (len + new), width]])
            }
            OpKind::TokenSelect { batch, seq, width, .. } => {
                sig(vec![vec![batch * seq, width]], vec![vec![batch, width]])
            }
            OpKind::TokenSelectGrad { batch, seq, width, .. } => {
                sig(vec![vec![batch, width]], vec![vec![batch * seq, width]])
            }
            OpKind::MoeTopK(r) => sig(vec![vec![r.rows, r.experts]], vec![vec![r.rows, r.experts]]),
            OpKind::MoeTopKGrad(r) => sig(vec![vec![r.rows, r.experts]; 2], vec![vec![r.rows, r.experts]]),
            OpKind::MoeDispatch(r) => {
                sig(vec![vec![r.rows, r.width], vec![r.rows, r.experts]], vec![r.dispatched_shape()])
            }
            OpKind::MoeDispatchGrad(r) => {
                sig(vec![r.dispatched_shape(), vec![r.rows, r.experts]], vec![vec![r.rows, r.width]])
            }
            OpKind::MoeCombine(r) => {
                sig(vec![r.dispatched_shape(), vec![r.rows, r.experts]], vec![vec![r.rows, r.width]])
            }
            OpKind::MoeCombineGrad(r) => sig(
                vec![vec![r.rows, r.width], r.dispatched_shape(), vec![r.rows, r.experts]],
                vec![r.dispatched_shape(), vec![r.rows, r.experts]],
            ),
            OpKind::CrossEntropy { rows, classes } => sig(vec![vec![rows, classes], vec![rows]], vec![vec![1]]),
            OpKind::CrossEntropyGrad { rows, classes } => {
                sig(vec![vec![rows, classes], vec![rows]], vec![vec![rows, classes]])
            }
            // Adam works on any weight shape; the verifier checks element counts for it instead.
            OpKind::Adam { .. } => sig(vec![], vec![]),
            OpKind::AllReduce { elems } => sig(vec![vec![elems]], vec![vec![elems]]),
        }
    }

    /// (total FLOPs, matmul FLOPs); None when a count overflows u64.
    pub fn flops(&self) -> Option<(u64, u64)> {
        let vector = |r: Rows, per: u64| r.elems().and_then(|e| e.checked_mul(per)).map(|f| (f, 0));
        match *self {
            OpKind::Embedding { .. } | OpKind::KvCacheRead { .. } | OpKind::KvCacheAppend { .. } => Some((0, 0)),
            OpKind::TokenSelect { .. } | OpKind::TokenSelectGrad { .. } | OpKind::AllReduce { .. } => Some((0, 0)),
            OpKind::MoeDispatch(_) | OpKind::Split { .. } | OpKind::SplitGrad { .. } => Some((0, 0)),
            // Scatter-add: one add per gradient element.
            OpKind::EmbeddingGrad { rows, width, .. } => prod(&[rows, width]).map(|f| (f, 0)),
            OpKind::Linear(l) | OpKind::LinearWgrad(l) => {
                let mm = l.matmul_flops()?;
                Some((mm.checked_add(l.bias_flops()?)?, mm))
            }
            OpKind::LinearDgrad(l) => {
                let mm = l.matmul_flops()?;
                Some((mm, mm))
            }
            OpKind::AttnScores(a)
            | OpKind::AttnScoresGradQ(a)
            | OpKind::AttnScoresGradK(a)
            | OpKind::AttnContext(a)
            | OpKind::AttnContextGradP(a)
            | OpKind::AttnContextGradV(a) => {
                let mm = a.matmul_flops()?;
                Some((mm, mm))
            }
            OpKind::AttnSoftmax(a) => a.scores_elems()?.checked_mul(fpe::SOFTMAX).map(|f| (f, 0)),
            OpKind::AttnSoftmaxGrad(a) => a.scores_elems()?.checked_mul(fpe::SOFTMAX_GRAD).map(|f| (f, 0)),
            OpKind::Norm { kind: NormKind::LayerNorm, rows } => vector(rows, fpe::LAYERNORM),
            OpKind::Norm { kind: NormKind::RmsNorm, rows } => vector(rows, fpe::RMSNORM),
            OpKind::NormGrad { kind: NormKind::LayerNorm, rows } => vector(rows, fpe::LAYERNORM_GRAD),
            OpKind::NormGrad { kind: NormKind::RmsNorm, rows } => vector(rows, fpe::RMSNORM_GRAD),
            OpKind::Gelu(r) => vector(r, fpe::GELU),
            OpKind::GeluGrad(r) => vector(r, fpe::GELU_GRAD),
            OpKind::Tanh(r) => vector(r, fpe::TANH),
            OpKind::TanhGrad(r) => vector(r, fpe::TANH_GRAD),
            OpKind::SwiGlu(r) => vector(r, fpe::SWIGLU),
            OpKind::SwiGluGrad(r) => vector(r, fpe::SWIGLU_GRAD),
            OpKind::Add { rows, n } => vector(rows, n - 1),
            OpKind::Rotary { rows, heads, rot_dims, .. } | OpKind::RotaryGrad { rows, heads, rot_dims, .. } => {
                prod(&[rows, heads, rot_dims, fpe::ROTARY]).map(|f| (f, 0))
            }
            // Softmax over the experts (as attention's), then k passes of a max over them.
            OpKind::MoeTopK(r) => prod(&[r.rows, r.experts, fpe::SOFTMAX + r.top_k]).map(|f| (f, 0)),
            OpKind::MoeTopKGrad(r) => prod(&[r.rows, r.experts, fpe::SOFTMAX_GRAD]).map(|f| (f, 0)),
            // Sum the top_k copies of each gradient element.
            OpKind::MoeDispatchGrad(r) => prod(&[r.rows, r.width, r.top_k - 1]).map(|f| (f, 0)),
            // A multiply-add per copy and element.
            OpKind::MoeCombine(r) => prod(&[2, r.rows, r.width, r.top_k]).map(|f| (f, 0)),
            // dyd = p * dy (one multiply) and dp = <dy, yd> (a multiply-add) per copy and element.
            OpKind::MoeCombineGrad(r) => prod(&[3, r.rows, r.width, r.top_k]).map(|f| (f, 0)),
            OpKind::CrossEntropy { rows, classes } => prod(&[rows, classes, fpe::CROSS_ENTROPY]).map(|f| (f, 0)),
            OpKind::CrossEntropyGrad { rows, classes } => {
                prod(&[rows, classes, fpe::CROSS_ENTROPY_GRAD]).map(|f| (f, 0))
            }
            OpKind::Adam { params, .. } => params.checked_mul(fpe::ADAM).map(|f| (f, 0)),
        }
    }

    /// Bytes read, when the op does not read every byte of its inputs (None: read all inputs).
    /// `input_bytes` are the inputs' sizes in order.
    pub fn bytes_read_override(&self, input_bytes: &[u64], row_bytes: u64) -> Option<u64> {
        match *self {
            // A lookup reads the ids and one table row per id.
            OpKind::Embedding { rows, .. } => sum(&[input_bytes[0], rows.checked_mul(row_bytes)?]),
            // Lightly loaded experts: only the active experts' weights are read.
            OpKind::Linear(l) | OpKind::LinearDgrad(l) if l.groups < l.weight_groups => {
                let w = input_bytes[1] / l.weight_groups * l.groups;
                sum(&[input_bytes[0], w, input_bytes.get(2).map_or(0, |b| b / l.weight_groups * l.groups)])
            }
            // A split is a view of its input's column blocks.
            OpKind::Split { .. } | OpKind::SplitGrad { .. } => Some(0),
            // An append reads only the fresh rows; the cache is updated in place.
            OpKind::KvCacheAppend { .. } => input_bytes.last().copied(),
            _ => None,
        }
    }

    /// Bytes written, when the op does not write all of its outputs (None: write all outputs).
    pub fn bytes_written_override(&self, output_bytes: &[u64], row_bytes: u64) -> Option<u64> {
        match *self {
            OpKind::Split { .. } | OpKind::SplitGrad { .. } => Some(0),
            // Writes only the appended rows of the cache.
            OpKind::KvCacheAppend { batch, new, .. } => batch.checked_mul(new)?.checked_mul(row_bytes),
            // Only the active experts' weight gradients are written.
            OpKind::LinearWgrad(l) if l.groups < l.weight_groups => {
                Some(output_bytes.iter().map(|b| b / l.weight_groups * l.groups).sum())
            }
            // Scatter-add writes (and accumulates into) one row per id.
            OpKind::EmbeddingGrad { rows, .. } => rows.checked_mul(row_bytes).map(|b| b.min(output_bytes[0])),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With every expert active each slot is its expert's and holds `capacity` copies, first choices
    /// before second ones, capacity-major; the rest drop. With fewer active slots than experts every
    /// copy gets its own slot, in expert order.
    #[test]
    fn dispatch_fills_slots_to_capacity_and_drops_the_rest() {
        // 4 tokens, 2 experts, top 2: capacity 4, nothing can drop.
        let r = Route { rows: 4, width: 8, experts: 2, top_k: 2, capacity_pct: 100 };
        assert_eq!((r.active(), r.capacity()), (2, 4));
        let d = r.dispatch(&vec![vec![0, 1]; 4]);
        assert_eq!(d.dropped(), 0);
        assert_eq!(d.copies[1], vec![(0, Some(2)), (1, Some(3))]);
        // 4 tokens, 4 experts, top 1: capacity 1; tokens 0 and 2 pick expert 3, token 2 drops.
        let r = Route { rows: 4, width: 8, experts: 4, top_k: 1, capacity_pct: 100 };
        let d = r.dispatch(&[vec![3], vec![1], vec![3], vec![0]]);
        assert_eq!(d.slot_expert, vec![Some(0), Some(1), None, Some(3)]);
        assert_eq!(d.copies[2], vec![(3, None)]);
        assert_eq!(d.dropped(), 1);
        // First choices fill before second choices: token 1's first choice takes expert 0's last row.
        let r = Route { rows: 2, width: 8, experts: 2, top_k: 2, capacity_pct: 50 };
        assert_eq!(r.capacity(), 1);
        let d = r.dispatch(&[vec![1, 0], vec![0, 1]]);
        assert_eq!(d.copies, vec![vec![(1, Some(1)), (0, None)], vec![(0, Some(0)), (1, None)]]);
        // Decode: 1 token, 4 experts, top 2: two slots of one row, in expert order.
        let r = Route { rows: 1, width: 8, experts: 4, top_k: 2, capacity_pct: 100 };
        let d = r.dispatch(&[vec![3, 1]]);
        assert_eq!(d.slot_expert, vec![Some(1), Some(3)]);
        assert_eq!(d.copies[0], vec![(3, Some(1)), (1, Some(0))]);
    }
}
