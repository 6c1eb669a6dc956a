//! Decode over several tokens on the mesh with the wafer's own KV cache (`functional::decode`,
//! `wafer run --functional --decode-steps N`): every step starts from the K and V rows the previous
//! step's program left in its attention regions, and its logits are the reference's prefill of the
//! same sequence at that position.

mod support;

use support::{check_error, wafer};
use waferscale::compile::{compile_model, CompileOptions};
use waferscale::engine::{EngineOptions, Fidelity};
use waferscale::functional::decode::{decode_on_mesh, Caches, Decoder, Start};
use waferscale::functional::{max_rel_error, Options, Tokens, WeightSource};
use waferscale::graph::Graph;
use waferscale::hw::WaferHw;
use waferscale::mesh::MeshProgram;
use waferscale::model::{self, DType, Model, Phase, Workload, WorkloadArgs};

const CONTEXT: u64 = 4;
const STEPS: u64 = 3;
/// mixtral-tiny with a capacity factor of experts / top_k: no token copy is ever dropped.
const MIXTRAL: &str = "tests/data/mixtral-tiny-nodrop.json";

fn hw(mesh: &str) -> WaferHw {
    let doc = waferscale::hw::load_with_overrides("wse2", &[]).expect("wse2");
    let hw = WaferHw::from_doc(&doc).expect("wafer");
    let (w, h) = mesh.split_once('x').expect("WxH");
    hw.with_mesh(w.parse().expect("width"), h.parse().expect("height")).expect("mesh")
}

fn decode_workload(model: &Model, context: u64) -> Workload {
    let args = WorkloadArgs {
        phase: Some(Phase::Decode),
        context: Some(context),
        dtype: Some(DType::Fp32),
        batch: Some(1),
        ..WorkloadArgs::default()
    };
    args.resolve(model).expect("workload")
}

/// The graph and the one program of `w` on `hw`.
fn compiled(model: &Model, w: &Workload, hw: &WaferHw) -> (Graph, MeshProgram) {
    let (g, c) = compile_model(model, w, hw, &CompileOptions::default()).expect("compile");
    let prog = c.step_programs().expect("programs").remove(0).1;
    (g, prog)
}

fn engine() -> EngineOptions {
    EngineOptions::new(Fidelity::Detailed, 1)
}

/// Every tiny decoder decodes three tokens after a context of four on 16 x 16 (gpt-tiny also on
/// 32 x 32, where its linears are gemv-broadcast instead of gemv-tree), the context prefilled on the
/// wafer and each step from the cache the wafer left: each step's logits are the reference's prefill
/// of the sequence up to that token, and the cache the wafer leaves (after the prefill and after each
/// step) is the one the reference's prefill of the same tokens leaves, within 1e-4 relative (fp32).
/// gpt-tiny also starts once from the reference's prefill of the context. Mixtral (MoE) with a capacity
/// factor that drops no token (decode and prefill route different sets of tokens, so they agree only
/// where nothing is dropped), on 16 x 16 and 32 x 32.
#[test]
fn decode_over_several_tokens_matches_prefill() {
    for (name, mesh, start) in [
        ("gpt-tiny", "16x16", Start::Mesh),
        ("gpt-tiny", "16x16", Start::Reference),
        ("gpt-tiny", "32x32", Start::Mesh),
        ("llama-tiny", "16x16", Start::Mesh),
        ("neox-tiny", "16x16", Start::Mesh),
        ("gptj-tiny", "16x16", Start::Mesh),
        (MIXTRAL, "16x16", Start::Mesh),
        (MIXTRAL, "32x32", Start::Mesh),
    ] {
        let model = model::load(name).expect("model");
        let hw = hw(mesh);
        let first = decode_workload(&model, CONTEXT);
        let spec = match &model {
            Model::Transformer(s) => s.clone(),
            Model::Op(_) => unreachable!("a transformer"),
        };
        let tokens = Tokens::seeded(11, 1, (CONTEXT + STEPS) as usize, spec.vocab);
        let source = WeightSource::Seeded(3);
        let opts = Options::default();
        let done = decode_on_mesh(&model, &first, &source, &tokens, STEPS, start, &opts, &engine(), |w| {
            Ok(compiled(&model, w, &hw))
        })
        .unwrap_or_else(|e| panic!("{name} on {mesh}: {e}"));
        assert_eq!(done.steps.len(), STEPS as usize);
        let check = Decoder::new(&model, &first, &source, &tokens, STEPS, &opts).expect("decoder");
        assert_eq!(done.context.is_some(), start == Start::Mesh, "{name}: the context's prefill on the mesh");
        if let Some(ctx) = &done.context {
            let want = check.context_caches().expect("context caches");
            assert_eq!(ctx.caches.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{name}");
            for (k, v) in &ctx.caches {
                let err = max_rel_error(v, &want[k]);
                assert!(err < 1e-4, "{name} on {mesh}: `{k}` of the wafer's prefill vs the reference's: {err}");
            }
            for o in &ctx.outputs {
                assert!(o.max_rel_error < 1e-4, "{name} on {mesh}: prefill's {} {}", o.name, o.max_rel_error);
            }
        }
        let mut given = match &done.context {
            Some(ctx) => ctx.caches.clone(),
            None => check.context_caches().expect("context caches"),
        };
        for (s, st) in done.steps.iter().enumerate() {
            let at = format!("{name} on {mesh} from {start:?}, step {s}");
            assert_eq!(st.context, CONTEXT + s as u64, "{at}");
            // It started from exactly the cache the wafer left before it (bit for bit: the wafer's
            // values, not a reference's that agrees to 1e-6), and left one row more.
            for (k, v) in &st.caches {
                let old = &given[k];
                assert_eq!(v.len() * st.context as usize, old.len() * (st.context as usize + 1), "{at}: `{k}`");
                assert!(v[..old.len()] == old[..], "{at}: `{k}` does not start from the cache the wafer left");
            }
            given = st.caches.clone();
            assert!(st.vs_prefill < 1e-4, "{at}: logits vs prefill {}", st.vs_prefill);
            for o in &st.outputs {
                assert!(o.max_rel_error < 1e-4, "{at}: {} vs the reference's decode {}", o.name, o.max_rel_error);
            }
            // The cache the wafer left holds every token so far, as the reference's prefill of them.
            let (_, want) = check.prefill(st.context + 1).expect("prefill");
            assert_eq!(st.caches.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{at}");
            assert_eq!(st.caches.len(), 2 * spec.layers as usize, "{at}: a K and a V cache per layer");
            for (k, v) in &st.caches {
                let err = max_rel_error(v, &want[k]);
                assert!(err < 1e-4, "{at}: `{k}` the wafer left vs the reference prefill's: {err}");
            }
        }
    }
}

/// The next step reads the rows the wafer appended: carried as they are, step 1 matches the
/// prefill; with the K row the wafer appended in step 0 (one layer's, one row) changed, or with the
/// carried cache zeroed, step 1's logits move away from the prefill's. The rows a step leaves before
/// its new one are the ones it was given, and it leaves exactly one more row than it was given.
#[test]
fn the_next_step_reads_the_rows_the_wafer_appended() {
    for name in ["gpt-tiny", "llama-tiny"] {
        let model = model::load(name).expect("model");
        let hw = hw("16x16");
        let first = decode_workload(&model, CONTEXT);
        let vocab = match &model {
            Model::Transformer(s) => s.vocab,
            Model::Op(_) => unreachable!("a transformer"),
        };
        let tokens = Tokens::seeded(5, 1, (CONTEXT + 2) as usize, vocab);
        let dec =
            Decoder::new(&model, &first, &WeightSource::Seeded(9), &tokens, 2, &Options::default()).expect("decoder");
        let (g0, p0) = compiled(&model, &dec.workload(0), &hw);
        let (g1, p1) = compiled(&model, &dec.workload(1), &hw);
        let start = dec.context_caches().expect("context caches");
        let s0 = dec.step(0, &g0, &p0, &start, &engine()).expect("step 0");
        let kvw = s0.caches["l1.attn.k_cache"].len() / (CONTEXT as usize + 1);
        for (k, v) in &s0.caches {
            assert_eq!(v.len(), (CONTEXT as usize + 1) * kvw, "{name}: `{k}` one row longer than the context");
            assert_eq!(&v[..start[k].len()], &start[k][..], "{name}: `{k}` keeps the rows it was given");
        }
        let good = dec.step(1, &g1, &p1, &s0.caches, &engine()).expect("step 1");
        assert!(good.vs_prefill < 1e-4, "{name}: step 1 from the wafer's cache: {}", good.vs_prefill);

        let mut bent: Caches = s0.caches.clone();
        let row = &mut bent.get_mut("l1.attn.k_cache").expect("layer 1 keys")[CONTEXT as usize * kvw..];
        for (i, x) in row.iter_mut().enumerate() {
            *x += if i % 2 == 0 { 1.0 } else { -1.0 };
        }
        let bad = dec.step(1, &g1, &p1, &bent, &engine()).expect("step 1, appended row changed");
        assert!(bad.vs_prefill > 1e-3, "{name}: a changed appended K row left the logits at {}", bad.vs_prefill);
        assert_eq!(bad.caches["l1.attn.k_cache"][..bent["l1.attn.k_cache"].len()], bent["l1.attn.k_cache"][..]);

        let zero: Caches = s0.caches.iter().map(|(k, v)| (k.clone(), vec![0.0; v.len()])).collect();
        let zeroed = dec.step(1, &g1, &p1, &zero, &engine()).expect("step 1, zero cache");
        assert!(zeroed.vs_prefill > 1e-3, "{name}: a zeroed cache left the logits at {}", zeroed.vs_prefill);
    }
}

fn read_logits(path: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).expect("output written");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let v = st.tensor("logits").expect("logits");
    let vals = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    (v.shape().to_vec(), vals)
}

/// `wafer run --functional --decode-steps 3 --tokens ...`: the check line, `--out` with the logits of
/// the three positions (each the `wafer reference` prefill's of the sequence up to it), and the timing
/// report of the first step (the same cycles as a plain run of that step), with a note saying so.
#[test]
fn cli_decodes_several_tokens() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("functional-decode");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ids = ["3", "14", "15", "92", "65", "35", "89"];
    let all = ids.join(",");
    let out = dir.join("steps.safetensors");
    let o = out.display().to_string();
    let base = ["run", "llama-tiny", "--hw", "wse2", "--mesh", "16x16", "--phase", "decode", "--dtype", "fp32"];
    let mut args = base.to_vec();
    args.extend(["--tokens", &all, "--functional", "--decode-steps", "3", "--json", "--out", &o]);
    let (code, stdout, stderr) = wafer(&args);
    assert_eq!(code, 0, "{stderr}");
    let marker = "functional: decode of 3 tokens vs the reference prefill";
    let err = check_error(&stderr, marker);
    assert!(err < 1e-4, "decode of 3 tokens: max relative error {err}");
    let line = stderr.lines().find(|l| l.starts_with(marker)).unwrap_or_default();
    assert!(line.contains("positions 4..=6"), "{line}");

    let (shape, got) = read_logits(&out);
    assert_eq!(shape, vec![1, 3, 256]);
    for (s, len) in [5usize, 6, 7].into_iter().enumerate() {
        let pre = dir.join(format!("prefill-{len}.safetensors"));
        let p = pre.display().to_string();
        let toks = ids[..len].join(",");
        let (code, _, e) = wafer(&["reference", "llama-tiny", "--phase", "prefill", "--tokens", &toks, "--out", &p]);
        assert_eq!(code, 0, "{e}");
        let (_, want) = read_logits(&pre);
        let err = max_rel_error(&got[s * 256..(s + 1) * 256], &want);
        assert!(err < 1e-4, "position {}: {err}", len - 1);
    }

    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    let mut plain = base.to_vec();
    plain.extend(["--context", "4", "--json"]);
    let (code, first, e) = wafer(&plain);
    assert_eq!(code, 0, "{e}");
    let first: serde_json::Value = serde_json::from_str(&first).expect("JSON report");
    assert_eq!(report["cycles"], first["cycles"], "the report is the first step's");
    assert!(report["cycles"].as_u64().is_some_and(|c| c > 0));
    let notes = report["notes"].to_string();
    assert!(notes.contains("--decode-steps 3: this is the timing of the first decode step"), "{notes}");
}

/// Bad combinations are the user's (exit 2), named, never a panic.
#[test]
fn bad_decode_steps_are_refused() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("functional-decode");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let plan = dir.join("gpt-tiny.plan").display().to_string();
    let (code, _, e) = wafer(&[
        "compile",
        "gpt-tiny",
        "--hw",
        "wse2",
        "--mesh",
        "16x16",
        "--phase",
        "decode",
        "--context",
        "4",
        "-o",
        &plan,
    ]);
    assert_eq!(code, 0, "{e}");
    let dec = ["gpt-tiny", "--mesh", "16x16", "--phase", "decode"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--context", "4", "--decode-steps", "3"], "--functional"),
        (vec!["--context", "4", "--functional", "--decode-steps", "0"], "--decode-steps"),
        (vec!["--context", "126", "--functional", "--decode-steps", "3"], "--decode-steps 3"),
        (vec!["--tokens", "1,2,3", "--functional", "--decode-steps", "3"], "--decode-steps 3"),
    ];
    for (extra, says) in cases {
        let mut a = vec!["run"];
        a.extend(dec);
        a.extend(extra);
        let (code, _, stderr) = wafer(&a);
        assert_eq!(code, 2, "{}: {stderr}", a.join(" "));
        assert!(
            stderr.contains(says) && !stderr.contains("panicked"),
            "{}: expected `{says}` in {stderr}",
            a.join(" ")
        );
    }
    for a in [
        vec![
            "run",
            "gpt-tiny",
            "--mesh",
            "16x16",
            "--phase",
            "prefill",
            "--seq",
            "8",
            "--functional",
            "--decode-steps",
            "2",
        ],
        vec!["run", &plan, "--functional", "--decode-steps", "2"],
    ] {
        let (code, _, stderr) = wafer(&a);
        assert_eq!(code, 2, "{}: {stderr}", a.join(" "));
        assert!(stderr.contains("--decode-steps 2") && !stderr.contains("panicked"), "{}: {stderr}", a.join(" "));
    }
}
