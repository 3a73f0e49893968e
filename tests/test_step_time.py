"""benchmarks/step_time.py at its tiny size: ComfyUI's own FLUX and SDXL classes, a step and a sampled image
per row, and a table with a number in every cell it measures."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch

from pack_import import ROOT

VARIANTS = ["16-bit", "FP8 e4m3fn", "FP8 e4m3fn_fast", "SVDQuant INT4 fused", "SVDQuant INT4 reference"]
# Cells after "how it runs": ms per step, n, host ms, CPU ms in SVDQuant layers, peak GPU GB, weights GB, image s.
MEASURED = ["ms", "n", "host", "layers", "peak", "weights", "image"]


def table_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[1] in VARIANTS:
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def finite(cell: str) -> bool:
    try:
        return math.isfinite(float(cell)) and float(cell) > 0
    except ValueError:
        return False


def test_tiny_step_table(comfy):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--tiny", "--steps", "2",
                          "--warmup", "1"], capture_output=True, text=True, timeout=900, check=False,
                         env=dict(os.environ, COMFYUI_PATH=str(comfy)))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "## Step time, " in out.stdout and "ComfyUI " in out.stdout and "--tiny" in out.stdout
    rows = table_rows(out.stdout)
    assert set(rows) == {(model, v) for model in ("FLUX (tiny)", "SDXL (tiny)") for v in VARIANTS}
    cuda = torch.cuda.is_available()
    for (model, variant), cells in rows.items():
        how, values = cells[0], dict(zip(MEASURED, cells[1:], strict=True))
        if not cuda and variant in ("FP8 e4m3fn", "FP8 e4m3fn_fast", "SVDQuant INT4 fused"):
            assert how == "n/a on CPU" and not any(values.values()), (model, variant, cells)
            continue
        if how.startswith("n/a:"):  # on a GPU: FP8 matmuls or the kernels not offered there, with the reason
            assert variant != "16-bit" and variant != "SVDQuant INT4 reference", (model, variant, how)
            continue
        assert int(values["n"]) == 10, (model, variant, cells)
        for name in ("ms", "host", "weights", "image"):
            assert finite(values[name]), (model, variant, name, cells)
        assert finite(values["peak"]) if cuda else values["peak"] == "n/a on CPU", (model, variant, cells)
        if variant.startswith("SVDQuant"):
            assert finite(values["layers"]), (model, variant, cells)
            assert "layers on the" in how, how  # how many layers took which path, as the loader logs it
        else:
            assert values["layers"] == "–" and how.startswith("comfy.ops."), (model, variant, cells)
    # The packed model is smaller than the 16-bit one wherever its layers hold most of the weights (FLUX).
    flux = {v: float(rows[("FLUX (tiny)", v)][6]) for v in ("16-bit", "SVDQuant INT4 reference")}
    assert flux["SVDQuant INT4 reference"] < flux["16-bit"], flux


def test_full_size_weights(comfy):
    """--weights-only builds FLUX.1-dev and SDXL at full size on the meta device: ComfyUI's detection picks its
    own classes for them, the pack quantizes every transformer Linear, and the sizes are those of the models."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--weights-only"],
                         capture_output=True, text=True, timeout=900, check=False,
                         env=dict(os.environ, COMFYUI_PATH=str(comfy)))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    rows = table_rows(out.stdout)
    megabytes = {key: float(cells[6]) for key, cells in rows.items() if cells[6]}
    assert set(megabytes) == {(m, v) for m in ("FLUX.1-dev", "SDXL") for v in ("16-bit", "FP8 e4m3fn",
                                                                                "SVDQuant INT4 reference")}
    assert 23_700 < megabytes[("FLUX.1-dev", "16-bit")] < 23_900  # 11.9 B parameters
    assert 5_100 < megabytes[("SDXL", "16-bit")] < 5_200  # 2.57 B parameters
    for model in ("FLUX.1-dev", "SDXL"):
        sixteen = megabytes[(model, "16-bit")]
        assert abs(megabytes[(model, "FP8 e4m3fn")] - sixteen / 2) < 0.2, megabytes
    # FLUX: 10 quantized Linears per double block, 3 per single block; SDXL: 8 per transformer block, 70 blocks.
    assert rows[("FLUX.1-dev", "SVDQuant INT4 reference")][0].startswith(f"{19 * 10 + 38 * 3} quantized Linears")
    assert rows[("SDXL", "SVDQuant INT4 reference")][0].startswith(f"{70 * 8} quantized Linears")
    assert megabytes[("FLUX.1-dev", "SVDQuant INT4 reference")] < megabytes[("FLUX.1-dev", "16-bit")] / 3
