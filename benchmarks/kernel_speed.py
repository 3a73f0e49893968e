"""Speed of the fused SVDQuant kernels per layer shape, on this machine's GPU.

For every FLUX.1 and SDXL linear shape, the time and effective TOPS (2·M·N·K / time) of
  fused      the W4A4 layer on the CUDA kernels (kernel 1: quantize + branch-down; kernel 2: 4-bit GEMM
             + branch-up + bias), and kernel 1's share of that time (with its split-K branch sum), the
             bytes kernel 1 must move (x in, codes, scales and branch input out) per second, and that rate
             as a share of this GPU's measured copy bandwidth (a tensor copy of 512 MiB)
  16-bit     torch F.linear with a dense 16-bit weight of the same shape (bf16 or fp16, as --dtype)
  reference  the layer's PyTorch reference path (what runs without the kernels)
  w4a16      a weight-only baseline: unpack the 4-bit weight to 16 bits with torch ops, then F.linear
  fp8        what FP8 users run on sm_89+: per-row FP8 weights, activations quantized per row on the
             fly with torch ops, torch._scaled_mm (activation quantization included in the time)
  emulated   on sm_90+ only: the same fused layer with the sm_80 kernel's native 4-bit MMA, which
             these GPUs emulate (what an INT4 engine without a Hopper path runs there)
  wgmma      on sm_90 only: the same fused layer with the opt-in kernel 2 on warpgroup MMA
             (gemm_w4a4_sm90.cu, SVDQUANT_WGMMA=1), its TOPS as a share of the INT8 dense tensor peak, its
             speed-up over 16-bit and its relative error (the fused column is today's default path)
and the relative error of the fused output against the reference path. Then the AdaLN modulation
GEMV (W4A16, M = batch) against F.linear (speed-up = 16-bit time / fused time) and the reference path.
Prints markdown tables with the device, the date and the versions. Weights are random (speed does not
depend on their values).

    python benchmarks/kernel_speed.py                                # INT4, bf16, FLUX and SDXL
    python benchmarks/kernel_speed.py --precision nvfp4 --dtype float16 --shapes flux
    python benchmarks/kernel_speed.py --shapes flux --tokens 512     # every FLUX shape at M = 512
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from install import load_pack  # noqa: E402  (the pack imported as a package, as ComfyUI does)

pack = load_pack()
layers = importlib.import_module(f"{pack.__name__}.svdquant.layers")
kernels = importlib.import_module(f"{pack.__name__}.kernels")
backend = importlib.import_module(f"{pack.__name__}.kernels.backend")
build = importlib.import_module(f"{pack.__name__}.kernels.build")
runtime = importlib.import_module(f"{pack.__name__}.kernels.runtime")

# (name, K, N, M): FLUX.1 at 1024² (4096 image + 512 text tokens), SDXL at 1024² (4096 / 1024 tokens).
FLUX = [("double qkv", 3072, 9216, 4096), ("double qkv (text)", 3072, 9216, 512), ("double proj", 3072, 3072, 4096),
        ("double mlp fc1", 3072, 12288, 4096), ("double mlp fc2", 12288, 3072, 4096),
        ("single linear1", 3072, 21504, 4608), ("single linear2", 15360, 3072, 4608)]
SDXL = [("attn 640", 640, 640, 4096), ("ff in 640", 640, 5120, 4096), ("ff out 640", 2560, 640, 4096),
        ("cross k/v 640", 2048, 640, 77), ("attn 1280", 1280, 1280, 1024), ("ff in 1280", 1280, 10240, 1024),
        ("ff out 1280", 5120, 1280, 1024), ("cross k/v 1280", 2048, 1280, 77)]
MODULATION = [("double modulation", 3072, 18432), ("single modulation", 3072, 9216)]


def random_w4a4(k: int, n: int, rank: int, precision: str, dtype: torch.dtype, device: torch.device):
    """A W4A4 layer whose buffers hold random bytes of a plausible range."""
    layer = layers.W4A4Linear(k, n, rank, precision, act_unsigned=False, dtype=dtype, device=device)
    layer.qweight.random_(-128, 128)
    if precision == "int4":
        layer.wscales.uniform_(0.001, 0.02)
    else:
        layer.wscales.copy_(torch.empty(layer.wscales.shape, device=device).uniform_(1, 400).to(torch.float8_e4m3fn))
        layer.wcscales.uniform_(0.5, 1.5)
        layer.wtscale.fill_(3e-5)
    layer.smooth_factor.uniform_(0.5, 1.5)
    layer.proj_down.normal_(0, 0.05)
    layer.proj_up.normal_(0, 0.05)
    layer.bias.normal_()
    return layer


def random_w4a16(k: int, n: int, dtype: torch.dtype, device: torch.device):
    layer = layers.W4A16Linear(k, n, dtype=dtype, device=device)
    layer.qweight.random_(-(2**31), 2**31 - 1)
    layer.wscales.uniform_(0.001, 0.01)
    layer.wzeros.copy_(-7.5 * layer.wscales)
    layer.bias.normal_()
    return layer


def dequantize_then_matmul(packed: torch.Tensor, scales: torch.Tensor):
    """The weight-only baseline: 4-bit codes (N, K/2 bytes) and 16-bit scales (N, K/64) → F.linear."""
    n, k = packed.shape[0], packed.shape[1] * 2

    def run(x: torch.Tensor) -> torch.Tensor:
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(n, k // 64, 64).to(x.dtype) - 8
        return F.linear(x, (nibbles * scales.unsqueeze(-1)).view(n, k))

    return run


def fp8_rowwise(weight: torch.Tensor):
    """FP8 E4M3 with a scale per weight row and per activation row (quantized on each call)."""
    w_scale = weight.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448
    w8 = (weight / w_scale).to(torch.float8_e4m3fn)

    def run(x: torch.Tensor) -> torch.Tensor:
        x_scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448
        x8 = (x / x_scale).to(torch.float8_e4m3fn)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=x.dtype)

    return run


def emulated_int4_gemm(device):
    """Kernel 2 built with the native 4-bit MMA (SVDQ_EMULATED_S4) for this GPU: name → function."""
    return device.variant(build.FAMILIES["int4"][1], ["SVDQ_EMULATED_S4"]).get_function


def with_kernel2(device, get_function, layer, x: torch.Tensor, wgmma: bool = False):
    """The fused layer with kernel 1 as usual (with its split-K branch sum) and kernel 2 from ``get_function``:
    (run, its output)."""
    y, (*kernel1, (gemm, *launch2)) = backend.plan_w4a4(layer, x, wgmma=wgmma)
    gemm_fn = get_function(gemm)

    def run() -> None:
        for name, *launch1 in kernel1:
            device.launch(layer.precision, name, *launch1)
        device.launch_function(gemm_fn, *launch2)

    return run, y


def int8_peak_tops(device: torch.device) -> tuple[float, str]:
    """The dense INT8 tensor-core rate of a Hopper GPU: 4096 multiply-adds per SM per clock at the maximum SM
    clock (1979 TOPS for an H100 SXM or H200: 132 SMs at 1.83 GHz), and how the clock was found."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    try:  # cudaDevAttrClockRate (kHz)
        mhz, source = runtime.import_cupy().cuda.runtime.deviceGetAttribute(13, device.index) / 1e3, "device"
    except Exception:  # noqa: BLE001 (an attribute CUDA may drop: fall back to the SXM parts' boost clock)
        mhz, source = 1830.0, "assumed"
    return 2 * 4096 * sms * mhz / 1e6, f"{sms} SMs x 4096 MAC/clk x {mhz:.0f} MHz ({source})"


def milliseconds(fn, iters: int) -> float:
    """Median of ``iters`` CUDA-event timings after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tops(flops: float, ms: float) -> str:
    return f"{flops / ms / 1e9:.0f}"


def copy_gbps(device: torch.device, iters: int) -> float:
    """Bytes read + written per second by a 512 MiB device-to-device tensor copy, in GB/s: the rate a
    kernel bound by memory bandwidth can hope for on this GPU."""
    src = torch.empty(2**29, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * 2**29 / milliseconds(lambda: dst.copy_(src), iters) / 1e6


def kernel1_bytes(m: int, k: int, rank: int, precision: str) -> int:
    """What kernel 1 must read and write: x (16-bit) and proj_down in; 4-bit codes, the scales (fp32 per 64
    columns, or FP8 per 16) and the 16-bit branch input out."""
    scales = m * k // 64 * 4 if precision == "int4" else m * k // 16
    return 2 * m * k + 2 * k * rank + m * k // 2 + scales + 2 * m * rank


def w4a4_row(name: str, k: int, n: int, m: int, precision: str, dtype: torch.dtype, rank: int, iters: int,
             device, emulated, wgmma, copy: float) -> str:
    layer = random_w4a4(k, n, rank, precision, dtype, device)
    x = torch.randn(m, k, device=device, dtype=dtype)
    dense = torch.randn(n, k, device=device, dtype=dtype) * 0.02
    baseline = dequantize_then_matmul(torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8),
                                      torch.rand(n, k // 64, device=device, dtype=dtype) * 0.02)
    flops = 2.0 * m * n * k
    fused = milliseconds(lambda: layer(x), iters)
    gpu = runtime.probe(device.index)
    *kernel1_launches, _ = backend.plan_w4a4(layer, x)[1]  # kernel 1, and its branch sum when K is split
    kernel1 = milliseconds(lambda: [gpu.launch(precision, *launch) for launch in kernel1_launches], iters)
    kernel1_rate = kernel1_bytes(m, k, rank, precision) / kernel1 / 1e6
    sixteen = milliseconds(lambda: F.linear(x, dense), iters)
    reference = milliseconds(lambda: layer.reference_forward(x), max(3, iters // 10))
    w4a16 = milliseconds(lambda: baseline(x), iters)
    cells = [f"{fused:.3f}", f"{kernel1:.3f}", f"{kernel1_rate:.0f}", f"{100 * kernel1_rate / copy:.0f} %",
             tops(flops, fused), f"{sixteen:.3f}", tops(flops, sixteen), f"{sixteen / fused:.2f}x"]
    if torch.cuda.get_device_capability(device) >= (8, 9):
        if dtype == torch.bfloat16:  # row-wise _scaled_mm writes bf16 only
            fp8 = fp8_rowwise(dense)
            cells.append(f"{milliseconds(lambda: fp8(x), iters):.3f}")
        else:
            cells.append("n/a")
    if emulated is not None:
        cells.append(f"{milliseconds(with_kernel2(*emulated, layer, x)[0], iters):.3f}")
    if wgmma is not None:
        gpu, peak = wgmma
        run, y = with_kernel2(gpu, lambda name: backend.kernel_function(gpu, "int4", name), layer, x, wgmma=True)
        ms = milliseconds(run, iters)
        run()
        ref = layer.reference_forward(x).double()
        wgmma_error = float((y.double() - ref).norm() / ref.norm())
        cells += [f"{ms:.3f}", f"{tops(flops, ms)} ({flops / ms / 1e9 / peak:.0%})", f"{sixteen / ms:.2f}x",
                  f"{wgmma_error:.1e}"]
    ref = layer.reference_forward(x).double()
    error = float((layer(x).double() - ref).norm() / ref.norm())
    return f"| {name} | {m} | {k} | {n} | {' | '.join(cells)} | {reference:.2f} | {w4a16:.3f} | {error:.1e} |"


def w4a16_row(name: str, layer, dense: torch.Tensor, m: int, iters: int) -> str:
    n, k = dense.shape
    x = torch.randn(m, k, device=dense.device, dtype=dense.dtype)
    fused = milliseconds(lambda: layer(x), iters)
    sixteen = milliseconds(lambda: F.linear(x, dense), iters)
    reference = milliseconds(lambda: layer.reference_forward(x), max(3, iters // 10))
    ref = layer.reference_forward(x).double()
    error = float((layer(x).double() - ref).norm() / ref.norm())
    weight_bytes = n * k / 2 + 4 * n * k / 64  # codes + 16-bit scales and zeros
    return (f"| {name} | {m} | {k} | {n} | {fused * 1e3:.1f} | {weight_bytes / fused / 1e6:.0f} "
            f"| {sixteen * 1e3:.1f} | {sixteen / fused:.2f}x | {reference * 1e3:.0f} | {error:.1e} |")


def bench(shapes, precision: str, dtype: torch.dtype, rank: int, iters: int, device) -> None:
    dtype_name = str(dtype).replace("torch.", "")
    capability = torch.cuda.get_device_capability(device)
    columns = ["fused ms", "of which kernel 1 ms", "kernel 1 GB/s", "of copy", "fused TOPS", "16-bit ms",
               "16-bit TFLOPS", "speed-up"]
    if capability >= (8, 9):
        columns.append("FP8 row-wise ms")
    emulated = wgmma = None
    if capability[0] >= 9 and precision == "int4":
        gpu = runtime.probe(device.index)
        emulated = (gpu, emulated_int4_gemm(gpu))
        columns.append("emulated INT4 ms")
    if capability == (9, 0) and precision == "int4":
        gpu = runtime.probe(device.index)
        peak, how = int8_peak_tops(device)
        wgmma = (gpu, peak)
        columns += ["wgmma ms", "wgmma TOPS (% of INT8 peak)", "wgmma speed-up", "wgmma rel. error"]
        print(f"\nINT8 dense peak {peak:.0f} TOPS: {how}")
    columns += ["reference ms", "W4A16 ms", "rel. error"]
    copy = copy_gbps(device, iters)
    print(f"\n### W4A4 {precision}, rank {rank}, {dtype_name} (copy bandwidth: {copy:.0f} GB/s)\n")
    print(f"| layer | M | K | N | {' | '.join(columns)} |")
    print("|---" * (4 + len(columns)) + "|")
    for name, k, n, m in shapes:
        print(w4a4_row(name, k, n, m, precision, dtype, rank, iters, device, emulated, wgmma, copy),
              flush=True)
        torch.cuda.empty_cache()
    print(f"\n### W4A16 modulation GEMV, {dtype_name}\n")
    print("| layer | M | K | N | fused µs | fused GB/s (weights) | 16-bit µs | speed-up | reference µs | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, k, n in MODULATION:
        layer, dense = random_w4a16(k, n, dtype, device), torch.randn(n, k, device=device, dtype=dtype) * 0.02
        for m in (1, 2):
            print(w4a16_row(name, layer, dense, m, iters), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=["int4", "nvfp4"], default="int4")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--shapes", choices=["flux", "sdxl", "all"], default="all")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--tokens", type=int, help="run every shape at this M instead of its 1024² token count")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: this benchmark times the CUDA kernels")
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    choice = kernels.enable("cuda")  # fails, saying why, if the kernels cannot run here
    props = torch.cuda.get_device_properties(device)
    print(f"## SVDQuant kernels on {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC · torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}) · {choice}")
    print("TOPS = 2·M·N·K / time (the low-rank branch's extra work is not counted); W4A16 = torch-op dequantize "
          "+ F.linear (a fused weight-only kernel would be faster).")
    shapes = {"flux": FLUX, "sdxl": SDXL, "all": FLUX + SDXL}[args.shapes]
    if args.tokens:
        shapes = [(name.removesuffix(" (text)"), k, n, args.tokens) for name, k, n, _ in shapes]
        shapes = list(dict.fromkeys(shapes))
    with torch.inference_mode():
        bench(shapes, args.precision, dtype, args.rank, args.iters, device)


if __name__ == "__main__":
    main()
