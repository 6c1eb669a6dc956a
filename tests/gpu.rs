//! The GPU model: report snapshots of tiny models (the text printer), multi-GPU sanity (tensor
//! parallelism helps but less than linearly, pipeline bubbles follow 1F1B), memory capacity and
//! parallelism errors (exit code and stderr), determinism.

mod support;

use support::wafer;

use waferscale::gpu::{self, pipeline, ClockMode, GpuOptions};
use waferscale::hw::{load_with_overrides, GpuSystem};
use waferscale::model::{self, Phase, WorkloadArgs};
use waferscale::report::RunReport;

fn sys(name: &str) -> GpuSystem {
    GpuSystem::from_doc(&load_with_overrides(name, &[]).unwrap()).unwrap()
}

fn run(name: &str, hw: &str, args: WorkloadArgs, opts: GpuOptions) -> RunReport {
    let m = model::load(name).unwrap();
    let w = args.resolve(&m).unwrap();
    gpu::run(&m, &w, &sys(hw), &opts).unwrap_or_else(|e| panic!("{name} on {hw}: {e}"))
}

fn train(batch: u64, seq: u64) -> WorkloadArgs {
    WorkloadArgs { phase: Some(Phase::Train), batch: Some(batch), seq: Some(seq), ..Default::default() }
}

/// One fixture, one snapshot: `wafer gpu` text reports of tiny models and single ops.
#[test]
fn reports_of_tiny_models() {
    for (name, args) in [
        ("gpu-gpt-tiny-train", vec!["gpt-tiny", "--hw", "h100"]),
        (
            "gpu-llama-tiny-decode",
            vec!["llama-tiny", "--hw", "h200", "--phase", "decode", "--batch", "4", "--context", "64", "--cuda-graphs"],
        ),
        ("gpu-bert-tiny-prefill", vec!["bert-tiny", "--hw", "a100", "--phase", "prefill", "--batch", "2"]),
        ("gpu-mixtral-tiny-prefill", vec!["mixtral-tiny", "--hw", "h100", "--phase", "prefill", "--batch", "2"]),
        (
            "gpu-gpt-tiny-unfused-bf16",
            vec!["gpt-tiny", "--hw", "h100", "--attention", "unfused", "--dtype", "bf16", "--recompute"],
        ),
        (
            "gpu-gpt-tiny-tp2-pp2-dp2",
            vec![
                "gpt-tiny",
                "--hw",
                "dgx-h100",
                "--gpus",
                "8",
                "--tp",
                "2",
                "--pp",
                "2",
                "--batch",
                "8",
                "--microbatches",
                "4",
                "--zero",
                "1",
            ],
        ),
        ("gpu-gemm-8192-bf16", vec!["gemm:8192x8192x8192", "--hw", "h100", "--dtype", "bf16"]),
        ("gpu-allreduce-1gib-dgx", vec!["allreduce:1073741824", "--hw", "dgx-h100", "--gpus", "8"]),
    ] {
        let mut argv = vec!["gpu"];
        argv.extend(args);
        let (code, out, err) = wafer(&argv);
        assert_eq!(code, 0, "{name}: {err}");
        insta::assert_snapshot!(name, out);
    }
}

#[test]
fn json_report_has_the_gpu_sections_and_is_deterministic() {
    let args = ["gpu", "gpt-tiny", "--hw", "dgx-h100", "--gpus", "4", "--tp", "2", "--batch", "4", "--json"];
    let (code, a, err) = wafer(&args);
    assert_eq!(code, 0, "{err}");
    let (_, b, _) = wafer(&args);
    let strip = |s: &str| {
        let mut v: serde_json::Value = serde_json::from_str(s).unwrap();
        v.as_object_mut().unwrap().remove("host");
        v
    };
    let (va, vb) = (strip(&a), strip(&b));
    assert_eq!(va, vb, "two runs differ outside `host`");
    let g = &va["gpu"];
    let levels: Vec<&str> = g["levels"].as_array().unwrap().iter().map(|l| l["level"].as_str().unwrap()).collect();
    assert_eq!(levels, ["hbm", "l2", "smem", "nvlink", "network"]);
    assert!(g["kernels"].as_array().unwrap().len() > 10);
    assert!(g["memory"]["total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(va["machine"]["kind"], "gpu");
    assert_eq!(va["fidelity"], "kernel-model");
}

/// The library gives the same report (but `host`) for the same inputs.
#[test]
fn library_runs_are_bit_identical() {
    let opts = GpuOptions { tp: Some(2), pp: Some(2), dp: Some(2), microbatches: Some(2), ..Default::default() };
    let mut a = run("gpt-tiny", "dgx-h100", train(8, 128), opts.clone());
    let mut b = run("gpt-tiny", "dgx-h100", train(8, 128), opts);
    a.host = Default::default();
    b.host = Default::default();
    assert_eq!(a, b);
}

/// Eight-way tensor parallelism on a small model: faster than one GPU, but by less than 8x
/// (all-reduces, replicated norms and residuals, smaller and less efficient GEMMs).
#[test]
fn tensor_parallel_helps_but_sublinearly() {
    let one = run("gpt2-medium", "h100", train(8, 1024), GpuOptions::default());
    let eight = run("gpt2-medium", "dgx-h100", train(8, 1024), GpuOptions { tp: Some(8), ..Default::default() });
    let speedup = one.seconds / eight.seconds;
    println!("gpt2-medium train, tp=8 over 1 GPU: {speedup:.2}x");
    assert!(speedup > 1.5 && speedup < 8.0, "speedup {speedup}");
    assert!(eight.bottleneck.shares.contains_key("network"));
    assert_eq!(one.flops, eight.flops);
}

/// Data parallelism: per-GPU work is divided by the replicas, the gradient all-reduce overlaps the
/// backward, so 8 replicas on one node run a batch of 8x nearly as fast as one GPU runs its share.
#[test]
fn data_parallel_scales_nearly_linearly() {
    let one = run("gpt2-medium", "h100", train(4, 1024), GpuOptions::default());
    let eight = run("gpt2-medium", "dgx-h100", train(32, 1024), GpuOptions { dp: Some(8), ..Default::default() });
    let efficiency = one.seconds / eight.seconds;
    println!("gpt2-medium train, dp=8 weak-scaling efficiency: {efficiency:.3}");
    assert!(efficiency > 0.8 && efficiency <= 1.0 + 1e-9, "{efficiency}");
}

/// 1F1B with equal stages: bubble fraction (P-1)/(M+P-1), exactly.
#[test]
fn pipeline_bubble_matches_1f1b_formula() {
    for (p, m) in [(4u64, 4u64), (4, 16), (8, 64), (16, 192)] {
        let s = pipeline::one_f_one_b(&vec![1.0; p as usize], &vec![2.0; p as usize], m, 0.0);
        let want = (p - 1) as f64 / (m + p - 1) as f64;
        assert!((s.bubble_fraction - want).abs() < 1e-12, "P={p} M={m}: {} vs {want}", s.bubble_fraction);
    }
}

/// On a model with nearly equal stages, the bubble share of the step is close to the formula.
/// GPT-3 175B over 8 stages: 12 layers each, the LM head a third of a layer. (A small model is not such a
/// case: gpt2-medium's head weighs about four of its layers, and its last stage sets the pace.)
#[test]
fn pipeline_bubble_on_a_model() {
    let (p, m) = (8u64, 16u64);
    let r = run(
        "gpt3-175b",
        "h100-superpod-256",
        WorkloadArgs { dtype: Some(model::DType::Bf16), ..train(16, 2048) },
        GpuOptions { tp: Some(8), pp: Some(p), microbatches: Some(m), ..Default::default() },
    );
    let bubble = r.bottleneck.shares.get("pipeline_bubble").copied().unwrap_or(0.0);
    let want = (p - 1) as f64 / (m + p - 1) as f64;
    println!("gpt3-175b tp=8 pp={p} M={m}: bubble share {bubble:.3}, formula {want:.3}");
    assert!(bubble > 0.8 * want && bubble < 1.2 * want, "{bubble} vs {want}");
}

/// Bad input: exit code 2 and a message naming what is wrong; snapshots hold both.
#[test]
fn errors_name_what_does_not_fit_or_divide() {
    for (name, args) in [
        ("gpu-175b-does-not-fit", vec!["gpt3-175b", "--hw", "h100", "--dtype", "bf16"]),
        (
            "gpu-70b-decode-does-not-fit",
            vec![
                "llama-2-70b",
                "--hw",
                "dgx-h100",
                "--gpus",
                "2",
                "--tp",
                "2",
                "--phase",
                "decode",
                "--batch",
                "64",
                "--context",
                "4000",
            ],
        ),
        ("gpu-tp-not-dividing-heads", vec!["gpt2-small", "--hw", "dgx-h100", "--tp", "8"]),
        (
            "gpu-gpus-not-tp-pp-dp",
            vec!["gpt-tiny", "--hw", "dgx-h100", "--gpus", "8", "--tp", "2", "--pp", "2", "--dp", "1"],
        ),
        ("gpu-more-gpus-than-cluster", vec!["gpt-tiny", "--hw", "dgx-h100", "--gpus", "16"]),
        ("gpu-single-gpu-hw", vec!["gpt-tiny", "--hw", "h100", "--gpus", "2"]),
        ("gpu-pp-beyond-layers", vec!["gpt-tiny", "--hw", "dgx-h100", "--pp", "4"]),
        ("gpu-dp-not-dividing-batch", vec!["gpt-tiny", "--hw", "dgx-h100", "--dp", "4", "--batch", "6"]),
        ("gpu-microbatches-not-dividing", vec!["gpt-tiny", "--hw", "h100", "--batch", "6", "--microbatches", "4"]),
        ("gpu-zero-without-train", vec!["gpt-tiny", "--hw", "h100", "--phase", "prefill", "--zero", "1"]),
        ("gpu-fp8-on-a100", vec!["gemm:1024x1024x1024", "--hw", "a100", "--dtype", "fp8"]),
        ("gpu-flash3-on-a100", vec!["gpt-tiny", "--hw", "a100", "--attention", "flash3"]),
        ("gpu-gemm-on-many-gpus", vec!["gemm:64x64x64", "--hw", "dgx-h100", "--gpus", "8"]),
        ("gpu-bad-hw-value", vec!["gpt-tiny", "--hw", "h100", "--set", "sm.count=0"]),
        ("gpu-unknown-hw-key", vec!["gpt-tiny", "--hw", "h100", "--set", "l2.size=1"]),
        ("gpu-wafer-hw", vec!["gpt-tiny", "--hw", "wse2"]),
        ("gpu-bad-l2-latency", vec!["gpt-tiny", "--hw", "h100", "--set", "l2.far_latency_cycles=10"]),
        ("gpu-bad-power-utilization", vec!["gpt-tiny", "--hw", "h100", "--set", "power.limit_utilization=0"]),
        ("gpu-bad-clock-mode", vec!["gpt-tiny", "--hw", "h100", "--clock", "turbo"]),
    ] {
        let mut argv = vec!["gpu"];
        argv.extend(args);
        let (code, _, err) = wafer(&argv);
        let got = format!("exit: {code}\n{err}");
        assert_eq!(code, 2, "{name}: expected exit code 2, got:\n{got}");
        assert!(!got.contains("panicked"), "{name}: panicked:\n{got}");
        insta::assert_snapshot!(name, got);
    }
}

/// The memory check names the parts and compares bytes needed with bytes available.
#[test]
fn capacity_error_gives_bytes_needed_and_available() {
    let (code, _, err) = wafer(&["gpu", "gpt3-175b", "--hw", "h100", "--dtype", "bf16"]);
    assert_eq!(code, 2);
    for needle in ["does not fit", "weights", "optimizer state", "80,000,000,000 bytes", "hbm.bytes", "--tp"] {
        assert!(err.contains(needle), "missing `{needle}` in: {err}");
    }
}

/// Every shipped GPU and cluster description loads and validates.
#[test]
fn shipped_gpu_descriptions_load() {
    for (name, sms, gpus) in [
        ("a100", 108, 1),
        ("h100", 132, 1),
        ("h200", 132, 1),
        ("dgx-a100", 108, 8),
        ("dgx-h100", 132, 8),
        ("dgx-h200", 132, 8),
        ("h100-superpod-256", 132, 256),
        ("h100-superpod-1024", 132, 1024),
    ] {
        let s = sys(name);
        assert_eq!(s.gpu.sm.count, sms, "{name}");
        assert_eq!(s.max_gpus(), gpus, "{name}");
    }
    // Derived peaks match the datasheets [gpu.md 1].
    let h100 = sys("h100");
    let tf = h100.gpu.peak_flops_per_s(model::DType::Bf16) / 1e12;
    assert!((tf - 989.4).abs() < 0.5, "{tf}");
    let a100 = sys("a100");
    let tf = a100.gpu.peak_flops_per_s(model::DType::Fp16) / 1e12;
    assert!((tf - 311.9).abs() < 0.5, "{tf}");
    assert_eq!(sys("dgx-h200").gpu.hbm.bytes, 141_000_000_000);
    assert!(sys("dgx-h200").node.nvls);
}

/// The fusion rules, counted on gpt-tiny (2 layers): one flash kernel per layer and pass, no kernel
/// for views, one optimizer kernel; unfused attention instead launches the batched GEMMs and
/// softmax kernels; tensor parallelism adds four all-reduces per layer plus the embedding's, the
/// head's input gradient's and the vocabulary-parallel loss's.
#[test]
fn lowering_follows_the_fusion_rules() {
    let m = model::load("gpt-tiny").unwrap();
    let w = train(1, 128).resolve(&m).unwrap();
    let count = |opts: GpuOptions, hw: &str, label: &str| {
        gpu::lowered(&m, &w, &sys(hw), &opts).unwrap().kernels.iter().filter(|k| k.kind.label() == label).count()
    };
    let fused = GpuOptions::default();
    assert_eq!(count(fused.clone(), "h100", "flash_fwd"), 2);
    assert_eq!(count(fused.clone(), "h100", "flash_bwd"), 2);
    // Per layer: qkv, out, up, down forward, each with dgrad and wgrad; plus the head's three.
    assert_eq!(count(fused.clone(), "h100", "gemm"), 2 * 4 * 3 + 3);
    let unfused = GpuOptions { attention: Some(gpu::AttentionImpl::Unfused), ..Default::default() };
    assert_eq!(count(unfused.clone(), "h100", "flash_fwd"), 0);
    // Plus scores and context forward, and their four gradients, per layer.
    assert_eq!(count(unfused, "h100", "gemm"), 2 * 4 * 3 + 3 + 2 * 6);
    let low = gpu::lowered(&m, &w, &sys("h100"), &fused).unwrap();
    assert!(low.kernels.iter().all(|k| !k.ops.iter().any(|o| o.ends_with(".split"))));
    assert_eq!(low.kernels.iter().filter(|k| k.name.starts_with("adam")).count(), 1);
    let tp = GpuOptions { tp: Some(2), ..Default::default() };
    assert_eq!(count(tp, "dgx-h100", "allreduce"), 2 * 4 + 3);
}

fn gemm(m: u64, n: u64, k: u64, hw: &str, clock: ClockMode) -> RunReport {
    let args = WorkloadArgs { dtype: Some(model::DType::Bf16), ..Default::default() };
    run(&format!("gemm:{m}x{n}x{k}"), hw, args, GpuOptions { clock, ..Default::default() })
}

fn kernel_clock(r: &RunReport) -> f64 {
    let g = r.gpu.as_ref().unwrap();
    assert_eq!(g.kernels.len(), 1);
    g.kernels[0].clock_hz
}

/// The power limit: under `auto`, a GEMM that fits in the boost window (8192^3, 1.4 ms) runs at
/// the boost clock, and one that outlasts it (32768^3, about 90 ms) at the clock where its power is
/// back at the limit, f_b (u* / u)^(1/3) for its tensor utilization u at boost, and slower by
/// about that clock ratio; `--clock` forces either.
#[test]
fn a_long_gemm_runs_at_the_power_limited_clock_and_a_short_one_at_boost() {
    let h100 = sys("h100");
    let boost = h100.gpu.sm.clock_hz;
    let short = gemm(8192, 8192, 8192, "h100", ClockMode::Auto);
    assert_eq!(kernel_clock(&short), boost);
    assert!(short.seconds < h100.gpu.power.boost_window_s);
    assert!(short.notes.iter().any(|n| n.starts_with("SM clock: boost, as the step")), "{:?}", short.notes);

    let long_boost = gemm(32768, 32768, 32768, "h100", ClockMode::Boost);
    assert_eq!(kernel_clock(&long_boost), boost);
    assert!(long_boost.seconds > h100.gpu.power.boost_window_s);
    let long = gemm(32768, 32768, 32768, "h100", ClockMode::Auto);
    let u = long_boost.flops as f64 / long_boost.seconds / h100.gpu.peak_flops_per_s(model::DType::Bf16);
    assert!(u > h100.gpu.power.limit_utilization, "{u}");
    let expect = boost * (h100.gpu.power.limit_utilization / u).cbrt();
    let got = kernel_clock(&long);
    assert!((got / expect - 1.0).abs() < 0.01, "clock {got} against {expect}");
    // Compute-bound: the time follows the clock (within the launch and latency terms).
    let slowdown = long.seconds / long_boost.seconds;
    assert!((slowdown * got / boost - 1.0).abs() < 0.02, "slowdown {slowdown} at clock ratio {}", got / boost);
    assert!(long.notes.iter().any(|n| n.starts_with("SM clock: sustained, as the step")), "{:?}", long.notes);

    // Forced: the short GEMM at the sustained clock is slowed like the long one.
    let forced = gemm(8192, 8192, 8192, "h100", ClockMode::Sustained);
    assert!(kernel_clock(&forced) < 0.92 * boost);
    assert!(forced.seconds > 1.08 * short.seconds);
}

/// Under sustained load only kernels above the limit's utilization slow down: memory-bound kernels
/// (a GEMV, the elementwise kernels) and FlashAttention-2 (mma.sync, about a third of the tensor
/// peak on Hopper) stay at boost; the A100 holds its boost clock under load [gpu.md 1].
#[test]
fn kernels_under_the_power_limit_keep_the_boost_clock() {
    let h100 = sys("h100");
    let boost = h100.gpu.sm.clock_hz;
    let gemv = gemm(1, 8192, 8192, "h100", ClockMode::Sustained);
    assert_eq!(kernel_clock(&gemv), boost);
    let opts = GpuOptions {
        clock: ClockMode::Sustained,
        attention: Some(gpu::AttentionImpl::Fused(gpu::attention::FlashVariant::Fa2)),
        ..Default::default()
    };
    let r = run("gpt2-small", "h100", train(8, 1024), opts);
    for k in &r.gpu.as_ref().unwrap().kernels {
        if k.kind != "gemm" {
            assert_eq!(k.clock_hz, boost, "{} ({}) slowed under the power limit", k.name, k.kind);
        }
    }
    assert!(r.gpu.as_ref().unwrap().kernels.iter().any(|k| k.kind == "gemm" && k.clock_hz < boost));
    let a100 = sys("a100");
    let big = gemm(16384, 16384, 16384, "a100", ClockMode::Sustained);
    assert_eq!(kernel_clock(&big), a100.gpu.sm.clock_hz);
}

/// Operand alignment: GPT-2's vocabulary of 50257 leaves the LM head's leading dimensions off the 16
/// bytes TMA needs, so on Hopper its three GEMMs run the pre-Hopper mma.sync kernels (no stream-K,
/// BK of 64 bytes, half the wgmma rate) and take longer than the same GEMMs padded to 50304, as
/// nanoGPT pads; the aligned layers keep the Hopper kernels.
#[test]
fn unaligned_gemms_fall_back_to_the_pre_hopper_kernels() {
    use waferscale::gpu::gemm::{time_gemm, GemmShape};
    let h100 = sys("h100");
    let d = model::DType::Bf16;
    assert!(!GemmShape::aligned_dim(50257, d) && GemmShape::aligned_dim(50304, d) && GemmShape::aligned_dim(768, d));
    let odd = GemmShape { aligned: false, ..GemmShape::new(1, 8192, 50257, 768, d) };
    let padded = GemmShape::new(1, 8192, 50304, 768, d);
    let (t_odd, t_pad) = (time_gemm(&h100.gpu, &odd), time_gemm(&h100.gpu, &padded));
    assert!(t_odd.config.contains("mma.sync") && t_odd.config.contains("x32,"), "{}", t_odd.config);
    assert!(!t_pad.config.contains("mma.sync"), "{}", t_pad.config);
    assert!(t_odd.seconds > 1.5 * t_pad.seconds, "{} against {}", t_odd.seconds, t_pad.seconds);
    // The A100 has only the one kernel family: alignment changes nothing there.
    let a100 = sys("a100");
    assert_eq!(time_gemm(&a100.gpu, &odd).seconds, time_gemm(&a100.gpu, &GemmShape { aligned: true, ..odd }).seconds);

    let r = run("gpt2-small", "h100", train(8, 1024), GpuOptions::default());
    for k in &r.gpu.as_ref().unwrap().kernels {
        if k.kind == "gemm" {
            assert_eq!(k.shape.contains("50257"), k.config.contains("mma.sync"), "{}: {}", k.name, k.config);
        }
    }
}
