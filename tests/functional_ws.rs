//! Functional runs of weight-streaming programs (`wafer run --mode weight-streaming --functional`): the
//! layers fold into one loop whose regions run once per layer, every layer's weights stream in from
//! MemoryX, embedding rows are looked up in MemoryX, and the hidden state loops back from the end of the
//! layer to its start on the wafer. The values the PEs compute match the reference in fp32, the timing
//! report is the one without values, and a MemoryX that streams the wrong layer's weights is caught.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;
use support::{check_error, functional_json, run_json, wafer};
use waferscale::compile::{compile_model, CompileOptions, Mode};
use waferscale::engine::{self, EngineOptions, Fidelity};
use waferscale::functional::{self, Options, Tokens, WeightSource};
use waferscale::hw::WaferHw;
use waferscale::mesh::data::{Kernel, LoopMap, TaskData};
use waferscale::model::{self, DType, Model, Phase, WorkloadArgs};

const WS: [&str; 4] = ["--mode", "weight-streaming", "--dtype", "fp32"];

/// `wafer run ARGS --functional --json` (weight streaming, fp32): the report without `host`, the
/// max relative error of the check line, and stderr.
fn functional(args: &[&str]) -> (Value, f64, String) {
    functional_json(&[args, &WS[..]].concat())
}

fn timing_only(args: &[&str]) -> Value {
    run_json(&[args, &WS[..]].concat()).0
}

/// The plan must really be a folded loop (else the test would check a pipelined run).
fn assert_folded(stderr: &str, report: &Value, what: &str) {
    let notes = report.to_string();
    assert!(notes.contains("stream in from MemoryX once per layer"), "{what}: not a weight-streaming loop:\n{stderr}");
}

/// Prefill of every dense tiny model under weight streaming, on meshes where the linears run as
/// gemv-broadcast and gemv-tree (16x16, 32x32), at a short and at the full length (token chunks through
/// every folded region): the logits (BERT: the last layer's hidden states and the pooler output) and
/// every layer's K and V cache match the reference within 1e-4.
#[test]
fn weight_streaming_prefill_matches_the_reference() {
    for mesh in ["16x16", "32x32"] {
        for model in ["gpt-tiny", "llama-tiny", "neox-tiny", "gptj-tiny", "bert-tiny", "mixtral-tiny"] {
            for seq in ["16", "128"] {
                let args = [model, "--hw", "wse2", "--mesh", mesh, "--phase", "prefill", "--seq", seq];
                let (report, err, stderr) = functional(&args);
                let what = format!("{model} prefill of {seq} tokens on {mesh}");
                assert_folded(&stderr, &report, &what);
                assert!(err < 1e-4, "{what}: max relative error {err}");
                // Every layer's result is read back, not only the first layer's.
                let last = if model == "bert-tiny" { "l1.norm2" } else { "l1.attn.k_cache_append" };
                assert!(stderr.contains(last), "{what}: no read-back of `{last}`:\n{stderr}");
            }
        }
    }
}

/// Decode of one token after 15 of context under weight streaming (every layer's KV cache resident in
/// its folded attention region), on two meshes: the logits and the caches match the reference.
#[test]
fn weight_streaming_decode_matches_the_reference() {
    for mesh in ["16x16", "32x32"] {
        for model in ["gpt-tiny", "llama-tiny", "neox-tiny", "gptj-tiny", "mixtral-tiny"] {
            let args = [model, "--hw", "wse2", "--mesh", mesh, "--phase", "decode", "--context", "15"];
            let (report, err, stderr) = functional(&args);
            let what = format!("{model} decode on {mesh}");
            assert_folded(&stderr, &report, &what);
            assert!(err < 1e-4, "{what}: max relative error {err}");
        }
    }
}

/// Decode over several tokens under weight streaming, each step from the caches every layer's
/// attention left on the wafer: the logits are the reference's prefill of the sequence.
#[test]
fn weight_streaming_decodes_several_tokens() {
    let mut a = vec!["run", "llama-tiny", "--hw", "wse2", "--mesh", "32x32", "--phase", "decode", "--context", "6"];
    a.extend(WS);
    a.extend(["--functional", "--decode-steps", "3"]);
    let (code, stdout, stderr) = wafer(&a);
    assert_eq!(code, 0, "{stderr}");
    let err = check_error(&stdout, "functional: decode of 3 tokens vs the reference prefill");
    assert!(err < 1e-4, "decode of 3 tokens: max relative error {err}");
}

/// The values only observe: a weight-streaming run's report is the same JSON with and without them.
#[test]
fn weight_streaming_timing_is_identical_with_and_without_values() {
    for args in [
        vec!["gpt-tiny", "--hw", "wse2", "--mesh", "32x32", "--phase", "prefill", "--seq", "16"],
        vec!["llama-tiny", "--hw", "wse2", "--mesh", "16x16", "--phase", "decode", "--context", "15"],
    ] {
        let (with, _, _) = functional(&args);
        assert_eq!(with, timing_only(&args), "{}", args.join(" "));
    }
}

/// Weight-streaming training stays refused by name (exit 2).
#[test]
fn weight_streaming_training_is_refused() {
    let mut a = vec!["run", "gpt-tiny", "--mesh", "32x32", "--phase", "train", "--seq", "8"];
    a.extend(WS);
    a.push("--functional");
    let (code, _, stderr) = wafer(&a);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("functional mode does not support this yet"), "{stderr}");
    assert!(stderr.contains("weight-streaming training"), "{stderr}");
}

/// The layers' weights really stream in, layer by layer: with MemoryX made to stream the first layer's
/// tensors in every iteration, the second layer's compute finds its weights missing and the run stops
/// naming the PE and the weight; as compiled, the same run matches the reference.
#[test]
fn a_memoryx_streaming_the_wrong_layer_is_caught() {
    let model = model::load("gpt-tiny").expect("model");
    let args = WorkloadArgs {
        phase: Some(Phase::Prefill),
        seq: Some(16),
        dtype: Some(DType::Fp32),
        batch: Some(1),
        ..WorkloadArgs::default()
    };
    let w = args.resolve(&model).expect("workload");
    let doc = waferscale::hw::load_with_overrides("wse2", &[]).expect("wse2");
    let hw = WaferHw::from_doc(&doc).expect("wafer").with_mesh(32, 32).expect("mesh");
    let opts = CompileOptions { mode: Some(Mode::WeightStreaming), ..CompileOptions::default() };
    let (_, c) = compile_model(&model, &w, &hw, &opts).expect("compile");
    let prog = c.step_programs().expect("programs").remove(0).1;
    let vocab = match &model {
        Model::Transformer(s) => s.vocab,
        Model::Op(_) => unreachable!("a transformer"),
    };
    let tokens = Tokens::seeded(3, 1, 16, vocab);
    let run = functional::run::<f32>(&model, &w, &WeightSource::Seeded(7), &tokens, &Options::default()).expect("ref");
    let numerics = functional::numerics_of(&model).expect("numerics");
    let eopts = EngineOptions::new(Fidelity::Detailed, 1);

    let setup = functional::mesh::setup(&prog, &run.graph, &numerics, &run.values).expect("setup");
    let (_, results) = engine::run_functional(&prog, &eopts, Arc::new(setup)).expect("run as compiled");
    let outs = functional::mesh::outputs(&prog, &run.graph, &results, &run.values).expect("outputs");
    let worst = outs.iter().map(|o| o.max_rel_error).fold(0.0, f64::max);
    assert!(worst < 1e-4, "as compiled: {worst}");

    // Every port's looped Source on a loop that maps nothing: the first layer's tensors every time.
    let mut data = (**prog.data.as_ref().expect("data table")).clone();
    let iters = data.loops.first().map_or(0, |l| l.maps.len());
    assert!(iters == 2, "gpt-tiny folds 2 layers, the table has {iters} iterations");
    let stuck = data.loops.len() as u32;
    data.loops.push(LoopMap { maps: vec![BTreeMap::new(); iters] });
    let mut bent = 0;
    for td in data.tasks.iter_mut().flatten() {
        if let TaskData::Looped { kernel: Kernel::Source { .. }, lp, .. } = td {
            *lp = stuck;
            bent += 1;
        }
    }
    assert!(bent > 0, "no looped MemoryX source in the table");
    let mut wrong = prog.clone();
    wrong.data = Some(Arc::new(data));
    let setup = functional::mesh::setup(&wrong, &run.graph, &numerics, &run.values).expect("setup");
    let err = engine::run_functional(&wrong, &eopts, Arc::new(setup)).expect_err("the wrong layer's weights");
    let msg = err.to_string();
    assert!(msg.contains("has not streamed in whole"), "{msg}");
}
