//! Training in functional mode (`wafer run --phase train --functional`): one step's loss, gradients and
//! updated weights computed by the emulated PEs of a pipelined training program, against the reference.
//!
//! Training is not covered in full yet: a region whose op has no data semantics on the mesh is refused
//! by name (exit 2). `partial` runs the regions that have them (a partial run: refused regions and
//! everything downstream of them run without values) and checks every result computed in full, so each
//! op that gains data semantics is held to the reference here as it lands.

mod support;

use std::sync::Arc;

use support::wafer;
use waferscale::compile::{compile_model, CompileOptions};
use waferscale::engine::values::Setup;
use waferscale::engine::{self, EngineOptions, EngineRun, Fidelity};
use waferscale::functional::mesh::MeshOutput;
use waferscale::functional::{self, Options, Precision, Tokens, WeightSource};
use waferscale::hw::WaferHw;
use waferscale::model::{self, DType, Model, Phase, WorkloadArgs};

const TINY: [&str; 4] = ["gpt-tiny", "llama-tiny", "neox-tiny", "gptj-tiny"];

/// One pipelined training step of `name` on a `mesh` x `mesh` WSE-2 rectangle, compiled, with the
/// reference's run of the same step (seeded weights and tokens).
struct Step {
    prog: waferscale::mesh::MeshProgram,
    run: functional::Run<f32>,
    numerics: functional::Numerics,
}

fn step(name: &str, mesh: u32, seq: u64, dtype: DType) -> Step {
    let model = model::load(name).expect("model");
    let args = WorkloadArgs {
        phase: Some(Phase::Train),
        seq: Some(seq),
        dtype: Some(dtype),
        batch: Some(1),
        ..WorkloadArgs::default()
    };
    let w = args.resolve(&model).expect("workload");
    let doc = waferscale::hw::load_with_overrides("wse2", &[]).expect("wse2");
    let hw = WaferHw::from_doc(&doc).expect("wafer").with_mesh(mesh, mesh).expect("mesh");
    let (_, c) = compile_model(&model, &w, &hw, &CompileOptions::default()).expect("compile");
    let mut progs = c.step_programs().expect("programs");
    assert_eq!(progs.len(), 1, "{name}: pipelined training is one program");
    let prog = progs.remove(0).1;
    let vocab = match &model {
        Model::Transformer(s) => s.vocab,
        Model::Op(_) => unreachable!("a transformer"),
    };
    let tokens = Tokens::seeded(3, 1, seq as usize, vocab);
    let precision = if dtype == DType::Fp32 { Precision::Exact } else { Precision::Storage };
    let opts = Options { precision, ..Options::default() };
    let run = functional::run::<f32>(&model, &w, &WeightSource::Seeded(7), &tokens, &opts).expect("reference");
    let numerics = functional::numerics_of(&model).expect("numerics");
    Step { prog, run, numerics }
}

impl Step {
    /// The error of a result: its max relative error, except for an updated weight (Adam's first
    /// output), where elements whose reference gradient is below 100 x Adam's epsilon are held to the
    /// learning rate instead: there the step `lr * m / (sqrt(v) + eps)` turns the gradient's last bits
    /// (a sum that cancels to about 1e-9, where fp32 sums in another order differ by as much) into an
    /// update anywhere between 0 and `lr`, so no order of sums matches it closer.
    fn weight_error(&self, o: &MeshOutput) -> f64 {
        let g = &self.run.graph;
        let adam = g.op_ids().map(|i| g.op(i)).find(|op| {
            matches!(op.kind, waferscale::graph::OpKind::Adam { .. }) && op.outputs.first() == Some(&o.tensor)
        });
        let Some(op) = adam else { return o.max_rel_error };
        let (r, grad) = (self.run.values.f(o.tensor), self.run.values.f(op.inputs[1]));
        let lr = functional::AdamConfig::default().lr;
        let (eps, scale) = (functional::AdamConfig::default().eps, r.iter().fold(0f32, |a, &b| a.max(b.abs())) as f64);
        let mut worst = 0f64;
        for ((&m, &x), &gr) in o.values.iter().zip(r).zip(grad) {
            let d = (m - x).abs() as f64;
            if (gr.abs() as f64) < 100.0 * eps {
                assert!(d <= lr, "`{}`: an update off by {d:.3e}, more than the learning rate", o.name);
            } else {
                worst = worst.max(d / scale.max(f64::MIN_POSITIVE));
            }
        }
        worst
    }

    fn setup(&self) -> Setup {
        functional::mesh::setup_partial(&self.prog, &self.run.graph, &self.numerics, &self.run.values).expect("setup")
    }

    /// A partial run from `setup`: the engine's run, the results computed in full (each beside the
    /// reference) and the names of those that were not (downstream of a refused region).
    fn partial(&self, setup: Setup, threads: usize) -> (EngineRun, Vec<MeshOutput>, Vec<String>) {
        let eopts = EngineOptions::new(Fidelity::Detailed, threads);
        let (erun, results) = engine::run_functional(&self.prog, &eopts, Arc::new(setup)).expect("partial run");
        let (outs, missing) =
            functional::mesh::outputs_partial(&self.prog, &self.run.graph, &results, &self.run.values)
                .expect("outputs");
        (erun, outs, missing)
    }
}

fn find<'a>(outs: &'a [MeshOutput], name: &str) -> Option<&'a MeshOutput> {
    outs.iter().find(|o| o.name == name)
}

/// What the wafer computes of one training step of every dense tiny model matches the reference in
/// fp32 within 1e-4, on meshes small and large enough for both linear algorithms: the loss, every
/// region's output its gateways passed on (activations, the loss gradient, data gradients, weight
/// gradients), and every Adam update it reached (w', m', v', each element read back from the Adam
/// regions); gpt-tiny reaches at least the updates of the last block's MLP and the final norm.
#[test]
fn the_step_matches_the_reference_as_far_as_it_runs() {
    for name in TINY {
        for mesh in [32, 64] {
            let s = step(name, mesh, 16, DType::Fp32);
            let (_, outs, missing) = s.partial(s.setup(), 1);
            let what = format!("{name} on {mesh}x{mesh}");
            let loss = find(&outs, "head.loss").unwrap_or_else(|| panic!("{what}: no loss; not computed: {missing:?}"));
            assert!(loss.max_rel_error < 1e-4, "{what}: loss off by {:.3e}", loss.max_rel_error);
            for o in &outs {
                let err = s.weight_error(o);
                assert!(err < 1e-4, "{what}: `{}` off by {err:.3e}", o.name);
            }
            assert!(find(&outs, "head.loss.grad").is_some(), "{what}: no loss gradient");
            if name == "gpt-tiny" {
                for t in ["h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.bias", "ln_f.weight", "ln_f.bias"] {
                    for s in ["", ".adam_m", ".adam_v"] {
                        let n = format!("{t}{s}.next");
                        assert!(find(&outs, &n).is_some(), "{what}: `{n}` not computed; not computed: {missing:?}");
                    }
                }
                assert!(find(&outs, "head.logits.wgrad").is_some(), "{what}: no head weight gradient");
            }
        }
    }
}

/// The check would catch a wrong gradient: the same step on the wafer with other labels than the
/// reference's gives a loss, gradients and Adam moments off by far more than the bound.
#[test]
fn other_labels_on_the_wafer_are_caught_in_the_loss_gradients_and_updates() {
    let s = step("gpt-tiny", 32, 16, DType::Fp32);
    let mut setup = s.setup();
    let labels = s.run.graph.tensors.iter().position(|t| t.name == "labels").expect("labels") as u32;
    let old = setup.tensors[&labels].clone();
    let shifted: Arc<[f32]> = old.iter().map(|&l| if l >= 0.0 { (l + 1.0) % 256.0 } else { l }).collect();
    setup.tensors.insert(labels, shifted);
    let (_, outs, _) = s.partial(setup, 1);
    let off = |n: &str| find(&outs, n).map_or(0.0, |o| o.max_rel_error);
    assert!(off("head.loss") > 1e-3, "loss {:.3e}", off("head.loss"));
    assert!(off("head.logits.wgrad") > 1e-3, "head weight gradient {:.3e}", off("head.logits.wgrad"));
    assert!(off("ln_f.weight.adam_m.next") > 1e-3, "ln_f m' {:.3e}", off("ln_f.weight.adam_m.next"));
    assert!(off("h.1.mlp.c_fc.weight.adam_v.next") > 1e-3, "c_fc v' {:.3e}", off("h.1.mlp.c_fc.weight.adam_v.next"));
}

/// Values observe, never steer: the training step's timing is the same with and without values, and
/// its values are the same for 1 and 3 engine threads.
#[test]
fn timing_is_the_same_with_values_and_values_for_any_thread_count() {
    let s = step("gpt-tiny", 32, 16, DType::Fp32);
    let plain = engine::run(&s.prog, &EngineOptions::new(Fidelity::Detailed, 1)).expect("timing run");
    let (with, outs1, _) = s.partial(s.setup(), 1);
    assert_eq!(format!("{plain:?}"), format!("{with:?}"), "timing changed with values");
    let (_, outs3, _) = s.partial(s.setup(), 3);
    assert_eq!(outs1.len(), outs3.len());
    for (a, b) in outs1.iter().zip(&outs3) {
        assert_eq!((&a.name, &a.values), (&b.name, &b.values), "values differ between 1 and 3 threads");
    }
}

/// What is not covered yet is refused by name: the CLI exits 2 naming a region, its op and algorithm.
#[test]
fn uncovered_training_is_refused_by_region_and_op() {
    for name in TINY {
        let a = ["run", name, "--phase", "train", "--seq", "16", "--mesh", "32x32", "--dtype", "fp32", "--functional"];
        let (code, _, stderr) = wafer(&a);
        assert_eq!(code, 2, "{name}: {stderr}");
        assert!(stderr.contains("functional mode does not support this yet: region `"), "{name}: {stderr}");
        assert!(stderr.contains(" with "), "{name}: no op and algorithm named: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
}
