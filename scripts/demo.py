"""The main job: a small FLUX-architecture model, made 4-bit by the pack's real quantizer inside a real
ComfyUI, then the example text-to-image workflow run with the 16-bit model and with the SVDQuant one.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/demo.py    # with ComfyUI's own Python; no other arguments

What happens, all in a headless ComfyUI server started for the run (GPU if there is one, else CPU):
1. The small model files are written: a FLUX.1-dev-layout model (ComfyUI's own Flux class at width 128,
   random weights) as diffusion_models/flux1-dev.safetensors, small text encoders and a VAE under the names
   the workflows use (tests/tiny_pipeline.py says how they are made and what ComfyUI is taught to load them).
2. workflows/svdquant-quantize-and-save.json runs: ComfyUI's UNETLoader loads the 16-bit model, the pack's
   Quantize node calibrates on the workflow's prompts with the model's own sampler and quantizes it, the
   Save node writes the SVDQuant file to diffusion_models.
3. workflows/flux1-dev-svdquant.json runs twice: as it is (Load SVDQuant Model with that file), and with the
   loader swapped for ComfyUI's UNETLoader on the 16-bit file. Each runs a second time with another seed
   (the model then stays loaded), to time sampling alone.
Written to out/demo/ (or --out): comparison.png (16-bit | SVDQuant | difference ×4), both images,
report.md and report.json (image error and PSNR, file sizes, times), and the ComfyUI folder it ran in.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUANTIZE_WORKFLOW = ROOT / "workflows" / "svdquant-quantize-and-save.json"
IMAGE_WORKFLOW = ROOT / "workflows" / "flux1-dev-svdquant.json"
DENSE_NAME = "flux1-dev.safetensors"

MISSING_COMFYUI = """ComfyUI was not found.
The main job runs a real ComfyUI. Either
  - set COMFYUI_PATH to a ComfyUI checkout and run this with the Python that runs that ComfyUI:
        COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python scripts/demo.py
  - or put this repository into ComfyUI/custom_nodes/ and run it with ComfyUI's Python from there.
ComfyUI: https://github.com/comfyanonymous/ComfyUI (git clone, then pip install -r requirements.txt)."""


def find_comfyui() -> Path | None:
    candidates = [os.environ.get("COMFYUI_PATH"), str(ROOT.parent.parent)]
    for candidate in filter(None, candidates):
        path = Path(candidate).expanduser()
        if (path / "comfy" / "model_management.py").exists() and (path / "main.py").exists():
            return path.resolve()
    return None


def import_comfyui(comfyui: Path) -> None:
    """ComfyUI in this process (CPU), for writing the small model files with ComfyUI's own classes."""
    sys.path.insert(0, str(comfyui))
    sys.path.insert(0, str(ROOT / "tests"))  # the small-model builders and the server helper
    try:
        import comfy.cli_args
    except ImportError as exc:
        sys.exit(f"{MISSING_COMFYUI}\n\nImporting ComfyUI from {comfyui} failed ({exc}): run this with the Python "
                 "that has ComfyUI's requirements installed.")
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu)


def write_models(models: Path, seed: int, blocks: int) -> dict:
    """The 16-bit FLUX and everything else the two workflows load; returns the model's description."""
    import tiny_pipeline

    text, vae = models / "text_encoders", models / "vae"
    tiny_pipeline.write_clip(text / "clip_l.safetensors", tiny_pipeline.CLIP_L)
    tiny_pipeline.write_t5(text / "t5xxl_fp16.safetensors")
    tiny_pipeline.write_taesd(vae / "ae.safetensors", 16)
    model = tiny_pipeline.dense_flux(seed, guidance=True, depth=blocks, depth_single_blocks=blocks)
    tiny_pipeline.write_dense_flux(model, models / "diffusion_models" / DENSE_NAME)
    config = model.model_config.unet_config
    return {"class": "comfy.ldm.flux.model.Flux (FLUX.1-dev layout)",
            "parameters": sum(p.numel() for p in model.diffusion_model.parameters()),
            **{k: config[k] for k in ("hidden_size", "num_heads", "depth", "depth_single_blocks", "mlp_ratio")}}


def image_of(server, entry: dict) -> Path:
    images = [i for output in entry["outputs"].values() for i in output.get("images", [])]
    if not images:
        raise RuntimeError(f"the workflow saved no image: {json.dumps(entry)[:2000]}")
    return server.base / images[-1]["type"] / images[-1]["subfolder"] / images[-1]["filename"]


def run(server, prompt: dict, what: str) -> tuple[dict, float]:
    from comfy_server import seconds

    start = time.perf_counter()
    entry = server.run(prompt, timeout=3600)
    wall = time.perf_counter() - start
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(f"{what} failed: {json.dumps(entry['status'])[:4000]}\n{server.tail()}")
    print(f"  {what}: {seconds(entry) or wall:.1f} s")
    return entry, seconds(entry) or wall


def with_seed(prompt: dict, seed: int) -> dict:
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        if "seed" in node["inputs"]:
            node["inputs"]["seed"] = seed
    return out


def compare(dense_png: Path, svdq_png: Path, out: Path) -> dict:
    """Side-by-side PNG (16-bit | SVDQuant | difference ×4) and the image error."""
    import numpy as np
    from PIL import Image, ImageDraw

    a = np.asarray(Image.open(dense_png).convert("RGB"), dtype=np.float64) / 255
    b = np.asarray(Image.open(svdq_png).convert("RGB"), dtype=np.float64) / 255
    mse = float(((a - b) ** 2).mean())
    diff = np.clip(np.abs(a - b) * 4, 0, 1)
    panels = [Image.fromarray((x * 255).round().astype(np.uint8)) for x in (a, b, diff)]
    scale = max(1, 256 // panels[0].width)
    panels = [p.resize((p.width * scale, p.height * scale), Image.NEAREST) for p in panels]
    w, h, header = panels[0].width, panels[0].height, 20
    sheet = Image.new("RGB", (3 * w + 20, h + header), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (panel, label) in enumerate(zip(panels, ("16-bit", "SVDQuant W4A4", "|difference| x4"), strict=True)):
        sheet.paste(panel, (i * (w + 10), header))
        draw.text((i * (w + 10) + 4, 4), label, fill="black")
    sheet.save(out)
    return {"psnr_db": 10 * float(np.log10(1 / mse)) if mse > 0 else float("inf"),
            "relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
            "max_abs_difference": float(np.abs(a - b).max())}


def report_markdown(r: dict) -> str:
    mb = 1e6
    ratio = r["files"]["dense_bytes"] / r["files"]["svdquant_bytes"]
    t = r["times_s"]
    lines = [
        f"# SVDQuant main job ({r['date']}, {r['device']}, ComfyUI {r['comfyui_version']})", "",
        f"Model: {r['model']['class']}, width {r['model']['hidden_size']}, {r['model']['depth']} double + "
        f"{r['model']['depth_single_blocks']} single blocks, {r['model']['parameters'] / 1e6:.2f} M parameters "
        "(random weights).",
        f"Image: {r['settings']['size']}×{r['settings']['size']} px, {r['settings']['steps']} steps, seed "
        f"{r['settings']['seed']}; calibration: the quantize workflow's prompts, {r['settings']['calibration_steps']} "
        f"steps at {r['settings']['size']}×{r['settings']['size']}.", "",
        "| | 16-bit | SVDQuant int4 |", "|---|---|---|",
        f"| file | {r['files']['dense_bytes'] / mb:.2f} MB | {r['files']['svdquant_bytes'] / mb:.2f} MB "
        f"({ratio:.2f}× smaller) |",
        f"| workflow, first run (load + sample) | {t['dense_first_run']:.1f} s | {t['svdquant_first_run']:.1f} s |",
        f"| workflow, second run (sample) | {t['dense_second_run']:.1f} s | {t['svdquant_second_run']:.1f} s |", "",
        f"Quantize-and-save workflow (calibration sampling, quantization, save, check image): "
        f"{t['quantize_workflow']:.1f} s.", "",
        f"SVDQuant image against the 16-bit image: PSNR {r['image']['psnr_db']:.1f} dB, relative error "
        f"{r['image']['relative_error']:.4f}, largest pixel difference {r['image']['max_abs_difference']:.3f}.", "",
        "![16-bit | SVDQuant | difference](comparison.png)", "",
        "At this width the 16-bit parts (embedders, norms) and the rank-32 low-rank branches weigh a lot next to "
        "128-wide layers, so the file shrinks less than FLUX.1-dev's does (23.8 GB at 16 bits, 6.8 GB as "
        "svdq-int4_r32). CPU timings measure the PyTorch reference path, not the fused CUDA kernels.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="output folder (default out/demo)")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20, the workflow's)")
    parser.add_argument("--calibration-steps", type=int, default=8, help="calibration sampling steps per prompt")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--blocks", type=int, default=2, help="double and single blocks each (FLUX.1: 19 and 38)")
    parser.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU even if there is a GPU")
    parser.add_argument("--quick", action="store_true",
                        help="a fast check (the tests use it): 64 px, 2 steps, 1 calibration step, 1+1 blocks, "
                             "no smoothing search")
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps, args.calibration_steps, args.blocks = 64, 2, 1, 1

    comfyui = find_comfyui()
    if comfyui is None:
        sys.exit(MISSING_COMFYUI)
    import_comfyui(comfyui)
    import torch
    import workflow_format as wf
    from comfy_server import ComfyServer

    out = args.out.resolve()
    base = out / "comfyui"
    if base.exists():
        shutil.rmtree(base)  # this script's own folder from an earlier run
    out.mkdir(parents=True, exist_ok=True)
    models = base / "models"
    cpu = args.cpu or not torch.cuda.is_available()
    device = "CPU" if cpu else torch.cuda.get_device_name()
    print(f"Main job: writing to {out} (ComfyUI {comfyui}, on {device})")

    start = time.perf_counter()
    model = write_models(models, args.seed, args.blocks)
    times = {"write_models": time.perf_counter() - start}
    print(f"  small model files: {times['write_models']:.1f} s")

    server = ComfyServer(comfyui, base, cpu=cpu, extra_args=("--bf16-unet",)).start()  # both models in bf16
    try:
        object_info = server.get("/object_info")
        quantize = wf.scaled_down(wf.to_api(wf.load(QUANTIZE_WORKFLOW), object_info), args.size,
                                  args.calibration_steps, smoothing_search=not args.quick)
        _, times["quantize_workflow"] = run(server, quantize, "quantize-and-save workflow")
        # ComfyUI's diffusion_models are models/diffusion_models and the legacy models/unet
        saved = sorted(models.glob("*/**/*svdq*.safetensors"), key=lambda p: p.stat().st_mtime)
        if not saved:
            raise RuntimeError(f"the quantize workflow wrote no SVDQuant file:\n{server.tail()}")
        svdq_file = saved[-1]
        svdq_root = next(p for p in (models / "diffusion_models", models / "unet") if p in svdq_file.parents)

        svdq_prompt = wf.scaled_down(wf.to_api(wf.load(IMAGE_WORKFLOW), object_info), args.size, args.steps)
        loader_id = next(k for k, v in svdq_prompt.items() if v["class_type"] == "SVDQuantModelLoader")
        svdq_prompt[loader_id]["inputs"]["model_name"] = svdq_file.relative_to(svdq_root).as_posix()
        dense_prompt = json.loads(json.dumps(svdq_prompt))
        dense_prompt[loader_id] = {"class_type": "UNETLoader",
                                   "inputs": {"unet_name": DENSE_NAME, "weight_dtype": "default"}}
        for prompt, prefix in ((svdq_prompt, "demo/svdquant"), (dense_prompt, "demo/16bit")):
            for node in prompt.values():
                if node["class_type"] == "SaveImage":
                    node["inputs"]["filename_prefix"] = prefix
        svdq_prompt, dense_prompt = with_seed(svdq_prompt, args.seed), with_seed(dense_prompt, args.seed)

        dense_entry, times["dense_first_run"] = run(server, dense_prompt, "16-bit text-to-image")
        svdq_entry, times["svdquant_first_run"] = run(server, svdq_prompt, "SVDQuant text-to-image")
        _, times["dense_second_run"] = run(server, with_seed(dense_prompt, args.seed + 1), "16-bit, second seed")
        _, times["svdquant_second_run"] = run(server, with_seed(svdq_prompt, args.seed + 1), "SVDQuant, second seed")
        dense_png, svdq_png = image_of(server, dense_entry), image_of(server, svdq_entry)
        version = server.get("/system_stats").get("system", {}).get("comfyui_version", "?")
    finally:
        server.stop()

    shutil.copyfile(dense_png, out / "image-16bit.png")
    shutil.copyfile(svdq_png, out / "image-svdquant.png")
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "comfyui_version": version,
        "model": model,
        "settings": {"size": args.size, "steps": args.steps, "seed": args.seed,
                     "calibration_steps": args.calibration_steps, "smoothing": not args.quick},
        "files": {"dense": str(models / "diffusion_models" / DENSE_NAME), "svdquant": str(svdq_file),
                  "dense_bytes": (models / "diffusion_models" / DENSE_NAME).stat().st_size,
                  "svdquant_bytes": svdq_file.stat().st_size},
        "image": compare(dense_png, svdq_png, out / "comparison.png"),
        "times_s": times,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(report_markdown(report))
    print(f"\n{report_markdown(report)}\nWritten: {out / 'comparison.png'}, {out / 'report.md'}, {out / 'report.json'}")


if __name__ == "__main__":
    main()
