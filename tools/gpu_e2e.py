#!/usr/bin/env python3
"""Whole-model steps on a real GPU, to hold `wafer gpu`'s end-to-end estimate against.

    python3 tools/gpu_e2e.py --out tests/data/gpu_e2e_<hw>.csv

Needs PyTorch with CUDA and Hugging Face transformers (no network: each model is built from its
config in models/ with random weights, never downloaded). Timed between CUDA events after warm-up,
eager PyTorch (no CUDA graphs, no torch.compile), attention through sdpa (FlashAttention-2 backend):
  prefill   LlamaForCausalLM forward over batch x seq tokens, bf16 weights, logits for the last
            token only (as `wafer gpu --phase prefill` counts them); also under torch.compile
            (`e2e_prefill_compiled`: Inductor fuses the norms, RoPE and casts that eager runs apart).
  train     GPT-2 forward with labels, backward and a fused Adam step under bf16 autocast with fp32
            weights (mixed precision), batch x seq tokens, dropout off (the graph has none).
Rows: hw,benchmark,shape,dtype,value,unit,... with benchmark `e2e_<phase>:<model>`, shape
`<batch>x<seq>`, value in milliseconds per step.
"""

import argparse
import json
import os
import sys

from gpu_calibrate import cuda_hw, time_loop, write_csv

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CASES = [
    ("prefill", "llama-3-8b", 1, 4096),
    ("prefill", "llama-2-7b", 4, 1024),
    ("prefill_compiled", "llama-3-8b", 1, 4096),
    ("prefill_compiled", "llama-2-7b", 4, 1024),
    ("train", "gpt2-small", 8, 1024),
    ("train", "gpt2-medium", 8, 1024),
]


def timed(fn, warm, iters):
    """Milliseconds per step between CUDA events (gpu_calibrate's loop, in ms)."""
    return time_loop(fn, warm, iters) * 1e3


def profiled(torch, fn, top=12):
    """One step under torch.profiler: the kernels that took most GPU time, in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    print(f"    kernels: {total / 1e3:.3f} ms of GPU time in one step", flush=True)
    for e in events[:top]:
        print(f"    {e.self_device_time_total / 1e3:8.3f} ms  x{e.count:<5} {e.key[:110]}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="CSV path (default tests/data/gpu_e2e_<hw>.csv)")
    ap.add_argument("--profile", action="store_true", help="also print each case's top kernels (torch.profiler)")
    args = ap.parse_args()
    hw, dev = cuda_hw()
    import torch
    import transformers

    rows = []

    def build(cfg, dt):
        with torch.device("cuda"):
            try:
                return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dt)
            except TypeError:
                return transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=dt)

    def run_case(phase, name, batch, seq):
        with open(os.path.join(ROOT, "models", f"{name}.json")) as f:
            cfg_dict = json.load(f)
        cfg = transformers.AutoConfig.for_model(**cfg_dict)
        cfg._attn_implementation = "sdpa"
        for key in ("attn_pdrop", "embd_pdrop", "resid_pdrop", "attention_dropout", "hidden_dropout"):
            if hasattr(cfg, key):
                setattr(cfg, key, 0.0)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
        if phase.startswith("prefill"):
            model = build(cfg, torch.bfloat16).eval()
            fwd = torch.compile(model) if phase == "prefill_compiled" else model

            def step():
                with torch.no_grad():
                    fwd(input_ids=ids, use_cache=False, logits_to_keep=1)

            ms = timed(step, 3, 10)
            if args.profile:
                profiled(torch, step)
            return ms
        model = build(cfg, torch.float32).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = timed(step, 3, 10)
        if args.profile:
            profiled(torch, step)
        return ms

    for phase, name, batch, seq in CASES:
        try:
            ms = run_case(phase, name, batch, seq)
        except Exception as e:  # one case failing must not lose the others
            print(f"{phase} {name} failed: {e!r}", flush=True)
            continue
        finally:
            torch.cuda.empty_cache()
        rows.append((hw, f"e2e_{phase}:{name}", f"{batch}x{seq}", "bf16", f"{ms:.4f}", "ms"))
        print(f"{phase:<8} {name:<12} {batch}x{seq:<6} {ms:10.3f} ms", flush=True)
    out_path = args.out or os.path.join(ROOT, "tests", "data", f"gpu_e2e_{hw}.csv")
    write_csv(out_path, dev, rows, f"PyTorch {torch.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
