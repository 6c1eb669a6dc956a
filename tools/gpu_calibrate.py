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
  flash_causal  the same, causal; FLOPs half of the non-causal count.
  launch_add  an fp32 add of 65,536 elements replayed from a captured CUDA graph: microseconds each.
  launch_eager  the same add launched eagerly back to back ("loop"): the host's per-launch cost.
  l2_read     a Triton kernel that sweeps a working set that fits in L2 many times (each pass starts
              each program at another block, so no load can be hoisted): bytes read per second.
  gemm_graph  the bf16 GEMMs again, replayed from a captured CUDA graph (no host launch cost).
  gemm_short  8192^3 bf16 timed over 10 products after 3 (a short burst, before power limits bite).
  clock_sm, power  NVML's SM clock (MHz) and board power (W), medians sampled every 5 ms during
              the 8192^3 bf16 loop: the clock the sustained GEMM rates ran at.
  clock_sm_burst  the same SM clock during gemm_short (about 4 samples of an 18 ms burst): the clock
              the model's rates are counted at, against which the loop's clock is compared.
Skinny GEMMs (M of 1 to 64) are the decode shapes, bound by streaming the weight matrix from HBM.

Columns: hw,benchmark,shape,dtype,value,unit,device,torch,cuda,date
"""

import argparse
import datetime
import os
import sys
import threading
import time


def device_hw(name):
    n = name.lower()
    for key in ("h200", "h100", "a100"):
        if key in n:
            return key
    return None


def cuda_hw():
    """The visible GPU: its hardware file name (a100, h100, h200) and its CUDA name, or exit with why;
    TF32 off, so fp32 rows are fp32."""
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
    torch.backends.cuda.matmul.allow_tf32 = False
    return hw, dev


def graph_seconds(fn, reps, iters):
    """Seconds per call of `fn` replayed from a CUDA graph that captures it `reps` times (after three
    calls on a side stream, as capture requires), over `iters` replays after three."""
    import torch

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return time_loop(graph.replay, 3, iters) / reps


def write_csv(path, dev, rows, versions):
    """Writes `rows` (hw, benchmark, shape, dtype, value, unit) with the device, versions and date."""
    import torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    today = datetime.date.today().isoformat()
    with open(path, "w") as f:
        f.write(f"# {dev}, {versions}, {today}\n")
        f.write("hw,benchmark,shape,dtype,value,unit,device,torch,cuda,date\n")
        for r in rows:
            f.write(",".join(r) + f",{dev.replace(',', ' ')},{torch.__version__},{torch.version.cuda},{today}\n")
    print(f"wrote {len(rows)} rows to {path}")


class ClockSampler:
    """NVML's SM clock and board power, sampled every 5 ms on a thread until stop()."""

    def __init__(self):
        self.samples = []
        self.done = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch_device_index())
        except Exception as e:  # no NVML: the rows are left out
            print(f"clock sampling skipped: {e}", flush=True)
            self.nvml = None
            return
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.wait(0.005):
            clk = self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM)
            pwr = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
            self.samples.append((clk, pwr))

    def stop(self):
        if self.nvml is None:
            return None, None
        self.done.set()
        self.thread.join()
        # Drop the first quarter (the warmup's ramp).
        rest = self.samples[len(self.samples) // 4 :] or self.samples
        if not rest:
            return None, None
        clocks = sorted(c for c, _ in rest)
        powers = sorted(p for _, p in rest)
        return clocks[len(clocks) // 2], powers[len(powers) // 2]


def torch_device_index():
    import torch

    return torch.cuda.current_device()


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
    (4096, 14336, 4096),
    (4096, 4096, 14336),
    (1, 8192, 8192),
    (16, 8192, 8192),
    (64, 14336, 4096),
    (1, 4096, 14336),
]
FLASH = [(2, 16, 8192, 128), (1, 16, 16384, 128), (32, 16, 512, 128), (2, 32, 8192, 64)]


L2_SETS_MIB = (8, 16, 24)
L2_PASSES = 64


def l2_rows(row, torch, warm):
    import triton
    import triton.language as tl

    @triton.jit
    def sweep(x_ptr, out_ptr, n_blocks, passes, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in range(passes):
            for i in range(pid, n_blocks, nprog):
                blk = (i + p) % n_blocks
                acc += tl.load(x_ptr + blk * BLOCK + tl.arange(0, BLOCK))
        tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)

    block = 4096
    progs = torch.cuda.get_device_properties(0).multi_processor_count * 4
    out = torch.empty(progs * block, device="cuda")
    for mib in L2_SETS_MIB:
        n = (mib << 20) // 4
        x = torch.randn(n, device="cuda")
        blocks = n // block
        s = time_loop(lambda: sweep[(progs,)](x, out, blocks, L2_PASSES, BLOCK=block), max(warm // 10, 2), 20)
        row("l2_read", f"{mib << 20}", "fp32", (mib << 20) * L2_PASSES / s / 1e12, "TB/s")
        del x


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="CSV path (default tests/data/gpu_calibration_<hw>.csv)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    args = ap.parse_args()
    hw, dev = cuda_hw()
    import torch

    warm, iters = (5, 20) if args.quick else (50, 200)
    rows = []

    def row(bench, shape, dtype, value, unit):
        rows.append((hw, bench, shape, dtype, f"{value:.4f}", unit))
        print(f"{bench:<11} {shape:<22} {dtype:<5} {value:10.2f} {unit}", flush=True)

    for dt_name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for m, n, k in GEMMS:
            a = torch.randn(m, k, device="cuda", dtype=dt)
            b = torch.randn(k, n, device="cuda", dtype=dt)
            sampler = ClockSampler() if (m, n, k, dt_name) == (8192, 8192, 8192, "bf16") else None
            s = time_loop(lambda: torch.matmul(a, b), warm, iters)
            row("gemm", f"{m}x{n}x{k}", dt_name, 2 * m * n * k / s / 1e12, "TFLOP/s")
            if sampler is not None:
                clock, power = sampler.stop()
                if clock:
                    row("clock_sm", f"{m}x{n}x{k}", dt_name, clock, "MHz")
                    row("power", f"{m}x{n}x{k}", dt_name, power, "W")
            del a, b

    for m, n, k in GEMMS:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        c = torch.matmul(a, b)
        s = graph_seconds(lambda: torch.matmul(a, b, out=c), 20, max(iters // 20, 5))
        row("gemm_graph", f"{m}x{n}x{k}", "bf16", 2 * m * n * k / s / 1e12, "TFLOP/s")
        del a, b, c

    torch.cuda.synchronize()
    time.sleep(2.0)  # let the board cool back from the loops above
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    sampler = ClockSampler()
    s = time_loop(lambda: torch.matmul(a, b), 3, 10)
    clock, _ = sampler.stop()
    row("gemm_short", "8192x8192x8192", "bf16", 2 * 8192**3 / s / 1e12, "TFLOP/s")
    if clock:
        row("clock_sm_burst", "8192x8192x8192", "bf16", clock, "MHz")
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
    for bsz, h, seq, d in FLASH[:2]:
        q, k, v = (torch.randn(bsz, h, seq, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            s = time_loop(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), warm, iters
            )
        row("flash_causal", f"{bsz}x{h}x{seq}x{d}", "bf16", 2 * bsz * h * seq * seq * d / s / 1e12, "TFLOP/s")
        del q, k, v

    n = 65536
    a = torch.randn(n, device="cuda")
    b = torch.randn(n, device="cuda")
    out = torch.empty_like(a)
    s = graph_seconds(lambda: torch.add(a, b, out=out), 100, max(iters // 10, 5))
    row("launch_add", f"{n}", "fp32", s * 1e6, "us")
    s = time_loop(lambda: torch.add(a, b, out=out), warm, iters * 5)
    row("launch_eager", f"{n}", "fp32", s * 1e6, "us")

    try:
        l2_rows(row, torch, warm)
    except Exception as e:  # Triton missing or failing must not lose the other rows
        print(f"l2_read skipped: {e}", flush=True)

    out_path = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", f"gpu_calibration_{hw}.csv"
    )
    write_csv(out_path, dev, rows, f"PyTorch {torch.__version__}, CUDA {torch.version.cuda}")


if __name__ == "__main__":
    main()
