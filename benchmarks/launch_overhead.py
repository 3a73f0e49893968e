"""CPU cost of one fused layer call: everything the Python launch path does (device and dtype checks,
the plan lookup, output and workspace, the argument buffers, the driver calls). This is the time a FLUX
step spends in Python before any kernel runs (about 500 quantized layer calls per step), so it is
measured, not assumed. Where ComfyUI is found (COMFYUI_PATH, or this repository in its custom_nodes), also
the whole layer call as ComfyUI's model makes it (the pack's custom operation around the layer, the input
shaped as the model passes it, inference mode), without and with a LoRA.

    python benchmarks/launch_overhead.py                 # no GPU: the driver's launch call stubbed
    python benchmarks/launch_overhead.py --gpu           # on a GPU: real launches, beside bf16 F.linear

Without ``--gpu`` (tests/stub_gpu.py): ``cupy``'s ``cuLaunchKernel`` binding does nothing, torch's current
CUDA stream and the device probe are stubbed; layers and inputs live on the CPU (plain tensors whose
``is_cuda`` says True), inputs are small (16 rows; the modulation's one) so that CPU malloc stands in for
the caching allocator's cost. With ``--gpu``: the CPU time of enqueuing calls in batches small enough that
the GPU never makes the CPU wait (each batch synchronised before the clock starts), beside the same for
torch's bf16 ``F.linear``. Prints a markdown table with the date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import pack_import  # noqa: E402, F401, I001  (first: the pack as the package comfyui_svdquant, as the tests import it)
from quantize_common import find_comfyui  # noqa: E402, I001
from stub_gpu import every_tensor_cuda_looking, stub_gpu  # noqa: E402, I001
from test_layers import random_w4a4  # noqa: E402, I001

from comfyui_svdquant import kernels  # noqa: E402
from comfyui_svdquant.kernels import backend  # noqa: E402
from comfyui_svdquant.svdquant.quantizer import quantize_w4a16  # noqa: E402

SHAPES = {  # name: (in, out, rank); rank 32 as the published FLUX checkpoints
    "FLUX qkv 3072→9216": (3072, 9216, 32),
    "FLUX mlp 12288→3072": (12288, 3072, 32),
    "SDXL attn 640→640": (640, 640, 32),
}
MODULATION = (3072, 18432)  # FLUX's double-block modulation (W4A16): one input row per image
LORA_RANK = 16
BATCH = 100  # calls enqueued between synchronisations on a GPU (200 launches: far below the launch queue)


def per_call_us(fn, calls: int, sync=None, runs: int = 30) -> float:
    """The CPU time per call of ``fn``: the fastest of ``runs`` runs of about ``calls / runs`` calls each,
    timed in batches of ``BATCH`` (each preceded by ``sync``, outside the clock) so that a GPU never holds the
    CPU back. The fastest run, not the median: on a shared VM other tenants only ever add time, and they
    move a median by up to 2x from one minute to the next."""
    for _ in range(max(calls // 10, 1)):
        fn()
    batches = max(calls // (runs * BATCH), 1)
    fastest = float("inf")
    for _ in range(runs):
        spent = 0.0
        for _ in range(batches):
            if sync:
                sync()
            start = time.perf_counter()
            for _ in range(BATCH):
                fn()
            spent += time.perf_counter() - start
        fastest = min(fastest, spent / (batches * BATCH) * 1e6)
    return fastest


def cases(rows: int):
    """(name, precision, layer, its kernel call, the input's leading dimensions as the model passes them): the
    W4A4 shapes in both precisions, a (batch, tokens) input each, then FLUX's modulation GEMV, one row per
    image."""
    for name, (k, n, rank) in SHAPES.items():
        for precision in ("int4", "nvfp4"):
            yield name, precision, random_w4a4(k, n, rank, precision), backend.w4a4, (1, rows)
    k, n = MODULATION
    generator = torch.Generator().manual_seed(0)
    layer = quantize_w4a16("modulation", torch.randn(n, k, generator=generator) * 0.02, torch.zeros(n))
    yield f"FLUX modulation {k}→{n}", "w4a16", layer, backend.w4a16, (1,)


def comfyui_ops(cpu: bool):
    """The pack's ComfyUI custom operations (ComfyUI imported for them), or None where ComfyUI is not found."""
    root = find_comfyui()
    if root is None:
        return None
    sys.path.insert(0, root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    from comfyui_svdquant.loaders.ops import SVDQuantOps

    return SVDQuantOps


def comfyui_layer(ops, layer: torch.nn.Module, lora: bool) -> torch.nn.Module:
    """``layer`` as ComfyUI's model holds it: the pack's Linear operation, with a rank-16 LoRA attached as
    ComfyUI's ModelPatcher attaches one (its patch tuple, from ComfyUI's own LoRA reader) if ``lora``."""
    import comfy.lora

    op = ops.Linear(layer.in_features, layer.out_features, dtype=torch.bfloat16)
    op.set_quantized(layer)
    if lora:
        device = layer.qweight.device
        tensors = {"l.lora_up.weight": torch.randn(layer.out_features, LORA_RANK, device=device) / LORA_RANK,
                   "l.lora_down.weight": torch.randn(LORA_RANK, layer.in_features, device=device) / 64}
        adapter = comfy.lora.load_lora({k: v.bfloat16() for k, v in tensors.items()}, {"l": "l.weight"})["l.weight"]
        op.set_lora([(1.0, adapter, 1.0, None, None)])
    return op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--gpu", action="store_true", help="real launches on the current CUDA GPU")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.gpu:
        device, sync, where = torch.device("cuda"), torch.cuda.synchronize, torch.cuda.get_device_name()
    else:
        device, sync, where = torch.device("cpu"), None, "launches stubbed"
    with contextlib.nullcontext() if args.gpu else stub_gpu(record=False), \
            contextlib.nullcontext() if args.gpu else every_tensor_cuda_looking():
        print(f"SVDQuant: {kernels.enable('cuda')}")  # what the layers' calls dispatch to
        print(f"Launch-path CPU cost per layer call, {args.rows} rows, {where}; {datetime.date.today()}, "
              f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, torch "
              f"{torch.__version__}\n")
        ops = comfyui_ops(cpu=not args.gpu)
        # The output's allocation alone: what every layer call pays, F.linear's too, and a yardstick of this
        # machine's speed at torch's per-call work
        columns = ["layer", "precision", "µs per call", "its output's allocation alone µs"]
        columns += ["ComfyUI layer call µs", "with a LoRA µs"] if ops else []
        columns += ["bf16 F.linear µs"] if args.gpu else []
        print("| " + " | ".join(columns) + " |\n| --- | --- |" + " ---: |" * (len(columns) - 2))
        for name, precision, layer, kernel, lead in cases(args.rows):
            layer = layer.to(device)
            model_input = torch.randn(*lead, layer.in_features, dtype=torch.bfloat16, device=device)
            x = model_input.view(-1, layer.in_features)
            if kernel(layer, x) is None:
                print(f"| {name} | {precision} | (reference path on this GPU) |" + " |" * (len(columns) - 3))
                continue
            n = layer.out_features
            costs = [per_call_us(lambda kernel=kernel, layer=layer, x=x: kernel(layer, x), args.calls, sync),
                     per_call_us(lambda x=x, n=n: x.new_empty((x.shape[0], n)), args.calls, sync)]
            if ops:
                with torch.inference_mode():
                    for lora in (False, True):
                        op = comfyui_layer(ops, layer, lora)
                        # A W4A16 layer's LoRA is a 16-bit term of two torch matmuls: CPU math when stubbed
                        timed = args.gpu or kernel is backend.w4a4 or not lora
                        costs.append(per_call_us(lambda op=op, inp=model_input: op(inp), args.calls, sync)
                                     if timed else float("nan"))
            if args.gpu:
                w = torch.randn(n, layer.in_features, dtype=torch.bfloat16, device=device)
                costs.append(per_call_us(lambda w=w, x=x: F.linear(x, w), args.calls, sync))
            print(f"| {name} | {precision} | " + " | ".join("—" if math.isnan(c) else f"{c:.1f}" for c in costs) + " |")
        if ops is None:
            print("\n(ComfyUI not found: set COMFYUI_PATH for the whole layer call's columns)")


if __name__ == "__main__":
    main()
