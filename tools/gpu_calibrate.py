#!/usr/bin/env python3
"""Time the GPU model's calibration kernels on a real GPU and write a CSV the calibration test reads.

    python3 tools/gpu_calibrate.py                     # writes tests/data/gpu_calibration_<hw>.csv
    python3 tools/gpu_calibrate.py --out my.csv --quick

Needs PyTorch with CUDA on an A100, H100 or H200. The project never needs a GPU to build or pass its
tests: commit the CSV, and `cargo test --release --test gpu_calibration` checks every row against
the model (model vs measured, +-10%), beside the published rows from shared/reference/gpu.md.

What is timed, and how (the method the test assumes for CSV rows):
  gemm        torch.matmul on random normal data (never zeros: they hide the power behaviour), bf16
              and fp16; back-to-back launches between two CUDA events, after warmup ("loop").
  copy        a device-to-device copy of a 1 GiB buffer: bytes read plus written per second.
  triad       a = b + s * c over fp32 arrays of 256 Mi elements: 2 reads and 1 write per element.
  flash_fwd   torch.nn.functional.scaled_dot_product_attention forward, non-causal, bf16, with the
              flash backend (FlashAttention-2); FLOPs 4 * B * H * S^2 * D.
  launch_add  an fp32 add of 65,536 elements replayed from a captured CUDA graph: microseconds each.

Columns: hw,benchmark,shape,dtype,value,unit,device,torch,cuda,date
"""

import argparse
import datetime
import os
import sys


def device_hw(name):
    n = name.lower()
    for key in ("h200", "h100", "a100"):
        if key in n:
            return key
    return None


def time_loop(fn, warmup, iters):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


GEMMS = [
    (8192, 8192, 8192),
    (4096, 4096, 4096),
    (2048, 2048, 2048),
    (1024, 1024, 1024),
    (2048, 2048, 13312),
    (1024, 10240, 5120),
    (4096, 4096, 256),
    (256, 2048, 4096),
]
FLASH = [(2, 16, 8192, 128), (1, 16, 16384, 128), (32, 16, 512, 128), (2, 32, 8192, 64)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="CSV path (default tests/data/gpu_calibration_<hw>.csv)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("error: PyTorch is not installed")
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU visible; this script times kernels on a real GPU")
    dev = torch.cuda.get_device_name()
    hw = device_hw(dev)
    if hw is None:
        sys.exit(f"error: {dev} is not an A100, H100 or H200 (models/hardware has no description for it)")
    warm, iters = (5, 20) if args.quick else (50, 200)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []

    def row(bench, shape, dtype, value, unit):
        rows.append((hw, bench, shape, dtype, f"{value:.4f}", unit))
        print(f"{bench:<11} {shape:<22} {dtype:<5} {value:10.2f} {unit}", flush=True)

    for dt_name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for m, n, k in GEMMS:
            a = torch.randn(m, k, device="cuda", dtype=dt)
            b = torch.randn(k, n, device="cuda", dtype=dt)
            s = time_loop(lambda: torch.matmul(a, b), warm, iters)
            row("gemm", f"{m}x{n}x{k}", dt_name, 2 * m * n * k / s / 1e12, "TFLOP/s")
            del a, b

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    s = time_loop(lambda: dst.copy_(src), warm, iters)
    row("copy", f"{n}", "u8", 2 * n / s / 1e12, "TB/s")
    del src, dst

    n = 1 << 28
    a = torch.empty(n, device="cuda")
    b = torch.randn(n, device="cuda")
    c = torch.randn(n, device="cuda")
    s = time_loop(lambda: torch.add(b, c, alpha=3.0, out=a), warm, iters)
    row("triad", f"{n}", "fp32", 3 * 4 * n / s / 1e12, "TB/s")
    del a, b, c

    from torch.nn.attention import SDPBackend, sdpa_kernel

    for bsz, h, seq, d in FLASH:
        q, k, v = (torch.randn(bsz, h, seq, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            s = time_loop(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), warm, iters)
        row("flash_fwd", f"{bsz}x{h}x{seq}x{d}", "bf16", 4 * bsz * h * seq * seq * d / s / 1e12, "TFLOP/s")
        del q, k, v

    n = 65536
    a = torch.randn(n, device="cuda")
    b = torch.randn(n, device="cuda")
    out = torch.empty_like(a)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            torch.add(a, b, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    reps = 100
    with torch.cuda.graph(graph):
        for _ in range(reps):
            torch.add(a, b, out=out)
    s = time_loop(graph.replay, 3, max(iters // 10, 5)) / reps
    row("launch_add", f"{n}", "fp32", s * 1e6, "us")

    out_path = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", f"gpu_calibration_{hw}.csv"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    today = datetime.date.today().isoformat()
    with open(out_path, "w") as f:
        f.write(f"# {dev}, PyTorch {torch.__version__}, CUDA {torch.version.cuda}, {today}\n")
        f.write("hw,benchmark,shape,dtype,value,unit,device,torch,cuda,date\n")
        for r in rows:
            f.write(",".join(r) + f",{dev.replace(',', ' ')},{torch.__version__},{torch.version.cuda},{today}\n")
    print(f"wrote {len(rows)} rows to {out_path}")


if __name__ == "__main__":
    main()
