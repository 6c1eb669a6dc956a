//! Functional runs of compiled mesh programs (`wafer run --functional`): the values the emulated PEs
//! compute, in the same emulation that gives the timing, against the reference; the timing report
//! untouched by the values; values identical for any thread count; clear refusals (exit 2) where the
//! data semantics do not reach yet.

mod support;

use serde_json::Value;
use support::{functional_json, run_json, wafer};

/// Runs `wafer run ARGS --functional --json`; returns the report without `host` and the max relative
/// error the check line gives.
fn functional(args: &[&str], out: Option<&std::path::Path>) -> (Value, f64) {
    let path = out.map(|p| p.display().to_string());
    let mut a = args.to_vec();
    if let Some(p) = &path {
        a.extend(["--out", p.as_str()]);
    }
    let (v, err, _) = functional_json(&a);
    (v, err)
}

fn timing_only(args: &[&str]) -> Value {
    run_json(args).0
}

/// Every tiny decoder the data table covers, decoding one token after a 15-token context, in fp32:
/// the logits the PEs compute are the reference's within 1e-4 (relative to the largest logit), on
/// meshes where the linears run as gemv-broadcast (32x32) and as gemv-tree (16x16), and on two wafers.
/// And single ops on pre-placed operands (a GEMV, an add), whose results stay in SRAM.
#[test]
fn decode_logits_match_the_reference() {
    for (model, mesh) in [
        ("gpt-tiny", "32x32"),
        ("gpt-tiny", "16x16"),
        ("llama-tiny", "32x32"),
        ("neox-tiny", "32x32"),
        ("gptj-tiny", "32x32"),
        ("mixtral-tiny", "32x32"),
        ("mixtral-tiny", "16x16"),
        ("mixtral-tiny", "64x64"),
    ] {
        let args = ["--hw", "cs2", "--mesh", mesh, "--phase", "decode", "--context", "15", "--dtype", "fp32"];
        let mut a = vec![model];
        a.extend(args);
        let (_, err) = functional(&a, None);
        assert!(err < 1e-4, "{model} on {mesh}: max relative error {err}");
    }
    // Two wafers, the hidden state crossing between them through their ports.
    for model in ["gpt-tiny", "llama-tiny", "mixtral-tiny"] {
        let args =
            [model, "--mesh", "32x32", "--phase", "decode", "--context", "15", "--dtype", "fp32", "--wafers", "2"];
        let (_, err) = functional(&args, None);
        assert!(err < 1e-4, "{model} on two wafers: max relative error {err}");
    }
    for (op, mesh) in
        [("gemv:64x64", "16x16"), ("gemv:1000x300", "16x16"), ("gemv:256x2048", "32x32"), ("elementwise:1000", "16x16")]
    {
        let (_, err) = functional(&[op, "--mesh", mesh, "--dtype", "fp32"], None);
        assert!(err < 1e-4, "{op} on {mesh}: max relative error {err}");
    }
}

/// The values only observe the emulation: the report (cycles, counters, utilisation, bottlenecks) is
/// the same JSON with and without `--functional`.
#[test]
fn timing_is_identical_with_and_without_values() {
    for args in [
        vec!["gpt-tiny", "--mesh", "32x32", "--phase", "decode", "--context", "15", "--wafers", "2"],
        vec!["gpt-tiny", "--mesh", "32x32", "--phase", "decode", "--context", "15", "--dtype", "fp32"],
        vec!["llama-tiny", "--mesh", "16x16", "--phase", "decode", "--context", "15"],
        vec!["bert-tiny", "--mesh", "32x32", "--phase", "prefill", "--seq", "64", "--dtype", "fp32"],
        vec!["mixtral-tiny", "--mesh", "64x64", "--phase", "prefill", "--seq", "16", "--dtype", "fp32"],
        vec!["mixtral-tiny", "--mesh", "32x32", "--phase", "decode", "--context", "15"],
        vec!["gemv:1000x300", "--mesh", "16x16"],
    ] {
        let (with, _) = functional(&args, None);
        assert_eq!(with, timing_only(&args), "{}", args.join(" "));
    }
}

/// Partial sums meet in sender order, never arrival order: a mesh cut into several engine partitions
/// gives the same output bytes for 1 and 3 threads.
#[test]
fn values_are_identical_for_any_thread_count() {
    let dir = std::env::temp_dir().join(format!("wafer-functional-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // Decode, and prefill in token chunks (BERT: hidden states of every token), over several 64x64
    // partitions.
    let decode = ["gpt-tiny", "--mesh", "140x70", "--phase", "decode", "--context", "15", "--dtype", "fp32"];
    let prefill = ["bert-tiny", "--mesh", "140x70", "--phase", "prefill", "--seq", "64", "--dtype", "fp32"];
    for (i, base) in [decode, prefill].into_iter().enumerate() {
        let mut outs = Vec::new();
        for threads in ["1", "3"] {
            let path = dir.join(format!("out{i}-{threads}.safetensors"));
            let mut args = base.to_vec();
            args.extend(["--threads", threads]);
            let (_, err) = functional(&args, Some(&path));
            assert!(err < 1e-4, "{} with {threads} threads: {err}", base.join(" "));
            outs.push(std::fs::read(&path).expect("output written"));
        }
        assert_eq!(outs[0], outs[1], "{}", base.join(" "));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// fp16 storage (values rounded to fp16 in SRAM and in wavelets, fp32 arithmetic) against the
/// reference's storage rounding (every stored tensor rounded): close, not equal.
#[test]
fn fp16_storage_is_close() {
    let (_, err) = functional(&["gpt-tiny", "--mesh", "32x32", "--phase", "decode", "--context", "15"], None);
    assert!(err < 1e-2, "fp16: {err}");
}

/// Where the data semantics do not reach, `--functional` refuses before emulating, with exit 2 and a
/// message naming what is missing; never a wrong answer.
#[test]
fn unsupported_programs_are_refused() {
    for (args, says) in [
        (vec!["gemm:64x64x64", "--mesh", "16x16"], "cannon"),
        (vec!["allreduce:4096", "--mesh", "16x16"], "(allreduce with allreduce-tree)"),
    ] {
        let mut a = vec!["run"];
        a.extend(args.iter().copied());
        a.push("--functional");
        let (code, _, stderr) = wafer(&a);
        assert_eq!(code, 2, "{}: {stderr}", a.join(" "));
        assert!(stderr.contains("functional mode does not support this yet"), "{stderr}");
        assert!(stderr.contains(says), "{}: expected `{says}` in {stderr}", a.join(" "));
    }
}

/// MoE routing has a capacity: the dispatched buffer holds `capacity` rows per expert (a balanced share
/// at the default factor of 1.0) and copies routed past it are dropped (Switch Transformer, GShard), on
/// the wafer exactly as in the reference. The prefill of 16 seeded tokens overflows mixtral-tiny's
/// experts: the wafer still matches the reference, and the check counts the dropped copies per layer;
/// with a capacity factor of experts / top_k nothing is dropped.
#[test]
fn moe_overflow_drops_copies_as_the_reference_does() {
    let dropped = |model: &str| -> Vec<u64> {
        let a =
            ["run", model, "--mesh", "64x64", "--phase", "prefill", "--seq", "16", "--dtype", "fp32", "--functional"];
        let (code, stdout, stderr) = wafer(&a);
        assert_eq!(code, 0, "{model}: {stderr}");
        let err: f64 = stdout
            .split("max relative error vs the reference ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{model}: no check line in {stdout}"));
        assert!(err < 1e-4, "{model}: max relative error {err}");
        let line = stdout
            .lines()
            .find(|l| l.contains("MoE token copies dropped"))
            .unwrap_or_else(|| panic!("{model}: no MoE line in {stdout}"));
        let counts: Vec<u64> = line
            .split(": ")
            .nth(1)
            .unwrap_or("")
            .split(", ")
            .filter_map(|p| p.split(' ').nth(1)?.parse().ok())
            .collect();
        assert_eq!(counts.len(), 2, "{model}: a count per layer in `{line}`");
        counts
    };
    let at_one = dropped("mixtral-tiny");
    assert!(at_one.iter().sum::<u64>() > 0, "the seeded prefill no longer overflows an expert: {at_one:?}");
    assert_eq!(dropped("tests/data/mixtral-tiny-nodrop.json"), vec![0, 0]);
}

/// Prefill at the tiny models' full length (128 tokens, their position limit), in token chunks, on
/// meshes where the linears run as gemv-broadcast (32x32, 64x64) and gemv-tree (16x16): the logits (BERT:
/// every token's hidden state and the pooler output) match the reference within 1e-4.
/// Chunks used to overtake each other where several PEs send to one on a color (gather relays, fan-in
/// leaders; the router queue is FIFO across senders): with eight or more chunks a run took wavelets of
/// the next chunk from a faster column. Each gathered output's gateway now hands its band a credit per
/// run (`kernel::Prog::gather`), so these would fail (exit 1, "wavelets of another run") without it.
#[test]
fn prefill_at_full_length_matches_the_reference() {
    for mesh in ["32x32", "16x16", "64x64"] {
        for model in ["gpt-tiny", "llama-tiny", "neox-tiny", "gptj-tiny", "bert-tiny", "mixtral-tiny"] {
            let args = [model, "--mesh", mesh, "--phase", "prefill", "--seq", "128", "--dtype", "fp32"];
            let (_, err) = functional(&args, None);
            assert!(err < 1e-4, "{model} prefill of 128 tokens on {mesh}: max relative error {err}");
        }
    }
    for seq in ["2", "16", "33"] {
        let args = ["gpt-tiny", "--mesh", "32x32", "--phase", "prefill", "--seq", seq, "--dtype", "fp32"];
        let (_, err) = functional(&args, None);
        assert!(err < 1e-4, "gpt-tiny prefill of {seq} tokens: max relative error {err}");
    }
}

/// The functional inputs are refused without `--functional`.
#[test]
fn functional_flags_need_functional() {
    let (code, _, stderr) = wafer(&["run", "gpt-tiny", "--seed", "3"]);
    assert_eq!(code, 2, "{stderr}");
}

/// A checkpoint through `--weights`: the good one runs (and matches), and a tensor left out, a tensor
/// with the wrong shape or a file cut short is the user's error (exit 2) naming the file and tensor.
#[test]
fn weight_files_feed_the_wafer_and_bad_ones_are_named() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("functional-mesh");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let good = dir.join("gpt-tiny.safetensors");
    let s = |p: &std::path::Path| p.display().to_string();
    let (code, _, err) = wafer(&["reference", "gpt-tiny", "--seed", "5", "--save-weights", &s(&good)]);
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::read(&good).expect("checkpoint");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let all: Vec<(String, Vec<u64>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let vals = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (name, v.shape().iter().map(|&d| d as u64).collect(), vals)
        })
        .collect();
    let missing = dir.join("missing.safetensors");
    let fewer: Vec<_> = all.iter().filter(|t| t.0 != "h.1.mlp.c_fc.weight").cloned().collect();
    waferscale::functional::weights::write_f32(&missing, &fewer).expect("write");
    let shape = dir.join("shape.safetensors");
    let reshaped: Vec<_> =
        all.iter()
            .map(|t| {
                if t.0 == "h.0.attn.c_attn.weight" {
                    (t.0.clone(), vec![t.1[1], t.1[0]], t.2.clone())
                } else {
                    t.clone()
                }
            })
            .collect();
    waferscale::functional::weights::write_f32(&shape, &reshaped).expect("write");
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).expect("write");

    let base = ["gpt-tiny", "--mesh", "32x32", "--phase", "decode", "--context", "15", "--dtype", "fp32", "--weights"];
    let mut a = base.to_vec();
    let g = s(&good);
    a.push(&g);
    let (_, e) = functional(&a, None);
    assert!(e < 1e-4, "checkpoint: {e}");
    for (file, says) in
        [(&missing, "h.1.mlp.c_fc.weight"), (&shape, "h.0.attn.c_attn.weight"), (&truncated, "truncated")]
    {
        let f = s(file);
        let mut a = vec!["run"];
        a.extend(base);
        a.extend([f.as_str(), "--functional"]);
        let (code, _, stderr) = wafer(&a);
        assert_eq!(code, 2, "{f}: {stderr}");
        assert!(stderr.contains(&f) && stderr.contains(says), "{f}: expected `{says}` in {stderr}");
    }
}

fn logits(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).expect("output written");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let v = st.tensor("logits").expect("logits");
    v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Decoding token 16 on the wafer, with the KV cache of tokens 1..15 resident in its attention
/// regions (filled by the reference's prefill, as a one-step run is; `tests/functional_decode.rs`
/// starts from the wafer's own prefill and decodes several tokens), gives the logits the reference's
/// prefill of all 16 tokens gives for the last one.
#[test]
fn wafer_decode_matches_reference_prefill_of_the_sequence() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("functional-mesh");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let tokens = "3,14,15,92,65,35,89,79,32,38,46,26,43,38,32,79";
    // Mixtral with a capacity factor that drops no token (the prefill of 16 tokens would drop copies
    // at the default factor of 1.0, decode of one token never does).
    for model in ["gpt-tiny", "llama-tiny", "tests/data/mixtral-tiny-nodrop.json"] {
        let stem = std::path::Path::new(model).file_stem().and_then(|s| s.to_str()).unwrap_or(model);
        let (dec, pre) =
            (dir.join(format!("{stem}-decode.safetensors")), dir.join(format!("{stem}-prefill.safetensors")));
        let args = [model, "--mesh", "32x32", "--phase", "decode", "--dtype", "fp32", "--tokens", tokens];
        let (_, err) = functional(&args, Some(&dec));
        assert!(err < 1e-4, "{model}: {err}");
        let p = pre.display().to_string();
        let (code, _, stderr) = wafer(&["reference", model, "--phase", "prefill", "--tokens", tokens, "--out", &p]);
        assert_eq!(code, 0, "{stderr}");
        let (a, b) = (logits(&dec), logits(&pre));
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff / scale < 1e-4, "{model}: decode vs prefill {}", diff / scale);
    }
}
