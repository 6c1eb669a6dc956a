//! Training in functional mode (`wafer run --phase train --functional`): one step's loss, gradients and
//! updated weights computed by the emulated PEs of a pipelined training program, against the reference.
//!
//! Every tiny model's whole step runs on the mesh (the decoders, Mixtral's experts and BERT with its
//! two heads): the forward pass, the loss, the backward pass (attention's and the experts' included)
//! and Adam, with as few tokens as one. What is still refused is refused by region and op.

mod support;

use std::sync::Arc;

use support::wafer;
use waferscale::engine::values::Setup;
use waferscale::engine::{self, EngineOptions, EngineRun, Fidelity};
use waferscale::functional;
use waferscale::functional::mesh::MeshOutput;
use waferscale::functional::weights::Weights;
use waferscale::graph::OpKind;
use waferscale::mesh::data::TaskData;
use waferscale::model::{DType, Model};

const TINY: [&str; 4] = ["gpt-tiny", "llama-tiny", "neox-tiny", "gptj-tiny"];

/// One pipelined training step of `name` on a `mesh` x `mesh` WSE-2 rectangle, compiled, with the
/// reference's run of the same step (seeded weights and tokens).
struct Step {
    model: Model,
    prog: waferscale::mesh::MeshProgram,
    run: functional::Run<f32>,
    numerics: functional::Numerics,
}

fn step(name: &str, mesh: u32, seq: u64, dtype: DType) -> Step {
    let (model, mut progs, run, numerics) = support::seeded_train_step(name, mesh, seq, dtype, None);
    assert_eq!(progs.len(), 1, "{name}: pipelined training is one program");
    let prog = progs.remove(0).1;
    Step { model, prog, run, numerics }
}

impl Step {
    fn setup(&self) -> Setup {
        functional::mesh::setup(&self.prog, &self.run.graph, &self.numerics, &self.run.values).expect("setup")
    }

    /// The whole step on the mesh from `setup`: the engine's run and every result, beside the reference.
    fn whole(&self, setup: Setup, threads: usize) -> (EngineRun, Vec<MeshOutput>) {
        let eopts = EngineOptions::new(Fidelity::Detailed, threads);
        let (erun, results) = engine::run_functional(&self.prog, &eopts, Arc::new(setup)).expect("functional run");
        let outs = functional::mesh::outputs(&self.prog, &self.run.graph, &results, &self.run.values).expect("outputs");
        (erun, outs)
    }

    /// The Adam ops of the step: (weight name, gradient tensor name, output tensor names).
    fn adams(&self) -> Vec<(String, String, Vec<String>)> {
        let g = &self.run.graph;
        g.op_ids()
            .map(|o| g.op(o))
            .filter(|op| matches!(op.kind, OpKind::Adam { .. }))
            .map(|op| {
                let name = |t: &waferscale::graph::TensorId| g.tensor(*t).name.clone();
                (name(&op.inputs[0]), name(&op.inputs[1]), op.outputs.iter().map(name).collect())
            })
            .collect()
    }
}

fn find<'a>(outs: &'a [MeshOutput], name: &str) -> Option<&'a MeshOutput> {
    outs.iter().find(|o| o.name == name)
}

/// Every tiny model's whole training step on the mesh matches the reference in fp32 within 1e-4,
/// on meshes small and large enough for both linear algorithms: the loss, every weight's gradient (read
/// back from the Adam region that received it), and every weight's w', m' and v' (elements whose
/// reference gradient is below 100 x Adam's epsilon, rounding noise, are held to absolute bounds: see
/// `functional::mesh::adam_error`). Mixtral's step drops token copies over its experts' capacity (the
/// default factor of 1.0), on the wafer as in the reference; with a factor that drops nothing it matches
/// too.
#[test]
fn every_tiny_models_step_matches_the_reference() {
    for name in TINY.iter().chain(&["bert-tiny", "mixtral-tiny", "tests/data/mixtral-tiny-nodrop.json"]) {
        // (BERT's and Mixtral's training steps fit a 64x64 rectangle pipelined; 32x32 would stream their
        // weights.)
        for mesh in if TINY.contains(name) { &[32, 64][..] } else { &[64][..] } {
            let mesh = *mesh;
            let s = step(name, mesh, 16, DType::Fp32);
            let dropped: usize = s.run.values.moe_dropped.iter().map(|d| d.1).sum();
            assert_eq!(dropped > 0, *name == "mixtral-tiny", "{name}: {} copies dropped", dropped);
            let (_, outs) = s.whole(s.setup(), 1);
            let what = format!("{name} on {mesh}x{mesh}");
            let losses: Vec<&MeshOutput> = outs.iter().filter(|o| o.name.ends_with("loss")).collect();
            assert!(!losses.is_empty(), "{what}: no loss");
            for loss in losses {
                assert!(loss.max_rel_error < 1e-4, "{what}: `{}` off by {:.3e}", loss.name, loss.max_rel_error);
            }
            let adams = s.adams();
            assert!(adams.len() >= 10, "{what}: {} weights", adams.len());
            for (w, grad, next) in &adams {
                let g = find(&outs, grad).unwrap_or_else(|| panic!("{what}: no gradient `{grad}` of `{w}`"));
                assert!(g.max_rel_error < 1e-4, "{what}: gradient of `{w}` off by {:.3e}", g.max_rel_error);
                assert_eq!(next.len(), 3, "{what}: `{w}` has fp32 Adam outputs w', m', v'");
                for n in next {
                    let o = find(&outs, n).unwrap_or_else(|| panic!("{what}: no `{n}`"));
                    assert!(o.max_rel_error < 1e-4, "{what}: `{n}` off by {:.3e}", o.max_rel_error);
                }
            }
        }
    }
}

/// The check would catch a wrong gradient: the same step on the wafer with other labels than the
/// reference's gives a loss, gradients (the first layer's included) and Adam moments off by far more
/// than the bound.
#[test]
fn other_labels_on_the_wafer_are_caught_in_the_loss_gradients_and_updates() {
    let s = step("gpt-tiny", 32, 16, DType::Fp32);
    let mut setup = s.setup();
    let labels = s.run.graph.tensors.iter().position(|t| t.name == "labels").expect("labels") as u32;
    let old = setup.tensors[&labels].clone();
    let shifted: Arc<[f32]> = old.iter().map(|&l| if l >= 0.0 { (l + 1.0) % 256.0 } else { l }).collect();
    setup.tensors.insert(labels, shifted);
    let (_, outs) = s.whole(setup, 1);
    let off = |n: &str| find(&outs, n).unwrap_or_else(|| panic!("no `{n}`")).max_rel_error;
    for n in [
        "head.loss",
        "ln_f.weight.adam_m.next",
        "h.1.mlp.c_fc.weight.adam_v.next",
        "h.0.attn.c_attn.weight.adam_m.next",
        "wpe.weight.adam_m.next",
    ] {
        assert!(off(n) > 1e-3, "`{n}` off by only {:.3e}", off(n));
    }
    let qkv = s.adams().into_iter().find(|a| a.0 == "h.0.attn.c_attn.weight").expect("c_attn").1;
    assert!(off(&qkv) > 1e-3, "first layer's qkv gradient off by only {:.3e}", off(&qkv));
}

/// Values observe, never steer: the training step's timing is the same with and without values, and
/// its values are the same for 1 and 3 engine threads.
#[test]
fn timing_is_the_same_with_values_and_values_for_any_thread_count() {
    for (name, mesh) in [("llama-tiny", 32), ("mixtral-tiny", 64)] {
        let s = step(name, mesh, 16, DType::Fp32);
        let plain = engine::run(&s.prog, &EngineOptions::new(Fidelity::Detailed, 1)).expect("timing run");
        let (with, outs1) = s.whole(s.setup(), 1);
        assert_eq!(format!("{plain:?}"), format!("{with:?}"), "{name}: timing changed with values");
        let (_, outs3) = s.whole(s.setup(), 3);
        assert_eq!(outs1.len(), outs3.len());
        for (a, b) in outs1.iter().zip(&outs3) {
            assert_eq!((&a.name, &a.values), (&b.name, &b.values), "{name}: values differ between 1 and 3 threads");
        }
    }
}

/// `wafer run --phase train --functional` runs the whole step of every dense tiny model and exits 0
/// with the check; its `--out` file holds the loss and the wafer's updated weights under their
/// checkpoint names and layouts: read back as a checkpoint (into the graph's layout again), they equal
/// what `wafer reference --out` gives for the same step (`updated.NAME`) within the bound.
#[test]
fn the_cli_trains_on_the_mesh_and_writes_the_updated_weights() {
    let dir = std::env::temp_dir().join(format!("wafer-train-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let lr = functional::AdamConfig::default().lr as f32;
    let floor = 100.0 * functional::AdamConfig::default().eps as f32;
    for name in TINY.iter().chain(&["bert-tiny", "mixtral-tiny"]) {
        let mesh = if TINY.contains(name) { "32x32" } else { "64x64" };
        let (mesh_out, ref_out) =
            (dir.join(format!("{name}.safetensors")), dir.join(format!("{name}.ref.safetensors")));
        let w = ["--phase", "train", "--seq", "16", "--dtype", "fp32"];
        let m = mesh_out.to_str().expect("path");
        let (code, out, stderr) =
            wafer(&[&["run", name][..], &w, &["--mesh", mesh, "--functional", "--out", m]].concat());
        assert_eq!(code, 0, "{name}: {stderr}");
        assert!(out.contains("functional: max relative error vs the reference"), "{name}: {out}");
        assert!(out.contains(".adam_v.next"), "{name}: no moments in the check: {out}");
        let r = ref_out.to_str().expect("path");
        let (code, _, stderr) = wafer(&[&["reference", name][..], &w, &["--out", r]].concat());
        assert_eq!(code, 0, "{name}: {stderr}");
        let mesh_bytes = std::fs::read(&mesh_out).expect("read --out");
        let ref_bytes = std::fs::read(&ref_out).expect("read the reference's --out");
        let (ms, rs) = (
            safetensors::SafeTensors::deserialize(&mesh_bytes).expect("safetensors"),
            safetensors::SafeTensors::deserialize(&ref_bytes).expect("safetensors"),
        );
        let f32s = |st: &safetensors::SafeTensors, n: &str| -> Vec<f32> {
            let t = st.tensor(n).unwrap_or_else(|_| panic!("{name}: no `{n}`"));
            t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
        };
        // The loss (BERT: `mlm_loss` and `nsp_loss`), as `wafer reference --out` names it.
        let losses: Vec<String> = rs.names().into_iter().filter(|n| n.ends_with("loss")).map(String::from).collect();
        assert!(!losses.is_empty(), "{name}: the reference wrote no loss");
        for l in &losses {
            let (loss, want) = (f32s(&ms, l)[0], f32s(&rs, l)[0]);
            assert!((loss - want).abs() <= 1e-4 * want.abs(), "{name}: `{l}` {loss} vs {want}");
        }
        // The updated weights, read back as a checkpoint.
        let s = step(name, if TINY.contains(name) { 32 } else { 64 }, 16, DType::Fp32);
        let family = match &s.model {
            Model::Transformer(spec) => Some(spec.family),
            Model::Op(_) => None,
        };
        let back = Weights::<f32>::load(&mesh_out, &s.run.graph, family).expect("--out reads back as a checkpoint");
        let adams = s.adams();
        assert_eq!(back.tensors.len(), adams.len(), "{name}: one tensor per weight");
        for (wname, _, _) in &adams {
            let got = back.get(wname).expect("weight");
            let (want, grad) = (f32s(&rs, &format!("updated.{wname}")), f32s(&rs, &format!("grad.{wname}")));
            let scale = want.iter().fold(0f32, |a, &b| a.max(b.abs()));
            for ((&a, &b), &g) in got.iter().zip(&want).zip(&grad) {
                let bound = if g.abs() < floor { 2.0 * lr } else { 1e-4 * scale };
                assert!((a - b).abs() <= bound, "{name}: `{wname}` in --out: {a} vs {b} (gradient {g:.3e})");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A step with fewer tokens than experts / top_k dispatches each copy to its own slot (`Route::dispatch`:
/// capacity 1, slots in expert order), so an expert's weight gradient is the sum of the blocks of every
/// slot that holds it, on other PEs of the summa region, and zero for an expert no token chose: the
/// output gateway sums them by the slot map (`Kernel::ExpertSum`). mixtral-tiny with one token (2 slots
/// for 4 experts) and an 8-expert top-2 Mixtral with 2 tokens (4 slots for 8 experts), whose seeded
/// tokens choose one expert twice in a layer, match the reference in fp32 within 1e-4 (the loss, every
/// gradient, w', m', v'), with the same timing with and without values.
#[test]
fn a_step_with_fewer_tokens_than_experts_per_token_matches_the_reference() {
    for (name, seq, shared) in [("mixtral-tiny", 1, false), ("tests/data/mixtral-tiny-8x2.json", 2, true)] {
        let s = step(name, 96, seq, DType::Fp32);
        let (g, what) = (&s.run.graph, format!("{name} with {seq} tokens on 96x96"));
        let few = g.op_ids().any(|o| matches!(g.op(o).kind, OpKind::LinearWgrad(l) if l.groups < l.weight_groups));
        assert!(few, "{what}: every expert has a slot");
        // Tokens per expert, from the router's probabilities (zero off each token's top k).
        let mut most = 0;
        for (i, t) in g.tensors.iter().enumerate().filter(|(_, t)| t.name.ends_with("ffn.topk")) {
            let experts = t.shape[1] as usize;
            let p = s.run.values.f(waferscale::graph::TensorId(i as u32));
            for e in 0..experts {
                most = most.max(p.chunks_exact(experts).filter(|row| row[e] != 0.0).count());
            }
        }
        assert_eq!(most > 1, shared, "{what}: at most {most} tokens per expert");
        let plain = engine::run(&s.prog, &EngineOptions::new(Fidelity::Detailed, 1)).expect("timing run");
        let (with, outs) = s.whole(s.setup(), 1);
        assert_eq!(format!("{plain:?}"), format!("{with:?}"), "{what}: timing changed with values");
        assert!(find(&outs, "head.loss").is_some_and(|l| l.max_rel_error < 1e-4), "{what}: loss");
        let adams = s.adams();
        assert!(adams.len() >= 10, "{what}: {} weights", adams.len());
        for (w, grad, next) in &adams {
            let gr = find(&outs, grad).unwrap_or_else(|| panic!("{what}: no gradient `{grad}` of `{w}`"));
            assert!(gr.max_rel_error < 1e-4, "{what}: gradient of `{w}` off by {:.3e}", gr.max_rel_error);
            for n in next {
                let o = find(&outs, n).unwrap_or_else(|| panic!("{what}: no `{n}`"));
                assert!(o.max_rel_error < 1e-4, "{what}: `{n}` off by {:.3e}", o.max_rel_error);
            }
        }
    }
}

/// A partial run (`functional::mesh::setup_partial` / `outputs_partial`, a development aid) of a program
/// with a refused region: no compiled program of a shipped tiny model is refused by region any more, so
/// the test refuses one by hand, gpt-tiny's `l0.ffn.up.wgrad` in its training step. A whole run refuses
/// the program; the partial run computes everything not downstream of the region, within 1e-4 as a whole
/// run does, reads back the intermediate tensors the output gateways passed on (`values::TAP`), and
/// names the results no PE holds (c_fc's gradients and their Adam outputs, downstream of the mark).
#[test]
fn a_partial_run_computes_what_is_upstream_of_a_refused_region() {
    let mut s = step("gpt-tiny", 32, 16, DType::Fp32);
    let mut data = (**s.prog.data.as_ref().expect("data table")).clone();
    let mut refused = 0;
    for (t, tasks) in s.prog.templates.iter().zip(data.tasks.iter_mut()) {
        if t.name.starts_with("l0.ffn.up.wgrad.") {
            tasks.iter_mut().for_each(|td| *td = TaskData::Refused);
            refused += 1;
        }
    }
    assert!(refused > 0, "no template of `l0.ffn.up.wgrad`");
    data.unsupported.push("region `l0.ffn.up.wgrad`: refused by the test".into());
    s.prog.data = Some(Arc::new(data));
    let (g, v) = (&s.run.graph, &s.run.values);
    let why = functional::mesh::setup(&s.prog, g, &s.numerics, v).expect_err("a whole run refuses it").to_string();
    assert!(why.contains("refused by the test"), "{why}");
    let setup = functional::mesh::setup_partial(&s.prog, g, &s.numerics, v).expect("partial setup");
    let eopts = EngineOptions::new(Fidelity::Detailed, 1);
    let (_, results) = engine::run_functional(&s.prog, &eopts, Arc::new(setup)).expect("partial run");
    let (outs, missing) = functional::mesh::outputs_partial(&s.prog, g, &results, v).expect("partial outputs");
    assert!(!missing.is_empty(), "nothing downstream of the refused region");
    for m in &missing {
        assert!(m.contains("c_fc") || m.starts_with("l0.ffn.up.wgrad"), "`{m}` is not downstream of it");
    }
    for o in &outs {
        assert!(o.max_rel_error < 1e-4, "`{}` off by {:.3e}", o.name, o.max_rel_error);
        assert!(!o.name.contains("h.0.mlp.c_fc"), "`{}` computed downstream of the refused region", o.name);
    }
    let names: Vec<&str> = outs.iter().map(|o| o.name.as_str()).collect();
    for want in ["head.loss", "h.1.mlp.c_fc.weight.adam_m.next", "l0.ffn.gelu"] {
        assert!(names.contains(&want), "no `{want}` among {names:?}");
    }
}

/// fp16 and bf16 training (values stored and sent in the dtype, fp32 arithmetic, fp32 Adam state and
/// master weights) of every dense tiny model is within the bound the rounding model states for each
/// result (`functional::mesh::training_bound`: the loss, gradients and m' within 8 storage roundings of
/// the tensor's largest value, v' twice that, the master w' in fp32's bound and w' one storage ulp more,
/// elements with a gradient below the noise floor within what noise moves), on the meshes the fp32 test
/// uses. Every result of a training step carries a bound.
#[test]
fn fp16_and_bf16_training_is_within_the_rounding_models_bound() {
    for dtype in [DType::Fp16, DType::Bf16] {
        for name in TINY.iter().chain(&["bert-tiny"]) {
            for mesh in if *name == "bert-tiny" { &[64][..] } else { &[32, 64][..] } {
                let s = step(name, *mesh, 16, dtype);
                let (_, outs) = s.whole(s.setup(), 1);
                let what = format!("{name} {} on {mesh}x{mesh}", dtype.name());
                assert!(outs.iter().any(|o| o.name.ends_with("loss")), "{what}: no loss");
                for o in &outs {
                    let b = o.bound.unwrap_or_else(|| panic!("{what}: `{}` has no bound", o.name));
                    assert!(o.max_rel_error <= b, "{what}: `{}` off by {:.3e}, bound {b:.3e}", o.name, o.max_rel_error);
                }
                // The step really ran in the dtype: the reference's w' as stored is its master copy rounded.
                let (w, _, next) = &s.adams()[0];
                let by = |n: &str| find(&outs, n).unwrap_or_else(|| panic!("{what}: no `{n}`")).tensor;
                let (stored, master) = (s.run.values.f(by(&next[0])), s.run.values.f(by(&next[3])));
                assert!(stored != master, "{what}: `{w}` w' is not rounded in the reference");
            }
        }
    }
}

/// The fp16/bf16 bound still catches wrong values: other labels on the wafer put the loss's gradient,
/// the first layer's and the moments outside it; and in a right run, moving one element of the master
/// w' by more than noise can (where its gradient is below the noise floor) or by a little (above it)
/// puts the weight outside its bound.
#[test]
fn the_fp16_and_bf16_bounds_catch_wrong_values() {
    for dtype in [DType::Fp16, DType::Bf16] {
        let s = step("gpt-tiny", 32, 16, dtype);
        let mut setup = s.setup();
        let labels = s.run.graph.tensors.iter().position(|t| t.name == "labels").expect("labels") as u32;
        let old = setup.tensors[&labels].clone();
        let shifted: Arc<[f32]> = old.iter().map(|&l| if l >= 0.0 { (l + 1.0) % 256.0 } else { l }).collect();
        setup.tensors.insert(labels, shifted);
        let (_, outs) = s.whole(setup, 1);
        let qkv = s.adams().into_iter().find(|a| a.0 == "h.0.attn.c_attn.weight").expect("c_attn").1;
        for n in [
            qkv.as_str(),
            "ln_f.weight.adam_m.next",
            "h.1.mlp.c_fc.weight.adam_v.next",
            "h.0.attn.c_attn.weight.adam_m.next",
            "wpe.weight.adam_m.next",
        ] {
            let o = find(&outs, n).unwrap_or_else(|| panic!("no `{n}`"));
            assert!(!o.within_bound(), "{}: other labels: `{n}` off by only {:.3e}", dtype.name(), o.max_rel_error);
        }

        let (_, outs) = s.whole(s.setup(), 1);
        let a = functional::AdamConfig::default();
        let (w, grad, next) = s.adams().into_iter().find(|a| a.0 == "h.1.mlp.c_fc.weight").expect("c_fc");
        let master = find(&outs, &next[3]).expect("master w'");
        assert!(master.within_bound(), "{w}: {:.3e}", master.max_rel_error);
        let g = s.run.values.f(s
            .run
            .graph
            .tensors
            .iter()
            .position(|t| t.name == grad)
            .map(|i| waferscale::graph::TensorId(i as u32))
            .expect("gradient"));
        let gmax = g.iter().fold(0f32, |m, &x| m.max(x.abs()));
        let floor = functional::mesh::STORAGE_ROUNDINGS as f32 * functional::mesh::unit_roundoff(dtype) as f32 * gmax;
        let small = g.iter().position(|x| x.abs() < floor).expect("an element below the noise floor");
        let large = g.iter().position(|x| x.abs() > 2.0 * floor).expect("an element above the noise floor");
        let wmax = master.values.iter().fold(0f32, |m, &x| m.max(x.abs()));
        for (i, by) in [(small, 2.5 * a.lr as f32), (large, 1e-3 * wmax)] {
            let mut v = master.values.clone();
            v[i] += by;
            let (err, _, bound) =
                functional::mesh::adam_error(&s.run.graph, master.tensor, &v, &s.run.values).expect("an Adam output");
            assert!(err > bound, "{}: `{w}` master moved by {by:e} at {i}: {err:.3e} within {bound:.3e}", dtype.name());
        }
    }
}

/// The q/k weight gradients, measured against the size of the softmax gradient's terms carried to them
/// (`functional::mesh::gradient_terms`, larger than the gradient itself because dS's rows cancel), are
/// still caught wrong: one element of m' moved by 5% of the terms' size, or the whole gradient doubled
/// (summed twice), is outside the bound in fp16 and bf16, and the right run is within it.
#[test]
fn a_wrong_q_or_k_gradient_is_caught() {
    let a = functional::AdamConfig::default();
    for dtype in [DType::Fp16, DType::Bf16] {
        let s = step("llama-tiny", 32, 16, dtype);
        let (_, outs) = s.whole(s.setup(), 1);
        for proj in ["q_proj", "k_proj"] {
            let w = format!("model.layers.0.self_attn.{proj}.weight");
            let (_, grad, next) = s.adams().into_iter().find(|x| x.0 == w).expect("q/k Adam");
            let m = find(&outs, &next[1]).unwrap_or_else(|| panic!("no `{}`", next[1]));
            let what = format!("{} `{}`", dtype.name(), m.name);
            assert!(m.within_bound(), "{what}: {:.3e}", m.max_rel_error);
            let g = waferscale::graph::TensorId(
                s.run.graph.tensors.iter().position(|t| t.name == grad).expect("gradient") as u32,
            );
            let terms = functional::mesh::gradient_terms(&s.run.graph, &s.run.values, g);
            let r = s.run.values.f(m.tensor);
            let top = (0..r.len()).max_by(|&i, &j| r[i].abs().total_cmp(&r[j].abs())).expect("elements");
            let mut moved = m.values.clone();
            moved[top] += (0.05 * (1.0 - a.beta1) * terms) as f32;
            let doubled: Vec<f32> = m.values.iter().map(|x| 2.0 * x).collect();
            for (how, v) in [("one element moved", moved), ("doubled", doubled)] {
                let (err, _, bound) =
                    functional::mesh::adam_error(&s.run.graph, m.tensor, &v, &s.run.values).expect("an Adam output");
                assert!(err > bound, "{what} {how}: {err:.3e} within {bound:.3e}");
            }
        }
    }
}

/// The CLI applies the bound: fp16 and bf16 training runs say every result is within it and exit 0.
#[test]
fn the_cli_checks_fp16_and_bf16_training_against_the_bound() {
    for dtype in ["fp16", "bf16"] {
        let a = ["run", "llama-tiny", "--phase", "train", "--seq", "16", "--mesh", "32x32", "--functional"];
        let (code, out, stderr) = wafer(&[&a[..], &["--dtype", dtype]].concat());
        assert_eq!(code, 0, "{dtype}: {stderr}");
        assert!(out.contains("every result within its bound from the rounding model"), "{dtype}: {out}");
        assert!(out.contains(".adam_v.next") && out.contains("(bound "), "{dtype}: {out}");
    }
}
