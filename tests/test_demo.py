"""The main job (scripts/demo.py) end to end, in its quick form: a real ComfyUI server, the quantize-and-save
workflow, the text-to-image workflow with the 16-bit and the SVDQuant model, the comparison and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo.py"


def test_main_job_writes_the_images_and_the_report(comfy, tmp_path):
    from PIL import Image  # ComfyUI's requirement

    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, str(DEMO), "--quick", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "COMFYUI_PATH": str(comfy)}, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["image"]["psnr_db"] > 25, report["image"]  # measured: 42 dB
    assert report["files"]["svdquant_bytes"] < report["files"]["dense_bytes"]
    assert set(report["times_s"]) >= {"quantize_workflow", "dense_first_run", "svdquant_first_run"}
    with Image.open(out / "comparison.png") as sheet, Image.open(out / "image-svdquant.png") as image:
        assert image.size == (64, 64) and sheet.width > 3 * 64
    assert "PSNR" in (out / "report.md").read_text()


@pytest.mark.skipif((ROOT.parent.parent / "comfy" / "model_management.py").exists(),
                    reason="this checkout sits inside ComfyUI/custom_nodes, where the main job always finds ComfyUI")
def test_main_job_says_what_to_do_without_comfyui(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env["COMFYUI_PATH"] = str(tmp_path / "no-comfyui-here")
    done = subprocess.run([sys.executable, str(DEMO), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode != 0
    assert "ComfyUI was not found" in done.stderr and "COMFYUI_PATH" in done.stderr
    assert not (tmp_path / "out").exists()
