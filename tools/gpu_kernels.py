#!/usr/bin/env python3
"""Which kernel cuBLAS runs for each calibration GEMM shape, and how long it takes on the GPU.

    python3 tools/gpu_kernels.py > kernels.txt

Needs PyTorch with CUDA. For each shape: torch.matmul in bf16 on random data, 5 warm-up products,
then 10 under torch.profiler; prints every CUDA kernel's name, its count and its mean duration. The
names say what the GPU model can only assume: persistent (warp-specialized cooperative or
ping-pong) or not, the CTA tile, split-K or stream-K, GEMV kernels for M = 1.
"""

import sys

SHAPES = [
    (8192, 8192, 8192),
    (2048, 2048, 2048),
    (1024, 1024, 1024),
    (4096, 4096, 256),
    (256, 2048, 4096),
    (4096, 4096, 14336),
    (4096, 14336, 4096),
    (1, 8192, 8192),
    (16, 8192, 8192),
    (64, 14336, 4096),
]


def main():
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU visible")
    print(f"# {torch.cuda.get_device_name()}, PyTorch {torch.__version__}, CUDA {torch.version.cuda}")
    print("shape,kernel,count,mean_us")
    for m, n, k in SHAPES:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(5):
            torch.matmul(a, b)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                torch.matmul(a, b)
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            if ev.device_type.name != "CUDA" and getattr(ev, "self_device_time_total", 0) == 0:
                continue
            total = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
            if total <= 0 or ev.count == 0:
                continue
            name = ev.key.replace(",", ";")
            print(f"{m}x{n}x{k},{name},{ev.count},{total / ev.count:.2f}", flush=True)
        del a, b


if __name__ == "__main__":
    main()
