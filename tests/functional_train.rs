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
use waferscale::engine::{self, EngineOptions, Fidelity};
use waferscale::functional::mesh::MeshOutput;
use waferscale::functional::{self, Options, Precision, Tokens, WeightSource};
use waferscale::hw::WaferHw;
use waferscale::model::{self, DType, Model, Phase, WorkloadArgs};

const TINY: [&str; 4] = ["gpt-tiny", "llama-tiny", "neox-tiny", "gptj-tiny"];

/// A partial functional run of one pipelined training step of `name` on a `mesh` x `mesh` WSE-2
/// rectangle: the results computed in full (each beside the reference) and the names of those that were
/// not (downstream of a refused region).
fn partial(name: &str, mesh: u32, seq: u64, dtype: DType, threads: usize) -> (Vec<MeshOutput>, Vec<String>) {
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
    let setup = functional::mesh::setup_partial(&prog, &run.graph, &numerics, &run.values).expect("setup");
    let eopts = EngineOptions::new(Fidelity::Detailed, threads);
    let (_, results) = engine::run_functional(&prog, &eopts, Arc::new(setup)).expect("partial run");
    functional::mesh::outputs_partial(&prog, &run.graph, &results, &run.values).expect("outputs")
}

fn find<'a>(outs: &'a [MeshOutput], name: &str) -> Option<&'a MeshOutput> {
    outs.iter().find(|o| o.name == name)
}

/// The step's loss, as the wafer computes it, matches the reference in fp32 for every dense tiny model,
/// on meshes small and large enough for both linear algorithms.
#[test]
fn the_loss_matches_the_reference() {
    for name in TINY {
        for mesh in [32, 64] {
            let (outs, missing) = partial(name, mesh, 16, DType::Fp32, 1);
            let what = format!("{name} on {mesh}x{mesh}");
            let loss = find(&outs, "head.loss").unwrap_or_else(|| panic!("{what}: no loss; not computed: {missing:?}"));
            assert!(loss.max_rel_error < 1e-4, "{what}: loss off by {:.3e}", loss.max_rel_error);
            for o in &outs {
                assert!(o.max_rel_error < 1e-4, "{what}: `{}` off by {:.3e}", o.name, o.max_rel_error);
            }
        }
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
