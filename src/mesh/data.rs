//! The data side table of a mesh program: what each task does to *values*, for functional runs.
//!
//! The timing program (`MeshProgram`) says when tasks run and how many wavelets move; this table says
//! which slice of which graph tensor a PE holds, what a task computes from the trains it claimed and
//! its PE's SRAM, and what its sends carry. It is cold data: the engine reads it only in functional
//! runs, and it never changes the timing program or its printer.
//!
//! Slices are formulas of the PE's position (a `Grid` and the same `split` rule the tiling uses),
//! never per-PE lists, so the table stays as compact as the program.
//!
//! Architecture invariant: tensors are named by their graph `TensorId` as a plain `u32` (the engine
//! never sees the graph); everything a kernel needs (sizes, layouts) is written here by the compiler.

use std::collections::{BTreeMap, BTreeSet};

use super::{Coord, Rect};

/// `n` split over `parts`: part i gets `q + 1` for `i < r`, else `q` (the tiling's `split`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub n: u64,
    pub parts: u64,
}

impl Share {
    /// (offset, length) of part `i`.
    pub fn range(&self, i: u64) -> (u64, u64) {
        let parts = self.parts.max(1);
        let (q, r) = (self.n / parts, self.n % parts);
        (i * q + i.min(r), q + (i < r) as u64)
    }
}

/// PEs numbered by their row and column within a rectangle whose top-left PE is `origin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub origin: Coord,
    pub rows: u32,
    pub cols: u32,
}

impl Grid {
    /// (row, column) of the PE at `at`, if it is in the grid.
    pub fn pos(&self, at: Coord) -> Option<(u64, u64)> {
        let inside = at.x >= self.origin.x
            && at.y >= self.origin.y
            && at.x < self.origin.x + self.cols
            && at.y < self.origin.y + self.rows;
        inside.then(|| ((at.y - self.origin.y) as u64, (at.x - self.origin.x) as u64))
    }
}

/// A graph tensor as a slice of the tensor that really moves: columns `c0 .. c0 + width` of every row
/// of `base`, whose rows are `cols` long (a view's slice of its producer's output, or the tensor itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub base: u32,
    pub cols: u64,
    pub c0: u64,
    pub width: u64,
}

/// Elementwise operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EwOp {
    /// The sum of the inputs.
    Add,
    /// GELU of the one input (the numerics say which variant).
    Gelu,
    /// tanh of the one input.
    Tanh,
    /// GELU's derivative at the first input times the second (x, dy), as the reference computes it.
    GeluGrad,
    /// One token of every sequence of `seq` (the first, or the last): output row b is input row
    /// `b * seq + pick`.
    Select { seq: u64, last: bool },
    /// tanh's derivative from the output and dy: `(1 - y^2) * dy`.
    TanhGrad,
    /// The gradient of `Select`: output row r is input row `r / seq` where `r % seq` is the picked
    /// token, else zero.
    SelectGrad { seq: u64, last: bool },
    /// SwiGLU of (gate, up): `g * sigmoid(g) * u`.
    SwiGlu,
    /// SwiGLU's gradient from (gate, up, dy): two outputs, `d_gate = dy * u * s * (1 + g * (1 - s))`
    /// (`Kernel::Elementwise::out`) and `d_up = dy * g * s` (`out2`), with `s = sigmoid(g)`.
    SwiGluGrad,
    /// The input as it is (rows looked up in MemoryX, relayed on).
    Copy,
    /// Rotary embedding of the first `rot_dims` dimensions of each of the `heads` heads of
    /// `head_dim`; row r is at position `pos0 + r % seq` (the numerics give frequencies and layout).
    /// `inverse`: the rotation back (the sine negated), which is rotary's gradient.
    Rotary { heads: u64, head_dim: u64, rot_dims: u64, pos0: u64, seq: u64, inverse: bool },
}

/// What a row reduction computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOp {
    /// LayerNorm (`beta`: with a bias) or RMSNorm (`rms`) with the per-column scale `gamma`.
    Norm { gamma: u32, beta: Option<u32>, rms: bool },
    /// Attention softmax over `kv` keys, scaled by `1 / sqrt(head_dim)`, causal over `q` queries.
    Softmax { q: u64, kv: u64, head_dim: u64, causal: bool },
    /// Cross-entropy of logit rows against `labels` (one id per row, -100: ignored): statistics (max,
    /// sum of exp, the label's logit); the apply pass (`grad`) gives `(softmax - onehot) / valid`, with
    /// `valid` the step's labels not ignored (a count the host gives with its labels), else the root of
    /// each row adds the row's `logsumexp - logit[label]` to the loss it keeps (`Kernel::LossSum`).
    CrossEntropy { labels: View, grad: bool },
    /// A norm's backward (LayerNorm, or RMSNorm with `rms`) over rows of dy (the reduction's main
    /// input) with the forward's input `x` and scale `gamma`: statistics (mean and M2 of x, or its mean
    /// square; the sums of `g = dy * gamma` and of `g * x`); the apply pass gives dx and adds the rows'
    /// `dy * xhat` (and `dy`) into the PE's column sums of `dgamma` (and `dbeta`, `Kernel::ColSum`).
    NormGrad { x: View, gamma: u32, rms: bool, dgamma: u32, dbeta: Option<u32> },
    /// The attention softmax's backward over rows of dP (the reduction's main input) with the forward's
    /// probabilities `p`: statistics (the partial sums of `p * dP`); the apply pass gives
    /// `dS = p * (dP - sum) / sqrt(head_dim)` (masked keys have `p = 0`, so their dS is 0).
    SoftmaxGrad { p: View, head_dim: u64 },
    /// A MoE router's top-k over the experts' logits: statistics (the row's `k` largest logits with
    /// their columns, the highest first, ties to the lower column); the apply pass gives the chosen
    /// experts' probabilities renormalised over the k (a softmax over the chosen logits), zero elsewhere.
    MoeTopK { k: u64 },
}

/// A MoE layer's routing sizes for the values kernels (the graph's `Route`): `rows` tokens of
/// `width`, each to `top_k` of `experts`, dispatched into `active` slots of `capacity` rows.
pub type MoeRoute = crate::graph::Route;

/// A grouped (expert) linear's view of its operands: `[capacity, slots * k]` in, `[capacity, slots *
/// n]` out (the dispatched buffer is capacity-major, `Route::dispatch`); the columns of slot s are
/// computed with the weights of the expert the routing gave it (the slot map that travels with the
/// dispatched rows), zero for a slot that received no token. `experts`: the weight's expert count
/// (`slots` when every expert is active and slot e is expert e; more when the step has fewer tokens
/// than experts / top_k and each copy takes its own slot, `Route::dispatch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grouped {
    pub slots: u64,
    pub experts: u64,
}

/// The values kernel of a task. Every kernel runs when the engine starts the task, on the payloads of
/// the trains the task claimed (in need order), the values its PE stored earlier and its SRAM; each of
/// the task's sends carries what the kernel says. `rows_per_run`: the task's run n works on rows
/// `(n - 1) * rows_per_run ..` of its tensors (token chunks).
#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// A partial matrix-vector product: the PE at grid position (r, c) holds the k-slice
    /// `Share { n: k, parts: grid.rows }` r of the vector `x` and the block (k-slice r, n-slice c) of
    /// the `k x n` matrix `w` (`w_out_in`: stored `[n, k]`, as `nn.Linear`) in its SRAM, and computes
    /// the partial sums of its n-slice into its accumulator (summing over k in increasing order). Its
    /// sends carry the accumulator.
    GemvPartial { grid: Grid, x: u32, w: u32, w_out_in: bool, k: u64, n: u64, out: u32 },
    /// `out = sum of inputs` over the PE's flat share (`Share { n, grid.rows * grid.cols }` at index
    /// `r * grid.cols + c`) of pre-placed operands; the result stays in its accumulator.
    LocalAdd { grid: Grid, inputs: Vec<u32>, n: u64, out: u32 },
    /// Adds the partial sums claimed to the accumulator (in the order of their senders), which must
    /// hold the same slice of the same tensor; with `total`, the sum must then have all its terms and
    /// becomes a finished value. The sends carry the accumulator.
    Accumulate { total: Option<u64> },
    /// Sends on every send what it claimed (gateways, gathers, relays).
    Relay,
    /// An output gateway: send i carries the part of what it claimed that `views[i]` covers (None:
    /// everything).
    Route { views: Vec<Option<View>> },
    /// Keeps what it claimed for later tasks of its PE (an operand stored ahead of its use).
    Store,
    /// A port feeding the wafer: the host's rows of `view` for this run.
    Source { view: View, rows_per_run: u64 },
    /// A port leaving the wafer: keeps what it claimed (the step's results).
    Collect,
    /// A port feeding the wafer embedding rows MemoryX looked up (weight streaming): rows of `out`
    /// (`width` wide) for this run's ids of `ids`, from the table `table`.
    Gather { ids: View, table: u32, width: u64, rows_per_run: u64, out: u32 },
    /// Keeps the weights streamed in (whole tensors, one per layer) for the PE's later tasks: the
    /// tensors of `ProgramData::streamed` are read from these, never from a resident image.
    Load,
    /// `out[rows, n-slice] = a[rows, :] x w[:, n-slice]` (plus nothing: a `Bias` task adds the bias):
    /// the PE's n-slice is `Share { n, parts: grid.rows * grid.cols }` at index `r * grid.cols + c`.
    /// `grouped`: an expert linear (`k` and `n` are then per slot; the weight is every expert's).
    Linear {
        grid: Grid,
        a: View,
        w: u32,
        w_out_in: bool,
        k: u64,
        n: u64,
        rows_per_run: u64,
        out: u32,
        grouped: Option<Grouped>,
    },
    /// Adds the bias `b` to the accumulator's columns.
    Bias { b: u32 },
    /// A gemv-tree compute row: the PE at (r, c) multiplies this run's rows of `a`'s k-slice
    /// `Share { k, tree.compute_rows() }` at `tree.compute_index(r)` by the block of `w` (n-slice
    /// `Share { n, grid.cols }` c) into a partial sum, which it sends.
    TreePartial {
        grid: Grid,
        tree: TreeRows,
        a: View,
        w: u32,
        w_out_in: bool,
        k: u64,
        n: u64,
        rows_per_run: u64,
        out: u32,
        grouped: Option<Grouped>,
    },
    /// A reducer: the sum of the partial sums claimed (in sender order); with `total`, it must have all
    /// its terms and becomes a finished value (plus the bias `bias`). The sends carry it.
    Reduce { total: Option<u64>, bias: Option<u32> },
    /// Attention scores of the query rows against the PE's keys: the PE's columns
    /// `Share { batch * heads * kv, parts }` at index `r * grid.cols + c`, each a (sequence, head, key);
    /// keys before `len` come from the resident cache `cache` (`[batch, len, kv_heads * head_dim]`),
    /// the others from the fresh rows `fresh`. With `append` (the graph's updated cache,
    /// `[batch * kv, kv_heads * head_dim]`: the resident rows and the fresh ones after them), the PE
    /// keeps its keys as its rows of that tensor, each key row of a KV head kept once: by the PE whose
    /// column has the group's first query head (a read-back of the cache the step leaves).
    AttnScores { grid: Grid, q: View, cache: u32, fresh: View, attn: AttnShape, out: u32, append: Option<u32> },
    /// Attention context of the query rows: the PE's columns are (sequence, head, dim) of the output;
    /// values before `len` from `cache`, the others from `fresh`. With `append`, the PE keeps the value
    /// columns it read (every key's) as its part of the updated cache, once per KV head as above.
    AttnContext { grid: Grid, p: View, cache: u32, fresh: View, attn: AttnShape, out: u32, append: Option<u32> },
    /// An elementwise op over the PE's flat share (`Share { n: rows_per_run * width, parts }` at index
    /// `r * grid.cols + c`) of this run's rows of the output (`width` wide). An op with two outputs
    /// (`EwOp::SwiGluGrad`) gives the second as `out2` (the same share of it): the task's first send
    /// carries `out`, its second `out2`.
    Elementwise { grid: Grid, op: EwOp, inputs: Vec<View>, rows_per_run: u64, width: u64, out: u32, out2: Option<u32> },
    /// A MoE dispatch over all the step's rows (one run): the PE's flat share (as `Elementwise`) of the
    /// dispatched buffer `out` (`[active * capacity, width]`, `Route::dispatch`'s layout) from the token
    /// rows `x` and the routing the probabilities `probs` (`[rows, experts]`, zero off the top k) give;
    /// its sends also carry the slot map (each slot's expert), which rides on with the dispatched rows.
    MoeDispatch { grid: Grid, x: View, probs: View, route: MoeRoute, out: u32 },
    /// A MoE combine over all the step's rows (one run): the PE's flat share of `out` (`[rows,
    /// width]`): each token's dispatched copies in `yd` weighted by their probabilities, summed in
    /// choice order (a copy dropped over capacity adds nothing).
    MoeCombine { grid: Grid, yd: View, probs: View, route: MoeRoute, out: u32 },
    /// The combine's gradient over all the step's rows (one run): the PE's flat share of `out`
    /// (dyd, `[active * capacity, width]`: each dispatched copy's `p * dy`, zero on padding rows) and
    /// of `dprobs` (`[rows, experts]`: `<dy, yd>` of each dispatched copy, zero elsewhere); its first
    /// send carries dyd with the slot map, its second dprobs (a PE with no share of one has no send
    /// for it).
    MoeCombineGrad { grid: Grid, dy: View, yd: View, probs: View, route: MoeRoute, out: u32, dprobs: u32 },
    /// The dispatch's gradient over all the step's rows (one run): the PE's flat share of `out` (`[rows,
    /// width]`): each token's dispatched copies' gradients in `dxd`, summed in choice order.
    MoeDispatchGrad { grid: Grid, dxd: View, probs: View, route: MoeRoute, out: u32 },
    /// A row reduction's first pass: the PE's rows (`Share { rows_per_run, grid.rows }` r) and columns
    /// (`Share { width, grid.cols }` c) of `x` give partial statistics, kept and sent.
    RowStats { grid: Grid, op: RowOp, x: View, rows_per_run: u64, width: u64 },
    /// Combines the statistics claimed with the PE's own (in sender order); sends the combined. Once they
    /// cover the row's `width` columns (a root), a cross-entropy's root adds its rows' losses.
    RowCombine { op: RowOp, width: u64 },
    /// The elementwise pass with the row's final statistics (claimed, or the PE's own at the root).
    RowApply { grid: Grid, op: RowOp, x: View, rows_per_run: u64, width: u64, out: u32 },
    /// The loss of a cross-entropy row reduction, once per step, on the roots of the rows (column 0 of
    /// `grid`): a root's loss over its rows (kept by its combines, `RowOp::CrossEntropy`) plus those
    /// claimed from the roots below (in sender order); the root in grid row 0 must then have every one
    /// of the step's `total` rows, and divides by the count of labels not ignored (`labels`' values,
    /// which the host gives): the scalar `out`.
    LossSum { grid: Grid, total: u64, labels: u32, out: u32 },
    /// A linear's weight gradient, output-stationary (summa): the PE at (r, c) accumulates, over the
    /// step's runs, its block `dW[k-slice r, n-slice c] += x[rows, k-slice]^T dy[rows, n-slice]` (rows in
    /// increasing order; `Share { k, grid.rows }` and `Share { n, grid.cols }`; the block laid out as `out`
    /// is, `[n, k]` when `w_out_in`), and the PEs of grid row 0 the bias gradient `db[n-slice] += dy`.
    WgradAcc {
        grid: Grid,
        x: View,
        dy: View,
        k: u64,
        n: u64,
        rows_per_run: u64,
        w_out_in: bool,
        out: u32,
        bias: Option<u32>,
        /// An expert linear's: `x` and `dy` are read as `[capacity, slots * k]` and `[capacity, slots *
        /// n]`, `k` and `n` are per slot. With every expert active (slot e is expert e) the block's
        /// columns of slot e are expert e's gradient (`out` is `[experts, ...]`); with fewer slots than
        /// experts two slots may hold one expert, so the blocks are per slot (`out` laid out with slots
        /// for experts, a pseudo-tensor of the values engine) and go out with the slot map for the
        /// output gateway's sum (`ExpertSum`).
        grouped: Option<Grouped>,
    },
    /// Sends the weight-gradient block (send 0) and the bias gradient (send 1) a `WgradAcc` finished
    /// (or the block an `AttnKvGrad` or `EmbedGradAcc` finished).
    WgradEmit,
    /// dK (from dS and Q) or dV (from P and dO), output-stationary (summa over the query rows): the PE at
    /// (r, c) computes its block of the gradient per query head, keys `Share { attn.kv, grid.rows }` r
    /// by columns `Share { batch * heads * head_dim, grid.cols }` c (each a (sequence, head, dim)):
    /// `G[j, (b, h, d)] = sum over queries i of p[b, h, i, j] x[b * q + i, h * head_dim + d]`, a block
    /// of the per-head gradient (not yet summed over the query heads of a KV head: `HeadSum` does that).
    AttnKvGrad { grid: Grid, p: View, x: View, attn: AttnShape, out: u32 },
    /// The output gateway of an `AttnKvGrad` region: the per-head gradient it claimed (all of it) summed
    /// over the query heads of each KV head (in head order) into `out` (`[batch * kv, kv_heads *
    /// head_dim]`); send i carries the part `views[i]` covers (as `Route`).
    HeadSum { attn: AttnShape, out: u32, views: Vec<Option<View>> },
    /// The output gateway of an expert linear's weight gradient with fewer slots than experts
    /// (`WgradAcc` with `Grouped::slots < experts`, whose PEs accumulate per-slot blocks and send them
    /// with the slot map): the per-slot gradient it claimed (all of it) summed into each slot's expert,
    /// slots in increasing order (the reference's row order), zero for an expert no slot holds, into
    /// `out` (`[experts, k, n]`, or `[experts, n, k]` with `w_out_in`); send i carries the part
    /// `views[i]` covers (as `Route`).
    ExpertSum { slots: u64, experts: u64, k: u64, n: u64, w_out_in: bool, out: u32, views: Vec<Option<View>> },
    /// An embedding table's gradient (the scatter-add of dy rows by id), accumulated over the step's
    /// runs: the PE at (r, c) keeps its flat share (`Share { vocab * width, parts }` at index
    /// `r * grid.cols + c`) of the `[vocab, width]` gradient `out`, and adds to it every row of this
    /// run's `dy` whose id (`ids`) falls in it, rows in increasing order; `WgradEmit` sends it.
    EmbedGradAcc { grid: Grid, ids: View, dy: View, vocab: u64, width: u64, rows_per_run: u64, out: u32 },
    /// One Adam step over the PE's flat share (as `Elementwise`) of each run's rows of the weight `w`
    /// (`rows` of `width`): the gradient `g` claimed (kept until the PE's last run, when all of it has
    /// arrived: it streams in its producers' order), the weight and the moments `m`, `v` (and the fp32
    /// master copy) resident; the hyperparameters are the run's (`Setup::adam`). The PE keeps its
    /// shares of the outputs `w'`, `m'`, `v'` (and `master'`) for the readouts, and sends `w'`.
    Adam {
        grid: Grid,
        w: u32,
        g: View,
        m: u32,
        v: u32,
        master: Option<u32>,
        rows: u64,
        rows_per_run: u64,
        width: u64,
        outs: Vec<u32>,
        /// Keep its share of the gradient too (a readout: the gradient is a whole tensor laid out as the
        /// weight).
        keep_grad: bool,
    },
    /// Column sums of a row reduction (a norm's dgamma and dbeta, `RowOp::NormGrad`), once per step:
    /// the PE's sums over its rows plus those claimed from the PEs below in its column (in sender
    /// order); in grid row 0 they must then cover all `total` rows, and are sent as finished values.
    ColSum { grid: Grid, total: u64 },
    /// The lookup tree's first step: the PE at (r, c) holds table rows `Share { vocab, grid.rows }` r,
    /// columns `Share { width, grid.cols }` c; for every id of this run it gives its row's slice, or
    /// zeros when another PE holds the row (a partial sum with one term per table share).
    Lookup { grid: Grid, ids: View, table: u32, vocab: u64, width: u64, rows_per_run: u64, out: u32 },
}

/// The gemv-tree's rows (`compile::kernel::Tree`, restated: the two must agree): `rc` rows, groups of
/// `g` rows reduce into their last row (a leader), leaders and ungrouped rows into the root (the last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeRows {
    pub rc: u64,
    pub g: u64,
}

impl TreeRows {
    fn group(&self, r: u64) -> (u64, u64) {
        let start = (r / self.g.max(1)) * self.g.max(1);
        (start, (start + self.g.max(1)).min(self.rc - 1))
    }
    /// 0 compute, 1 leader, 2 root.
    pub fn role(&self, r: u64) -> u64 {
        if r + 1 == self.rc {
            return 2;
        }
        let (a, b) = self.group(r);
        if self.g > 1 && r + 1 == b && b - a >= 2 {
            1
        } else {
            0
        }
    }
    pub fn compute_index(&self, r: u64) -> u64 {
        (0..r).filter(|&x| self.role(x) == 0).count() as u64
    }
    pub fn compute_rows(&self) -> u64 {
        (0..self.rc).filter(|&x| self.role(x) == 0).count() as u64
    }
}

/// The attention sizes a kernel needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub kv: u64,
    pub head_dim: u64,
    /// Query rows per sequence.
    pub q_len: u64,
    /// Keys in the resident cache (the rest are fresh).
    pub len: u64,
}

impl Kernel {
    /// The kernel of the same PEs moved `dx` columns east (wafers laid side by side).
    pub fn shifted(&self, dx: u32) -> Kernel {
        let mut k = self.clone();
        match &mut k {
            Kernel::GemvPartial { grid, .. }
            | Kernel::LocalAdd { grid, .. }
            | Kernel::Linear { grid, .. }
            | Kernel::TreePartial { grid, .. }
            | Kernel::AttnScores { grid, .. }
            | Kernel::AttnContext { grid, .. }
            | Kernel::Elementwise { grid, .. }
            | Kernel::MoeDispatch { grid, .. }
            | Kernel::MoeCombine { grid, .. }
            | Kernel::MoeCombineGrad { grid, .. }
            | Kernel::MoeDispatchGrad { grid, .. }
            | Kernel::RowStats { grid, .. }
            | Kernel::RowApply { grid, .. }
            | Kernel::LossSum { grid, .. }
            | Kernel::ColSum { grid, .. }
            | Kernel::WgradAcc { grid, .. }
            | Kernel::AttnKvGrad { grid, .. }
            | Kernel::EmbedGradAcc { grid, .. }
            | Kernel::Adam { grid, .. }
            | Kernel::Lookup { grid, .. } => grid.origin.x += dx,
            Kernel::Accumulate { .. }
            | Kernel::Relay
            | Kernel::Route { .. }
            | Kernel::Store
            | Kernel::Source { .. }
            | Kernel::Collect
            | Kernel::Gather { .. }
            | Kernel::Load
            | Kernel::Bias { .. }
            | Kernel::Reduce { .. }
            | Kernel::WgradEmit
            | Kernel::HeadSum { .. }
            | Kernel::ExpertSum { .. }
            | Kernel::RowCombine { .. } => {}
        }
        k
    }
}

impl Kernel {
    /// The same kernel on other tensors (`f` maps every graph tensor id it names): a folded loop's
    /// kernel, written for the first layer's tensors, in another layer.
    pub fn map_tensors(&self, f: impl Fn(u32) -> u32) -> Kernel {
        let v = |x: &View| View { base: f(x.base), ..*x };
        let mut k = self.clone();
        match &mut k {
            Kernel::GemvPartial { x, w, out, .. } => (*x, *w, *out) = (f(*x), f(*w), f(*out)),
            Kernel::LocalAdd { inputs, out, .. } => {
                inputs.iter_mut().for_each(|t| *t = f(*t));
                *out = f(*out);
            }
            Kernel::Route { views } => views.iter_mut().flatten().for_each(|x| *x = v(x)),
            Kernel::Source { view, .. } => *view = v(view),
            Kernel::Gather { ids, table, out, .. } => (*ids, *table, *out) = (v(ids), f(*table), f(*out)),
            Kernel::Linear { a, w, out, .. } | Kernel::TreePartial { a, w, out, .. } => {
                (*a, *w, *out) = (v(a), f(*w), f(*out))
            }
            Kernel::Bias { b } => *b = f(*b),
            Kernel::Reduce { bias, .. } => *bias = bias.map(&f),
            Kernel::AttnScores { q: x, cache, fresh, out, append, .. }
            | Kernel::AttnContext { p: x, cache, fresh, out, append, .. } => {
                (*x, *fresh, *out, *append) = (v(x), v(fresh), f(*out), append.map(&f));
                if *cache != u32::MAX {
                    *cache = f(*cache);
                }
            }
            Kernel::Elementwise { inputs, out, out2, .. } => {
                inputs.iter_mut().for_each(|x| *x = v(x));
                (*out, *out2) = (f(*out), out2.map(&f));
            }
            Kernel::AttnKvGrad { p, x, out, .. } => (*p, *x, *out) = (v(p), v(x), f(*out)),
            Kernel::MoeDispatch { x, probs, out, .. }
            | Kernel::MoeCombine { yd: x, probs, out, .. }
            | Kernel::MoeDispatchGrad { dxd: x, probs, out, .. } => (*x, *probs, *out) = (v(x), v(probs), f(*out)),
            Kernel::MoeCombineGrad { dy, yd, probs, out, dprobs, .. } => {
                (*dy, *yd, *probs, *out, *dprobs) = (v(dy), v(yd), v(probs), f(*out), f(*dprobs))
            }
            Kernel::HeadSum { out, views, .. } | Kernel::ExpertSum { out, views, .. } => {
                *out = f(*out);
                views.iter_mut().flatten().for_each(|x| *x = v(x));
            }
            Kernel::EmbedGradAcc { ids, dy, out, .. } => (*ids, *dy, *out) = (v(ids), v(dy), f(*out)),
            Kernel::RowStats { op, x, .. } => {
                *op = op.map_tensors(&f);
                *x = v(x);
            }
            Kernel::RowCombine { op, .. } => *op = op.map_tensors(&f),
            Kernel::RowApply { op, x, out, .. } => {
                *op = op.map_tensors(&f);
                (*x, *out) = (v(x), f(*out));
            }
            Kernel::Lookup { ids, table, out, .. } => (*ids, *table, *out) = (v(ids), f(*table), f(*out)),
            Kernel::LossSum { labels, out, .. } => (*labels, *out) = (f(*labels), f(*out)),
            Kernel::ColSum { .. } | Kernel::WgradEmit => {}
            Kernel::Adam { w, g, m, v: vv, master, outs, .. } => {
                (*w, *g, *m, *vv, *master) = (f(*w), v(g), f(*m), f(*vv), master.map(&f));
                outs.iter_mut().for_each(|t| *t = f(*t));
            }
            Kernel::WgradAcc { x, dy, out, bias, .. } => {
                (*x, *dy, *out, *bias) = (v(x), v(dy), f(*out), bias.map(&f));
            }
            Kernel::Accumulate { .. } | Kernel::Relay | Kernel::Store | Kernel::Collect | Kernel::Load => {}
        }
        k
    }
}

impl RowOp {
    fn map_tensors(&self, f: impl Fn(u32) -> u32) -> RowOp {
        match *self {
            RowOp::Norm { gamma, beta, rms } => RowOp::Norm { gamma: f(gamma), beta: beta.map(&f), rms },
            op @ RowOp::Softmax { .. } => op,
            RowOp::NormGrad { x, gamma, rms, dgamma, dbeta } => RowOp::NormGrad {
                x: View { base: f(x.base), ..x },
                gamma: f(gamma),
                rms,
                dgamma: f(dgamma),
                dbeta: dbeta.map(&f),
            },
            RowOp::CrossEntropy { labels, grad } => {
                RowOp::CrossEntropy { labels: View { base: f(labels.base), ..labels }, grad }
            }
            RowOp::SoftmaxGrad { p, head_dim } => RowOp::SoftmaxGrad { p: View { base: f(p.base), ..p }, head_dim },
            op @ RowOp::MoeTopK { .. } => op,
        }
    }
}

/// A folded layer loop (weight streaming): its kernels are written for the first layer's graph
/// tensors, and iteration l runs them on layer l's (`maps[l]`: first layer's id -> layer l's; an id
/// not in it is the same in every layer).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoopMap {
    pub maps: Vec<BTreeMap<u32, u32>>,
}

/// What a task does to values.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskData {
    /// Moves no values (a task whose wavelets nobody reads).
    None,
    /// A task of a region functional mode refuses (`ProgramData::unsupported` says why): a functional
    /// run refuses the program, except a partial run (`Setup::partial`), where its sends carry a mark
    /// that no values were computed, and every task that claims the mark passes it on instead of values.
    Refused,
    Kernel(Kernel),
    /// A task of a folded loop (`ProgramData::loops[lp]`): its run n is chunk
    /// `(n - 1) * stride + offset` (0-based) of the loop's `per_iter` chunks per iteration, in order
    /// (stride 2: one of a pair of tasks taking odd and even chunks in turn); the chunk's iteration l
    /// runs the kernel on layer l's tensors, and the run number the kernel sees counts within it.
    Looped {
        kernel: Kernel,
        lp: u32,
        per_iter: u64,
        stride: u64,
        offset: u64,
    },
}

/// Where a result is when the run ends: the accumulators of the PEs in `rect` (None: what the ports
/// collected) hold, together, the whole `rows x cols` tensor `tensor`, each value summed over all
/// `cover` terms (0: finished values). An attention region's PEs hold the updated KV cache they keep
/// (`Kernel::AttnScores::append`) beside their accumulators.
#[derive(Clone, Debug, PartialEq)]
pub struct Readout {
    pub tensor: u32,
    pub name: String,
    pub rect: Option<Rect>,
    pub rows: u64,
    pub cols: u64,
    pub cover: u64,
}

impl ProgramData {
    /// The tables of wafers laid side by side (`Cluster::concat`): templates in wafer order, wafer k's
    /// PEs `k * width` columns east.
    pub fn concat(wafers: &[&ProgramData], width: u32) -> ProgramData {
        let mut out = ProgramData::default();
        for (k, d) in wafers.iter().enumerate() {
            let dx = k as u32 * width;
            let lp0 = out.loops.len() as u32;
            out.tasks.extend(d.tasks.iter().map(|ts| {
                ts.iter()
                    .map(|t| match t {
                        TaskData::Kernel(k) => TaskData::Kernel(k.shifted(dx)),
                        TaskData::Looped { kernel, lp, per_iter, stride, offset } => TaskData::Looped {
                            kernel: kernel.shifted(dx),
                            lp: lp0 + lp,
                            per_iter: *per_iter,
                            stride: *stride,
                            offset: *offset,
                        },
                        TaskData::None => TaskData::None,
                        TaskData::Refused => TaskData::Refused,
                    })
                    .collect()
            }));
            out.loops.extend(d.loops.iter().cloned());
            out.streamed.extend(d.streamed.iter().copied());
            out.concats.extend(d.concats.iter().map(|(k, v)| (*k, v.clone())));
            out.readouts.extend(
                d.readouts.iter().map(|r| Readout { rect: r.rect.map(|x| Rect { x: x.x + dx, ..x }), ..r.clone() }),
            );
            out.unsupported.extend(d.unsupported.iter().map(|u| format!("wafer {k}: {u}")));
        }
        out
    }
}

impl ProgramData {
    /// Why a functional run refuses this program (None: it does not): the first reasons in full, then
    /// how many more and the regions they name.
    pub fn refusal(&self) -> Option<String> {
        const SHOWN: usize = 4;
        if self.unsupported.is_empty() {
            return None;
        }
        let mut lines: Vec<String> = self.unsupported.iter().take(SHOWN).cloned().collect();
        let rest = &self.unsupported[SHOWN.min(self.unsupported.len())..];
        if !rest.is_empty() {
            let names: Vec<&str> = rest.iter().filter_map(|u| u.split('`').nth(1)).collect();
            lines.push(format!("and {} more ({})", rest.len(), names.join(", ")));
        }
        Some(lines.join("; "))
    }
}

/// The data side table of one program.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProgramData {
    /// Per template (indexed like `MeshProgram::templates`), per task.
    pub tasks: Vec<Vec<TaskData>>,
    pub readouts: Vec<Readout>,
    /// Why values cannot run through this program yet (regions whose algorithm has no data semantics);
    /// a functional run refuses the program when this is not empty.
    pub unsupported: Vec<String>,
    /// The folded loops `TaskData::Looped` names.
    pub loops: Vec<LoopMap>,
    /// Weights streamed in (every layer's): a kernel reads them from what its PE loaded (`Kernel::Load`).
    pub streamed: BTreeSet<u32>,
    /// Tensors that are the concatenation of others' columns (a fused projection's gradient, the
    /// graph's `split_grad`, which moves as its parts): per such tensor, its parts in column order.
    pub concats: BTreeMap<u32, Vec<View>>,
}
