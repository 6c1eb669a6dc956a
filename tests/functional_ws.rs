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
use waferscale::functional::mesh::{MeshOutput, Phased};
use waferscale::functional::{self, Options, Tokens, WeightSource};
use waferscale::graph::OpKind;
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

/// One weight-streaming training step of `name` on a `mesh` x `mesh` WSE-2 rectangle, compiled (its two
/// phases), with the reference's run of the same step (seeded weights and tokens).
struct TrainStep {
    programs: Vec<(String, waferscale::mesh::MeshProgram)>,
    run: functional::Run<f32>,
    numerics: functional::Numerics,
}

fn train_step(name: &str, mesh: u32, dtype: DType) -> TrainStep {
    train_step_of(name, mesh, dtype, 16)
}

fn train_step_of(name: &str, mesh: u32, dtype: DType, seq: u64) -> TrainStep {
    let (_, programs, run, numerics) = support::seeded_train_step(name, mesh, seq, dtype, Some(Mode::WeightStreaming));
    let names: Vec<&str> = programs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["forward", "backward"], "{name}: weight-streaming training runs as two phases");
    TrainStep { programs, run, numerics }
}

impl TrainStep {
    fn phases(&self, threads: usize) -> Phased {
        let eopts = vec![EngineOptions::new(Fidelity::Detailed, threads); self.programs.len()];
        let (g, v) = (&self.run.graph, &self.run.values);
        functional::mesh::run_phases(&self.programs, g, &self.numerics, v, &eopts).expect("phases")
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

fn find<'a>(outs: &'a [MeshOutput], name: &str) -> &'a MeshOutput {
    outs.iter().find(|o| o.name == name).unwrap_or_else(|| panic!("no `{name}` in the results"))
}

/// Weight-streaming training of every tiny model on the mesh, in fp32: the forward phase (its loss), the
/// activations it saves to MemoryX (checked as results), the backward phase from what MemoryX streams
/// back, the weight gradients it sends out, and MemoryX's optimizer: the loss, every weight's gradient,
/// w', m' and v' within 1e-4 of the reference (noise-floor elements as in pipelined training), on meshes
/// where the linears run as gemv-broadcast and gemv-tree. Mixtral's experts save their activations in
/// the dispatched layout (capacity-major slots, with the copies over capacity dropped: 16 tokens drop
/// some), which cross MemoryX and come back for the experts' and the router's gradients.
#[test]
fn weight_streaming_training_matches_the_reference() {
    for (name, mesh) in [
        ("gpt-tiny", 32),
        ("llama-tiny", 32),
        ("neox-tiny", 32),
        ("gptj-tiny", 32),
        ("bert-tiny", 32),
        ("mixtral-tiny", 32),
        ("gpt-tiny", 64),
        ("llama-tiny", 64),
        ("mixtral-tiny", 64),
    ] {
        let s = train_step(name, mesh, DType::Fp32);
        let outs = s.phases(1).outputs;
        let what = format!("{name} on {mesh}x{mesh}");
        let losses: Vec<&MeshOutput> = outs.iter().filter(|o| o.name.ends_with("loss")).collect();
        assert!(!losses.is_empty(), "{what}: no loss");
        for o in &outs {
            assert!(o.max_rel_error < 1e-4, "{what}: `{}` off by {:.3e}", o.name, o.max_rel_error);
        }
        let adams = s.adams();
        assert!(adams.len() >= 10, "{what}: {} weights", adams.len());
        for (w, grad, next) in &adams {
            assert!(find(&outs, grad).max_rel_error < 1e-4, "{what}: gradient of `{w}`");
            for n in next {
                assert!(find(&outs, n).max_rel_error < 1e-4, "{what}: `{n}`");
            }
        }
        // The saved activations crossed through MemoryX and were checked too.
        assert!(outs.iter().any(|o| o.name == "l1.norm1"), "{what}: no saved activation in the check");
        if name == "mixtral-tiny" {
            for saved in ["l0.ffn.topk", "l0.ffn.dispatch", "l1.ffn.experts.gate", "l1.ffn.experts.swiglu"] {
                assert!(outs.iter().any(|o| o.name == saved), "{what}: `{saved}` not saved and checked");
            }
            let dropped: usize = s.run.values.moe_dropped.iter().map(|d| d.1).sum();
            assert!(dropped > 0, "{what}: no copy dropped over capacity");
            for grad in ["l0.ffn.experts.down.wgrad", "l1.ffn.experts.gate.wgrad", "l0.ffn.router.wgrad"] {
                assert!(find(&outs, grad).max_rel_error < 1e-4, "{what}: `{grad}`");
            }
        }
    }
}

/// fp16 and bf16 weight-streaming training is within the rounding model's bound for every result
/// (`functional::mesh::training_bound`), as pipelined training is. (On 64x64 the q/k weight gradients
/// are within it since they are measured against the softmax gradient's terms, but on WSE-2 llama-tiny
/// fp16's `l0.ffn.residual.grad_sum` is at 1.02 of it: a residual gradient past the norm's gradient,
/// where the score path's terms are not carried yet.)
#[test]
fn weight_streaming_training_in_fp16_and_bf16_is_within_the_bound() {
    for dtype in [DType::Fp16, DType::Bf16] {
        for name in ["gpt-tiny", "llama-tiny", "neox-tiny", "gptj-tiny", "bert-tiny", "mixtral-tiny"] {
            let s = train_step(name, 32, dtype);
            let outs = s.phases(1).outputs;
            for o in &outs {
                let b = o.bound.unwrap_or_else(|| panic!("{name}: `{}` has no bound", o.name));
                let what = format!("{name} {} on 32x32: `{}`", dtype.name(), o.name);
                assert!(o.max_rel_error <= b, "{what} off by {:.3e}, bound {b:.3e}", o.max_rel_error);
            }
        }
    }
}

/// The backward phase really starts from what the forward phase left in MemoryX, and the optimizer
/// from the gradients the wafer sent: a saved activation changed in MemoryX between the phases moves
/// the gradients that depend on it past the bound, and a changed gradient moves its weight's update.
#[test]
fn what_crosses_memoryx_is_what_the_next_step_uses() {
    let s = train_step("gpt-tiny", 32, DType::Fp32);
    let (g, v) = (&s.run.graph, &s.run.values);
    let id = |n: &str| g.tensors.iter().position(|t| t.name == n).unwrap_or_else(|| panic!("no `{n}`")) as u32;
    let eopts = vec![EngineOptions::new(Fidelity::Detailed, 1); 2];
    let (gelu, up_grad) = (id("l0.ffn.gelu"), id("l1.ffn.up.wgrad.0"));
    let mut calls = 0;
    let done = functional::mesh::run_phases_with(&s.programs, g, &s.numerics, v, &eopts, |held| {
        calls += 1;
        let t = if calls == 1 { gelu } else { up_grad };
        let x = held.get(&t).unwrap_or_else(|| panic!("MemoryX holds no t{t}")).clone();
        held.insert(t, x.iter().map(|&x| x * 1.01).collect());
    })
    .expect("phases");
    assert_eq!(calls, 2, "once between the phases, once before MemoryX's own ops");
    let off = |n: &str| find(&done.outputs, n).max_rel_error;
    // The saved GELU output feeds layer 0's down projection's weight gradient.
    assert!(off("l0.ffn.down.wgrad.0") > 1e-3, "down_proj's gradient off by only {:.3e}", off("l0.ffn.down.wgrad.0"));
    assert!(
        off("h.1.mlp.c_fc.weight.adam_m.next") > 1e-3,
        "m' of c_fc off by only {:.3e}",
        off("h.1.mlp.c_fc.weight.adam_m.next")
    );
}

/// Values observe, never steer: each phase's timing is the same with and without values, and the values
/// are the same for 1 and 3 engine threads (a dense model and a mixture of experts, whose slot maps ride
/// with the dispatched rows as values).
#[test]
fn weight_streaming_training_timing_is_the_same_with_values_and_values_for_any_thread_count() {
    for model in ["llama-tiny", "mixtral-tiny"] {
        let s = train_step(model, 32, DType::Fp32);
        let one = s.phases(1);
        for ((name, prog), with) in s.programs.iter().zip(&one.runs) {
            let plain = engine::run(prog, &EngineOptions::new(Fidelity::Detailed, 1)).expect("timing run");
            assert_eq!(format!("{plain:?}"), format!("{with:?}"), "{model} {name}: timing changed with values");
        }
        let three = s.phases(3);
        assert_eq!(one.outputs.len(), three.outputs.len());
        for (a, b) in one.outputs.iter().zip(&three.outputs) {
            assert_eq!((&a.name, &a.values), (&b.name, &b.values), "{model}: values differ for 1 and 3 threads");
        }
    }
}

/// Weight-streaming training of a mixture of experts with fewer tokens than experts / top_k (each copy
/// in its own slot, so two slots may hold one expert: the expert weight gradients' output gateways sum
/// the slots' blocks, `Kernel::ExpertSum`, in every iteration of the backward loop): mixtral-tiny with
/// one token and an 8-expert top-2 variant with two tokens match the reference within 1e-4 in fp32, and
/// each phase's timing is the run's without values.
#[test]
fn weight_streaming_training_with_fewer_tokens_than_experts_per_token_matches_the_reference() {
    for (name, seq) in [("mixtral-tiny", 1), ("tests/data/mixtral-tiny-8x2.json", 2)] {
        let s = train_step_of(name, 32, DType::Fp32, seq);
        let what = format!("{name} with {seq} tokens on 32x32");
        let g = &s.run.graph;
        let few = g.op_ids().any(|o| matches!(g.op(o).kind, OpKind::LinearWgrad(l) if l.groups < l.weight_groups));
        assert!(few, "{what}: every expert has a slot");
        let done = s.phases(1);
        for ((phase, prog), with) in s.programs.iter().zip(&done.runs) {
            let plain = engine::run(prog, &EngineOptions::new(Fidelity::Detailed, 1)).expect("timing run");
            assert_eq!(format!("{plain:?}"), format!("{with:?}"), "{what} {phase}: timing changed with values");
        }
        for o in &done.outputs {
            assert!(o.max_rel_error < 1e-4, "{what}: `{}` off by {:.3e}", o.name, o.max_rel_error);
        }
        for (w, grad, next) in &s.adams() {
            assert!(find(&done.outputs, grad).max_rel_error < 1e-4, "{what}: gradient of `{w}`");
            for n in next {
                assert!(find(&done.outputs, n).max_rel_error < 1e-4, "{what}: `{n}`");
            }
        }
    }
}

/// A MoE step in fp16/bf16 routes as the reference does where the router's logits are summed alike:
/// mixtral-tiny's weight-streaming step of 64 tokens (the CLI's seed 0) routed token 60 of layer 0 to
/// experts {2, 1} on the wafer and {2, 0} in the reference (probabilities 0.1771 and 0.1775) while the
/// router's partial sums crossed the fabric rounded to fp16; they travel in fp32 now, and the step
/// passes in fp16 and bf16 with every result within its bound.
#[test]
fn a_moe_step_routes_as_the_reference_in_fp16_and_bf16() {
    let a = ["run", "mixtral-tiny", "--hw", "cs2", "--mesh", "64x64", "--phase", "train", "--seq", "64"];
    for dtype in ["fp16", "bf16"] {
        let (code, _, stderr) =
            wafer(&[&a[..], &["--mode", "weight-streaming", "--dtype", dtype, "--functional"]].concat());
        assert_eq!(code, 0, "{dtype}: {stderr}");
        assert!(!stderr.contains("routing differs"), "{dtype}: {stderr}");
    }
}

/// Where the wafer settles a near-tie of router logits otherwise than the reference, the reference
/// follows the wafer's routing for that token (`functional::mesh::follow_routing`) and the step passes:
/// under weight streaming, 64 tokens in fp16 with seed 3 (layer 1's token 33 gets probabilities 0.5 and
/// 0.5 on the wafer, 0.49976 and 0.5 in the reference, so its copies take capacity in the other order);
/// pipelined, 128 tokens in fp16 with seed 7, where the top-k's probabilities are read back from its
/// output gateway. Each failed (exit 1) before.
#[test]
fn a_near_tie_the_wafer_settles_otherwise_is_followed() {
    for (mode, seq, seed) in [("weight-streaming", "64", "3"), ("pipelined", "128", "7")] {
        let a = ["run", "mixtral-tiny", "--hw", "cs2", "--mesh", "64x64", "--phase", "train", "--functional"];
        let b = ["--mode", mode, "--seq", seq, "--seed", seed, "--dtype", "fp16"];
        let (code, out, err) = wafer(&[&a[..], &b[..]].concat());
        assert_eq!(code, 0, "{mode} {seq} tokens seed {seed}: {err}");
        assert!(out.contains("the wafer settled 1 near-tie(s) of router logits otherwise"), "{mode}: {out}");
    }
}

/// Where the wafer's routing does differ (a near-tie settled otherwise), the check names the first
/// token routed otherwise: here a token's two chosen probabilities swapped in the wafer's saved top-k.
#[test]
fn a_routing_settled_otherwise_is_named() {
    let s = train_step("mixtral-tiny", 32, DType::Fp32);
    let done = s.phases(1);
    let g = &s.run.graph;
    assert_eq!(functional::mesh::routing_divergence(g, &done.outputs, &s.run.values), None);
    let mut outs = done.outputs.clone();
    let topk = outs.iter_mut().find(|o| o.name == "l0.ffn.topk").expect("the saved top-k is read back");
    let e = *topk.shape.last().unwrap() as usize;
    let row = &mut topk.values[3 * e..4 * e];
    let chosen: Vec<usize> = (0..e).filter(|&i| row[i] != 0.0).collect();
    let unchosen = (0..e).find(|i| !chosen.contains(i)).expect("top-k of more experts");
    row.swap(chosen[0], unchosen);
    let named = functional::mesh::routing_divergence(g, &outs, &s.run.values).expect("a divergence");
    assert!(named.starts_with("`l0.ffn.topk` routes token 3 to experts"), "{named}");
    // In fp32 nothing rounds: no routing otherwise is a near-tie the reference would follow.
    assert_eq!(functional::mesh::follow_routing(g, &outs, &s.run.values), Err(named));
    assert_eq!(functional::mesh::follow_routing(g, &done.outputs, &s.run.values), Ok(Default::default()));
}

/// A mixture of experts' backward phase really starts from the expert activations MemoryX holds: the
/// dispatched rows and the SwiGLU output of layer 0, changed in MemoryX between the phases, move the
/// gate and down projections' weight gradients (whose x they are) past the bound.
#[test]
fn saved_expert_activations_are_what_the_backward_phase_uses() {
    let s = train_step("mixtral-tiny", 32, DType::Fp32);
    let (g, v) = (&s.run.graph, &s.run.values);
    let id = |n: &str| g.tensors.iter().position(|t| t.name == n).unwrap_or_else(|| panic!("no `{n}`")) as u32;
    let eopts = vec![EngineOptions::new(Fidelity::Detailed, 1); 2];
    let (dispatch, swiglu) = (id("l0.ffn.dispatch"), id("l0.ffn.experts.swiglu"));
    let mut calls = 0;
    let done = functional::mesh::run_phases_with(&s.programs, g, &s.numerics, v, &eopts, |held| {
        calls += 1;
        if calls == 1 {
            for t in [dispatch, swiglu] {
                let x = held.get(&t).unwrap_or_else(|| panic!("MemoryX holds no t{t}")).clone();
                held.insert(t, x.iter().map(|&x| x * 1.01).collect());
            }
        }
    })
    .expect("phases");
    let off = |n: &str| find(&done.outputs, n).max_rel_error;
    for grad in ["l0.ffn.experts.gate.wgrad", "l0.ffn.experts.down.wgrad"] {
        assert!(off(grad) > 1e-3, "`{grad}` off by only {:.3e}", off(grad));
    }
    // Layer 1's experts read what layer 1 saved, untouched.
    assert!(off("l1.ffn.experts.down.wgrad") < 1e-4, "layer 1: {:.3e}", off("l1.ffn.experts.down.wgrad"));
}

/// `wafer run --mode weight-streaming --phase train --functional --out` exits 0 with the check, and its
/// file holds the loss and the updated weights (MemoryX's, gpt-tiny's tied embedding included) equal to
/// what `wafer reference --out` gives within the bound; the timing report is the one without values.
#[test]
fn the_cli_trains_under_weight_streaming_and_writes_the_updated_weights() {
    let dir = std::env::temp_dir().join(format!("wafer-ws-train-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (mesh_out, ref_out) = (dir.join("gpt.safetensors"), dir.join("gpt.ref.safetensors"));
    let w = ["--phase", "train", "--seq", "16", "--dtype", "fp32"];
    let m = mesh_out.to_str().expect("path");
    let base = [&["gpt-tiny", "--hw", "wse2", "--mesh", "32x32", "--mode", "weight-streaming"][..], &w].concat();
    let (code, out, stderr) = wafer(&[&["run"][..], &base, &["--functional", "--out", m]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("every result within its bound"), "{out}");
    assert!(out.contains("wte.weight.adam_v.next") && out.contains("phase backward"), "{out}");
    let (with, _, _) = functional_json(&base);
    assert_eq!(with, run_json(&base).0, "the timing report changed with values");
    let r = ref_out.to_str().expect("path");
    let (code, _, stderr) = wafer(&[&["reference", "gpt-tiny"][..], &w, &["--out", r]].concat());
    assert_eq!(code, 0, "{stderr}");
    let (mb, rb) = (std::fs::read(&mesh_out).expect("--out"), std::fs::read(&ref_out).expect("reference --out"));
    let ms = safetensors::SafeTensors::deserialize(&mb).expect("safetensors");
    let rs = safetensors::SafeTensors::deserialize(&rb).expect("safetensors");
    let f32s = |st: &safetensors::SafeTensors, n: &str| -> Vec<f32> {
        let t = st.tensor(n).unwrap_or_else(|_| panic!("no `{n}`"));
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
    };
    let (loss, want) = (f32s(&ms, "loss")[0], f32s(&rs, "loss")[0]);
    assert!((loss - want).abs() <= 1e-4 * want.abs(), "loss {loss} vs {want}");
    let lr = functional::AdamConfig::default().lr as f32;
    let floor = 100.0 * functional::AdamConfig::default().eps as f32;
    let mut weights = 0;
    for n in rs.names().into_iter().filter_map(|n| n.strip_prefix("updated.")) {
        let (got, want, grad) = (f32s(&ms, n), f32s(&rs, &format!("updated.{n}")), f32s(&rs, &format!("grad.{n}")));
        let scale = want.iter().fold(0f32, |a, &b| a.max(b.abs()));
        for ((&a, &b), &g) in got.iter().zip(&want).zip(&grad) {
            let bound = if g.abs() < floor { 2.0 * lr } else { 1e-4 * scale };
            assert!((a - b).abs() <= bound, "`{n}` in --out: {a} vs {b} (gradient {g:.3e})");
        }
        weights += 1;
    }
    assert!(weights >= 10, "{weights} updated weights in the reference's file");
    let _ = std::fs::remove_dir_all(&dir);
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

/// gpt-tiny's fp32 weight-streaming training step on 16x16, where `head.logits.wgrad` is 6 summa PEs
/// with a 64 x 128 block each: the block is one fp32 accumulator of 32 KiB (the plan's 33,280 bytes
/// with the double-buffered x panel), which the values' SRAM check counted twice (64 KiB, more than
/// the PE's 48 KiB) and stopped the run. It runs, and matches the reference as on 32x32.
#[test]
fn weight_streaming_training_on_16x16_fits_the_weight_gradient_blocks() {
    let s = train_step("gpt-tiny", 16, DType::Fp32);
    let outs = s.phases(1).outputs;
    assert!(outs.iter().any(|o| o.name.ends_with("loss")), "no loss");
    for o in &outs {
        assert!(o.max_rel_error < 1e-4, "gpt-tiny on 16x16: `{}` off by {:.3e}", o.name, o.max_rel_error);
    }
    let (w, grad, _) = s.adams().into_iter().find(|(w, ..)| w == "wte.weight").expect("wte's Adam");
    assert!(find(&outs, &grad).max_rel_error < 1e-4, "gradient of `{w}`");
}

/// A weight-streaming training step whose backward pass does not fit the wafer at once (16 x 16 PEs of
/// 20 KiB in fp32) runs the head's backward in a phase of its own, then the layer loop: the head's input
/// gradient leaves to MemoryX and comes back into the loop's first iteration (a restore into one
/// iteration of the loop, layer L - 1's tensor). llama-tiny and gpt-tiny (whose LM head is the tied
/// embedding, its gradient summed in MemoryX) match the reference within 1e-4 in fp32: the loss, the
/// crossing gradient, every weight's gradient, w', m' and v'; each phase's timing is the run's without
/// values.
#[test]
fn weight_streaming_training_with_the_head_in_its_own_phase_matches_the_reference() {
    for name in ["llama-tiny", "gpt-tiny"] {
        let sets = ["pe.sram_bytes=20480"];
        let (_, programs, run, numerics) =
            support::seeded_train_step_with(name, 16, &sets, 16, DType::Fp32, Some(Mode::WeightStreaming));
        let names: Vec<&str> = programs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["forward", "head-backward", "backward"], "{name}: the head's backward on its own");
        let s = TrainStep { programs, run, numerics };
        let done = s.phases(1);
        for ((phase, prog), with) in s.programs.iter().zip(&done.runs) {
            let plain = engine::run(prog, &EngineOptions::new(Fidelity::Detailed, 1)).expect("timing run");
            assert_eq!(format!("{plain:?}"), format!("{with:?}"), "{name} {phase}: timing changed with values");
        }
        let what = format!("{name} on 16x16 of 20 KiB PEs");
        assert!(done.outputs.iter().any(|o| o.name.ends_with("loss")), "{what}: no loss");
        assert!(find(&done.outputs, "head.norm.grad.0").max_rel_error < 1e-4, "{what}: the crossing gradient");
        for o in &done.outputs {
            assert!(o.max_rel_error < 1e-4, "{what}: `{}` off by {:.3e}", o.name, o.max_rel_error);
        }
        let adams = s.adams();
        assert!(adams.len() >= 10, "{what}: {} weights", adams.len());
        for (w, grad, next) in &adams {
            assert!(find(&done.outputs, grad).max_rel_error < 1e-4, "{what}: gradient of `{w}`");
            for n in next {
                assert!(find(&done.outputs, n).max_rel_error < 1e-4, "{what}: `{n}`");
            }
        }
    }
}
