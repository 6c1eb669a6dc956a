//! The reference evaluator (`waferscale::functional`): is it a correct transformer?
//! - decode with a KV cache, token by token, gives the logits prefill gives for the same prefix;
//! - training gradients equal central finite differences of the loss (in f64);
//! - the Adam update is its formula; storage rounding rounds to the dtype;
//! - weights: seeded values are deterministic and depend only on (seed, name); checkpoints round-trip
//!   in the families' on-disk layouts; bad files fail with exit code 2 and a message naming the tensor.

mod support;

use support::wafer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use waferscale::functional::weights::write_f32;
use waferscale::functional::{
    self, caches_from, evaluate, numerics_of, AdamConfig, Feeds, Options, Precision, Real, Tokens, Values,
    WeightSource, Weights,
};
use waferscale::graph::{self, Graph, OpKind, TensorId};
use waferscale::model::{self, DType, Model, Phase, Workload, WorkloadArgs};

/// The tiny decoders, and Mistral with a 3-token sliding window (shorter than the decode tests' context).
/// Mixtral with a capacity factor that drops no token: decode and prefill route different sets of
/// tokens, so with drops (the default factor of 1.0) they rightly differ.
const DECODERS: [&str; 6] = [
    "gpt-tiny",
    "gptj-tiny",
    "neox-tiny",
    "llama-tiny",
    "tests/data/mixtral-tiny-nodrop.json",
    "tests/data/mistral-tiny-window3.json",
];
const ALL: [&str; 6] = ["gpt-tiny", "gptj-tiny", "neox-tiny", "llama-tiny", "mixtral-tiny", "bert-tiny"];

fn workload(model: &Model, phase: Phase, batch: u64, seq: Option<u64>, context: Option<u64>, dtype: DType) -> Workload {
    let args =
        WorkloadArgs { phase: Some(phase), batch: Some(batch), seq, context, dtype: Some(dtype), ..Default::default() };
    args.resolve(model).unwrap()
}

/// Evaluates `graph` with `weights`, `tokens` and `caches`.
fn eval<T: Real>(
    model: &Model,
    graph: &Graph,
    weights: &Weights<T>,
    tokens: &Tokens,
    caches: &BTreeMap<String, Vec<T>>,
    opts: &Options,
) -> Values<T> {
    let feeds = Feeds::for_graph(graph, weights, tokens, caches, 0).unwrap();
    evaluate(graph, &numerics_of(model).unwrap(), &feeds, opts).unwrap()
}

fn output<'a, T: Real>(graph: &Graph, values: &'a Values<T>, name: &str) -> &'a [T] {
    values.by_name(graph, name).unwrap_or_else(|| panic!("no tensor {name}"))
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    functional::max_rel_error(a, b)
}

#[test]
fn max_rel_error_is_relative_to_the_reference() {
    use functional::max_rel_error;
    assert_eq!(max_rel_error(&[1.0f32, 2.0], &[1.0, 2.0]), 0.0);
    assert_eq!(max_rel_error(&[1.0f32, 2.5], &[1.0, 2.0]), 0.25);
    assert_eq!(max_rel_error::<f32>(&[], &[]), 0.0);
    assert_eq!(max_rel_error(&[1.0f32], &[1.0, 2.0]), f64::INFINITY);
    assert_eq!(max_rel_error(&[f32::NAN], &[1.0]), f64::INFINITY);
}

/// Decode over several tokens, each step reading the cache the previous step appended, gives the
/// logits of prefill over the same prefix (in f64: any mistake in positions, masks or cache layout is
/// O(1), rounding is 1e-15). Batch 2, so sequences must stay apart in the cache.
#[test]
fn decode_with_kv_cache_matches_prefill() {
    for name in DECODERS {
        let model = model::load(name).unwrap();
        let (batch, prompt, steps) = (2usize, 3usize, 4usize);
        let tokens = Tokens::seeded(11, batch, prompt + steps, 256);
        let opts = Options::default();
        // Weights are seeded by name, so every graph of the model gets the same ones.
        let wl = workload(&model, Phase::Prefill, batch as u64, Some(prompt as u64), None, DType::Fp32);
        let g = graph::build(&model, &wl).unwrap();
        let weights = Weights::<f64>::seeded(&g, 5);
        let v = eval(&model, &g, &weights, &tokens.prefix(prompt), &BTreeMap::new(), &opts);
        let mut caches = caches_from(&g, &v);
        assert_eq!(caches.len(), 2 * 2, "{name}: k and v caches of 2 layers");
        for step in 0..steps {
            let context = (prompt + step) as u64;
            let dw = workload(&model, Phase::Decode, batch as u64, None, Some(context), DType::Fp32);
            let dg = graph::build(&model, &dw).unwrap();
            let seqs = tokens.prefix(prompt + step + 1);
            let dv = eval(&model, &dg, &weights, &seqs, &caches, &opts);
            let decoded: Vec<f64> = output(&dg, &dv, "head.logits").to_vec();
            caches = caches_from(&dg, &dv);
            let pw = workload(&model, Phase::Prefill, batch as u64, Some(context + 1), None, DType::Fp32);
            let pg = graph::build(&model, &pw).unwrap();
            let pv = eval(&model, &pg, &weights, &seqs, &BTreeMap::new(), &opts);
            let prefilled = output(&pg, &pv, "head.logits");
            let d = max_rel_diff(&decoded, prefilled);
            assert!(d < 1e-12, "{name}: decode step {step} differs from prefill by {d:e} (relative to max |logit|)");
            // The two sequences differ, so their logits must too (a mixed-up cache could hide otherwise).
            assert!(max_rel_diff(&decoded[..256], &decoded[256..]) > 1e-3, "{name}: sequences gave equal logits");
        }
    }
}

/// The same check through the library's one-call entry (`functional::run`, the CLI's path), in f32.
#[test]
fn run_decode_prefills_its_context() {
    let model = model::load("llama-tiny").unwrap();
    let tokens = Tokens::one(vec![5, 6, 7, 8, 9]);
    let opts = Options::default();
    let dw = workload(&model, Phase::Decode, 1, None, Some(4), DType::Fp32);
    let d = functional::run::<f32>(&model, &dw, &WeightSource::Seeded(3), &tokens, &opts).unwrap();
    let pw = workload(&model, Phase::Prefill, 1, Some(5), None, DType::Fp32);
    let p = functional::run::<f32>(&model, &pw, &WeightSource::Seeded(3), &tokens, &opts).unwrap();
    let dl: Vec<f64> = d.values.by_name(&d.graph, "head.logits").unwrap().iter().map(|x| x.to_f64()).collect();
    let pl: Vec<f64> = p.values.by_name(&p.graph, "head.logits").unwrap().iter().map(|x| x.to_f64()).collect();
    let diff = max_rel_diff(&dl, &pl);
    assert!(diff < 1e-5, "fp32 decode vs prefill: {diff:e}");
}

/// Sum of the graph's losses.
fn loss<T: Real>(graph: &Graph, values: &Values<T>) -> f64 {
    graph.outputs.iter().filter(|t| graph.tensor(**t).name.ends_with("loss")).map(|&t| values.f(t)[0].to_f64()).sum()
}

/// The gradient the graph computes for each weight: the Adam op's second input.
fn weight_grads(graph: &Graph) -> BTreeMap<String, TensorId> {
    graph
        .op_ids()
        .filter_map(|o| {
            let op = graph.op(o);
            matches!(op.kind, OpKind::Adam { .. }).then(|| (graph.tensor(op.inputs[0]).name.clone(), op.inputs[1]))
        })
        .collect()
}

/// Every weight's gradient, at two sampled elements (the first, and one drawn by a seeded generator),
/// against the central difference (L(w + h) - L(w - h)) / 2h in f64 with h = 1e-6: truncation error
/// ~h^2 |L'''| and rounding ~1e-16 / h, so agreement to 1e-6 (relative to max(|g|, 1e-3)) is a real
/// check, while a missing term, a wrong sign or a transposed index is off by O(1).
#[test]
fn training_gradients_match_finite_differences() {
    let h = 1e-6;
    for name in ALL {
        let model = model::load(name).unwrap();
        let wl = workload(&model, Phase::Train, 2, Some(5), None, DType::Fp32);
        let g = graph::build(&model, &wl).unwrap();
        let mut weights = Weights::<f64>::seeded(&g, 9);
        let tokens = Tokens::seeded(4, 2, 5, 256);
        let opts = Options::default();
        let base = eval(&model, &g, &weights, &tokens, &BTreeMap::new(), &opts);
        let grads = weight_grads(&g);
        assert_eq!(grads.len(), weights.tensors.len(), "{name}: every weight has a gradient");
        let mut rng = functional::SplitMix64::new(1);
        let mut checked = 0;
        let mut worst = (0.0f64, String::new());
        for (wname, gt) in &grads {
            let n = weights.tensors[wname].1.len() as u64;
            for idx in [0, rng.below(n)] {
                let idx = idx as usize;
                let analytic = base.f(*gt)[idx];
                let orig = weights.tensors[wname].1[idx];
                weights.tensors.get_mut(wname).unwrap().1[idx] = orig + h;
                let up = loss(&g, &eval(&model, &g, &weights, &tokens, &BTreeMap::new(), &opts));
                weights.tensors.get_mut(wname).unwrap().1[idx] = orig - h;
                let down = loss(&g, &eval(&model, &g, &weights, &tokens, &BTreeMap::new(), &opts));
                weights.tensors.get_mut(wname).unwrap().1[idx] = orig;
                let numeric = (up - down) / (2.0 * h);
                let err = (numeric - analytic).abs() / analytic.abs().max(1e-3);
                if err > worst.0 {
                    worst = (err, format!("{wname}[{idx}]: analytic {analytic:e}, numeric {numeric:e}"));
                }
                checked += 1;
            }
        }
        assert!(worst.0 < 1e-6, "{name}: worst gradient error {:e} at {}", worst.0, worst.1);
        assert!(checked >= 2 * grads.len());
    }
}

/// Recompute re-runs each layer's forward in backward: the gradients must not change at all.
#[test]
fn recompute_gives_the_same_gradients() {
    for name in ["gpt-tiny", "mixtral-tiny", "bert-tiny"] {
        let model = model::load(name).unwrap();
        let mut args = WorkloadArgs {
            phase: Some(Phase::Train),
            batch: Some(1),
            seq: Some(4),
            dtype: Some(DType::Fp32),
            ..Default::default()
        };
        let g = graph::build(&model, &args.resolve(&model).unwrap()).unwrap();
        args.recompute = Some(true);
        let rg = graph::build(&model, &args.resolve(&model).unwrap()).unwrap();
        assert!(rg.n_ops() > g.n_ops(), "{name}: recompute adds ops");
        let weights = Weights::<f64>::seeded(&g, 2);
        let tokens = Tokens::seeded(8, 1, 4, 256);
        let opts = Options::default();
        let v = eval(&model, &g, &weights, &tokens, &BTreeMap::new(), &opts);
        let rv = eval(&model, &rg, &weights, &tokens, &BTreeMap::new(), &opts);
        let (a, b) = (weight_grads(&g), weight_grads(&rg));
        for (w, t) in &a {
            assert_eq!(v.f(*t), rv.f(b[w]), "{name}: gradient of {w} changed under recompute");
        }
    }
}

/// Adam at step 3 from non-zero moments, against the formula written out here in f64.
#[test]
fn adam_update_matches_its_formula() {
    let model = model::load("gpt-tiny").unwrap();
    let wl = workload(&model, Phase::Train, 1, Some(4), None, DType::Fp32);
    let g = graph::build(&model, &wl).unwrap();
    let weights = Weights::<f64>::seeded(&g, 1);
    let tokens = Tokens::seeded(2, 1, 4, 256);
    let mut feeds = Feeds::for_graph(&g, &weights, &tokens, &BTreeMap::new(), 0).unwrap();
    let mut rng = functional::SplitMix64::new(77);
    let mut moments = BTreeMap::new();
    for (name, (_, w)) in &weights.tensors {
        let m: Vec<f64> = w.iter().map(|_| rng.symmetric(1e-3)).collect();
        let v: Vec<f64> = w.iter().map(|_| rng.next_f64() * 1e-6).collect();
        feeds.values.insert(format!("{name}.adam_m"), functional::Value::F(m.clone()));
        feeds.values.insert(format!("{name}.adam_v"), functional::Value::F(v.clone()));
        moments.insert(name.clone(), (m, v));
    }
    let adam = AdamConfig { lr: 3e-4, beta1: 0.8, beta2: 0.99, eps: 1e-7, step: 3 };
    let opts = Options { adam, precision: Precision::Exact, ..Options::default() };
    let vals = evaluate(&g, &numerics_of(&model).unwrap(), &feeds, &opts).unwrap();
    let grads = weight_grads(&g);
    let mut checked = 0;
    for o in g.op_ids() {
        let op = g.op(o);
        if !matches!(op.kind, OpKind::Adam { .. }) {
            continue;
        }
        let wname = &g.tensor(op.inputs[0]).name;
        let (m0, v0) = &moments[wname];
        let w0 = &weights.tensors[wname].1;
        let gr = vals.f(grads[wname]);
        let (w1, m1, v1) = (vals.f(op.outputs[0]), vals.f(op.outputs[1]), vals.f(op.outputs[2]));
        for i in 0..w0.len() {
            let m = 0.8 * m0[i] + 0.2 * gr[i];
            let v = 0.99 * v0[i] + 0.01 * gr[i] * gr[i];
            let w = w0[i] - 3e-4 * (m / (1.0 - 0.8f64.powi(3))) / ((v / (1.0 - 0.99f64.powi(3))).sqrt() + 1e-7);
            // Relative to the terms' sizes: the sum can cancel.
            let scale = (0.8 * m0[i]).abs() + (0.2 * gr[i]).abs();
            assert!((m1[i] - m).abs() <= 1e-14 * scale, "{wname}[{i}] m: {} vs {m} (g {})", m1[i], gr[i]);
            assert!((v1[i] - v).abs() <= 1e-14 * v.abs().max(1e-300), "{wname}[{i}] v");
            assert!((w1[i] - w).abs() <= 1e-14 * w.abs().max(1.0), "{wname}[{i}]: {} vs {w}", w1[i]);
            checked += 1;
        }
        // Something moved: the step is not a no-op.
        assert!(w1.iter().zip(w0).any(|(a, b)| a != b), "{wname} did not move");
    }
    assert_eq!(checked as u64, weights.tensors.values().map(|(_, v)| v.len() as u64).sum::<u64>());
}

/// bf16 storage: weights are stored (and updated) in bf16 from an fp32 master copy; every stored
/// activation is a bf16 value; the loss stays within bf16's error of the fp32 one.
#[test]
fn storage_rounding_keeps_values_in_the_dtype() {
    let model = model::load("llama-tiny").unwrap();
    let tokens = Tokens::seeded(3, 1, 6, 256);
    let exact = functional::run::<f32>(
        &model,
        &workload(&model, Phase::Train, 1, Some(6), None, DType::Fp32),
        &WeightSource::Seeded(1),
        &tokens,
        &Options::default(),
    )
    .unwrap();
    let opts = Options { precision: Precision::Storage, ..Options::default() };
    let bf = functional::run::<f32>(
        &model,
        &workload(&model, Phase::Train, 1, Some(6), None, DType::Bf16),
        &WeightSource::Seeded(1),
        &tokens,
        &opts,
    )
    .unwrap();
    let is_bf16 = |x: f32| x.to_bits() & 0xffff == 0;
    let g = &bf.graph;
    for (i, t) in g.tensors.iter().enumerate() {
        let v = bf.values.f(TensorId(i as u32));
        match t.elem {
            waferscale::graph::Elem::Float(DType::Bf16) => {
                assert!(v.iter().all(|&x| is_bf16(x)), "{} holds a value that is not bf16", t.name)
            }
            waferscale::graph::Elem::Float(DType::Fp32) if t.name.ends_with(".master.next") => {
                // The master copy keeps the update that bf16 weights cannot hold.
                assert!(v.iter().any(|&x| !is_bf16(x)), "{}: master copy is rounded", t.name);
            }
            _ => {}
        }
    }
    let (l32, l16) = (loss(&exact.graph, &exact.values), loss(&bf.graph, &bf.values));
    assert!((l32 - l16).abs() < 0.05 * l32.abs(), "bf16 loss {l16} vs fp32 {l32}");
    assert_ne!(l32, l16, "rounding changed nothing");
}

/// Seeded weights: a pure function of (seed, name), different for another seed, and the same tensor
/// in two graphs of the model (prefill and train) gets the same values.
#[test]
fn seeded_weights_are_deterministic() {
    for name in ALL {
        let model = model::load(name).unwrap();
        let g1 = graph::build(&model, &workload(&model, Phase::Prefill, 1, Some(4), None, DType::Fp32)).unwrap();
        let g2 = graph::build(&model, &workload(&model, Phase::Train, 2, Some(8), None, DType::Fp16)).unwrap();
        let a = Weights::<f32>::seeded(&g1, 42);
        let b = Weights::<f32>::seeded(&g1, 42);
        let c = Weights::<f32>::seeded(&g1, 43);
        let d = Weights::<f32>::seeded(&g2, 42);
        assert_eq!(a, b, "{name}");
        for (n, (shape, v)) in &a.tensors {
            assert_ne!(v, &c.tensors[n].1, "{name}: {n} is the same for seeds 42 and 43");
            assert_eq!(v, &d.tensors[n].1, "{name}: {n} differs between graphs");
            assert_eq!(v.len() as u64, shape.iter().product::<u64>());
        }
    }
    // The whole run is deterministic too: two runs, bit-identical logits.
    let model = model::load("mixtral-tiny").unwrap();
    let wl = workload(&model, Phase::Prefill, 2, Some(7), None, DType::Fp32);
    let tokens = Tokens::seeded(0, 2, 7, 256);
    let r1 = functional::run::<f32>(&model, &wl, &WeightSource::Seeded(0), &tokens, &Options::default()).unwrap();
    let r2 = functional::run::<f32>(&model, &wl, &WeightSource::Seeded(0), &tokens, &Options::default()).unwrap();
    assert_eq!(r1.values.values, r2.values.values);
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("functional");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Saving writes each family's on-disk layout (experts apart, NeoX's qkv per head) and loading
/// reads it back to the same values, for every family.
#[test]
fn checkpoints_round_trip_in_the_hf_layout() {
    for name in ALL {
        let model = model::load(name).unwrap();
        let Model::Transformer(spec) = &model else { unreachable!() };
        let g = graph::build(&model, &workload(&model, Phase::Prefill, 1, Some(4), None, DType::Fp32)).unwrap();
        let w = Weights::<f32>::seeded(&g, 6);
        let path = tmp(&format!("{name}-roundtrip.safetensors"));
        w.save(&path, &g, Some(spec.family)).unwrap();
        let back = Weights::<f32>::load(&path, &g, Some(spec.family)).unwrap();
        assert_eq!(w.tensors, back.tensors, "{name}");
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        if name == "mixtral-tiny" {
            assert!(st.tensor("model.layers.1.block_sparse_moe.experts.3.w2.weight").is_ok());
        }
    }
}

/// GPT-NeoX's fused qkv on disk is per head (q, k, v rows of head 0, then head 1, ...); the graph's
/// split wants all q rows, then all k, then all v. A file whose rows hold their own index shows where
/// each lands.
#[test]
fn neox_qkv_rows_are_permuted_from_the_checkpoint_layout() {
    let model = model::load("neox-tiny").unwrap();
    let g = graph::build(&model, &workload(&model, Phase::Prefill, 1, Some(2), None, DType::Fp32)).unwrap();
    let w = Weights::<f32>::seeded(&g, 0);
    let qkv = "gpt_neox.layers.0.attention.query_key_value.weight";
    let (shape, _) = &w.tensors[qkv];
    let (rows, cols) = (shape[0] as usize, shape[1] as usize);
    let mut tensors: Vec<(String, Vec<u64>, Vec<f32>)> =
        w.tensors.iter().map(|(n, (s, v))| (n.clone(), s.clone(), v.clone())).collect();
    for t in &mut tensors {
        if t.0 == qkv {
            t.2 = (0..rows * cols).map(|i| (i / cols) as f32).collect();
        }
    }
    let path = tmp("neox-rows.safetensors");
    write_f32(&path, &tensors).unwrap();
    let back = Weights::<f32>::load(&path, &g, Some(model::Family::GptNeoX)).unwrap();
    let (heads, d) = (4, rows / 12);
    let v = &back.tensors[qkv].1;
    for part in 0..3 {
        for h in 0..heads {
            for j in 0..d {
                let graph_row = part * heads * d + h * d + j;
                assert_eq!(v[graph_row * cols] as usize, h * 3 * d + part * d + j, "part {part} head {h} dim {j}");
            }
        }
    }
}

fn check_error(name: &str, args: &[&str]) {
    let (code, _, stderr) = wafer(args);
    let got = format!("exit: {code}\n{stderr}");
    assert_eq!(code, 2, "{name}: expected exit code 2:\n{got}");
    assert!(!got.contains("panicked"), "{name}: panicked:\n{got}");
    let mut settings = insta::Settings::clone_current();
    settings.add_filter(&regex_escape(env!("CARGO_TARGET_TMPDIR")), "[TMP]");
    settings.bind(|| insta::assert_snapshot!(name, got));
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_alphanumeric() || c == '/' || c == '_' || c == '-' { c.to_string() } else { format!("\\{c}") })
        .collect()
}

/// A good checkpoint for gpt-tiny, then three broken copies: a tensor left out, a tensor with the
/// wrong shape, the file cut short.
fn broken_files() -> [PathBuf; 4] {
    let model = model::load("gpt-tiny").unwrap();
    let g = graph::build(&model, &workload(&model, Phase::Prefill, 1, Some(4), None, DType::Fp32)).unwrap();
    let w = Weights::<f32>::seeded(&g, 0);
    let good = tmp("gpt-tiny-good.safetensors");
    w.save(&good, &g, Some(model::Family::Gpt2)).unwrap();
    let all: Vec<(String, Vec<u64>, Vec<f32>)> =
        w.tensors.iter().map(|(n, (s, v))| (n.clone(), s.clone(), v.clone())).collect();
    let missing = tmp("gpt-tiny-missing.safetensors");
    let fewer: Vec<_> = all.iter().filter(|t| t.0 != "h.1.mlp.c_fc.weight").cloned().collect();
    write_f32(&missing, &fewer).unwrap();
    let shape = tmp("gpt-tiny-shape.safetensors");
    let mut reshaped = all.clone();
    for t in &mut reshaped {
        if t.0 == "h.0.attn.c_attn.weight" {
            // Stored as nn.Linear would ([out, in]) instead of Conv1D's [in, out].
            t.1 = vec![t.1[1], t.1[0]];
        }
    }
    write_f32(&shape, &reshaped).unwrap();
    let truncated = tmp("gpt-tiny-truncated.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    [good, missing, shape, truncated]
}

#[test]
fn bad_weight_files_name_the_tensor() {
    let [good, missing, shape, truncated] = broken_files();
    let s = |p: &Path| p.display().to_string();
    let (code, stdout, stderr) = wafer(&["reference", "gpt-tiny", "--tokens", "1,2,3", "--weights", &s(&good)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("logits [1, 256]"), "{stdout}");
    check_error("reference-missing-tensor", &["reference", "gpt-tiny", "--weights", &s(&missing)]);
    check_error("reference-wrong-shape", &["reference", "gpt-tiny", "--weights", &s(&shape)]);
    check_error("reference-truncated", &["reference", "gpt-tiny", "--weights", &s(&truncated)]);
    check_error("reference-no-file", &["reference", "gpt-tiny", "--weights", "no/such/file.safetensors"]);
    check_error("reference-token-out-of-vocab", &["reference", "gpt-tiny", "--tokens", "1,256"]);
    check_error("reference-tokens-vs-seq", &["reference", "gpt-tiny", "--tokens", "1,2", "--seq", "3"]);
}

/// The CLI's outputs file holds what the library computes, bit for bit, and the printed checksum is
/// that of those values.
#[test]
fn cli_writes_the_outputs() {
    let out = tmp("bert-out.safetensors");
    let (code, stdout, stderr) =
        wafer(&["reference", "bert-tiny", "--tokens", "1,5,9,2", "--seed", "4", "--out", &out.display().to_string()]);
    assert_eq!(code, 0, "{stderr}");
    let model = model::load("bert-tiny").unwrap();
    let wl = workload(&model, Phase::Prefill, 1, Some(4), None, DType::Fp32);
    let run = functional::run::<f32>(
        &model,
        &wl,
        &WeightSource::Seeded(4),
        &Tokens::one(vec![1, 5, 9, 2]),
        &Options::default(),
    )
    .unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, t) in run.primary_outputs() {
        let view = st.tensor(&name).unwrap();
        let file: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(file, run.values.f(t), "{name}");
        assert_eq!(view.shape(), run.graph.tensor(t).shape.iter().map(|&d| d as usize).collect::<Vec<_>>());
        let sum = format!("{:016x}", functional::checksum(run.values.f(t)));
        assert!(stdout.contains(&sum), "{name}: checksum {sum} not printed:\n{stdout}");
    }
    assert!(st.tensor("last_hidden_state").is_ok() && st.tensor("pooler_output").is_ok());
}

/// The numerics read from every shipped config: the families' epsilons, GELU variants, rotary
/// layouts, Llama 3.1's frequency scaling; an unsupported scaling is the user's error, naming the key.
#[test]
fn numerics_of_every_shipped_model() {
    use waferscale::functional::{Act, Numerics, RotaryStyle};
    for f in model::embedded_models() {
        let Model::Transformer(spec) = model::load(f.name).unwrap() else { continue };
        let n = Numerics::for_model(&spec).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        assert!(n.norm_eps > 0.0 && n.norm_eps <= 1e-5, "{}: eps {}", f.name, n.norm_eps);
        assert_eq!(n.rotary_style == RotaryStyle::Interleaved, spec.family == model::Family::GptJ, "{}", f.name);
    }
    let get = |name: &str| {
        let Model::Transformer(spec) = model::load(name).unwrap() else { unreachable!() };
        (spec.clone(), Numerics::for_model(&spec).unwrap())
    };
    assert_eq!((get("gpt2-small").1.act, get("gpt2-small").1.norm_eps), (Act::GeluTanh, 1e-5));
    assert_eq!((get("bert-base-uncased").1.act, get("bert-base-uncased").1.norm_eps), (Act::GeluErf, 1e-12));
    assert_eq!(get("llama-3-8b").1.rope_theta, 500000.0);
    assert!(get("llama-3-8b").1.rope_scaling.is_none());
    // Llama 3.1: wavelengths under 8192/4 keep their frequency, over 8192/1 are divided by 8.
    let (spec, n) = get("llama-3.1-405b");
    let plain = Numerics { rope_scaling: None, ..n.clone() };
    let (scaled, unscaled) = (n.inv_freq(spec.head_dim), plain.inv_freq(spec.head_dim));
    assert_eq!(scaled[0], unscaled[0]);
    let last = scaled.len() - 1;
    assert!((scaled[last] - unscaled[last] / 8.0).abs() < 1e-18);
    assert!(scaled.windows(2).all(|w| w[1] < w[0]), "frequencies decrease");
    // A scaling the reference does not implement is refused, not ignored.
    let text = r#"{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        "intermediate_size": 128, "vocab_size": 32, "max_position_embeddings": 64,
        "rope_scaling": {"type": "linear", "factor": 2.0}}"#;
    let spec = model::parse_config("x", "x.json", text).unwrap();
    let err = Numerics::from_config(&spec, text).unwrap_err().to_string();
    assert!(err.contains("rope_scaling") && err.contains("llama3"), "{err}");
}

/// Checkpoints stored in F16, BF16 and F64 load as the exact f32 values of their elements.
#[test]
fn half_precision_checkpoints_convert_exactly() {
    let model = model::load("llama-tiny").unwrap();
    let g = graph::build(&model, &workload(&model, Phase::Prefill, 1, Some(2), None, DType::Fp32)).unwrap();
    let w = Weights::<f32>::seeded(&g, 12);
    type Enc = fn(f32) -> Vec<u8>;
    type Case = (&'static str, safetensors::Dtype, Enc, fn(f32) -> f32);
    let cases: [Case; 3] = [
        (
            "f16",
            safetensors::Dtype::F16,
            |x| half::f16::from_f32(x).to_le_bytes().to_vec(),
            |x| half::f16::from_f32(x).to_f32(),
        ),
        (
            "bf16",
            safetensors::Dtype::BF16,
            |x| half::bf16::from_f32(x).to_le_bytes().to_vec(),
            |x| half::bf16::from_f32(x).to_f32(),
        ),
        ("f64", safetensors::Dtype::F64, |x| (x as f64).to_le_bytes().to_vec(), |x| x),
    ];
    for (label, dtype, enc, round) in cases {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = w
            .tensors
            .iter()
            .map(|(n, (s, v))| {
                (n.clone(), s.iter().map(|&d| d as usize).collect(), v.iter().flat_map(|&x| enc(x)).collect())
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
            .iter()
            .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap()))
            .collect();
        let path = tmp(&format!("llama-{label}.safetensors"));
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        let back = Weights::<f32>::load(&path, &g, Some(model::Family::Llama)).unwrap();
        for (n, (_, v)) in &w.tensors {
            let want: Vec<f32> = v.iter().map(|&x| round(x)).collect();
            assert_eq!(back.tensors[n].1, want, "{label}: {n}");
        }
    }
}
