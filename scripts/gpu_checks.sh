#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one run: the kernel correctness tests, the same kernels under
# compute-sanitizer (memcheck with torch's caching allocator off, so every buffer is its own allocation;
# racecheck on one layer), the kernel and launch-cost benchmark tables and, with COMFYUI_PATH set, the model step-time table.
# Logs and tables go to ${OUT:-out/gpu}. The steps' timeouts add up to 8 minutes, so a 15-minute GPU loan
# covers a run and a rerun.
#
#     scripts/gpu_checks.sh            # uses python3; PYTHON=... to choose another interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

step device
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
"$PY" -c "import torch, cupy; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '· cupy', cupy.__version__)" \
    | tee -a "$OUT/device.txt"

step "kernel tests"
timeout 120 "$PY" -m pytest -q -rs tests/test_kernels_gpu.py -k "not wgmma" 2>&1 \
    | tee "$OUT/tests.log"

step "opt-in wgmma kernel 2 (SVDQUANT_WGMMA=1, sm_90 only): every FLUX.1 shape at M = 4608 and 512"
timeout 60 "$PY" -m pytest -q -rs tests/test_kernels_gpu.py -k wgmma 2>&1 | tee "$OUT/tests-wgmma.log"

step "benchmark: INT4 bf16, FLUX.1 and SDXL shapes at 1024²"
timeout 90 "$PY" benchmarks/kernel_speed.py --iters 20 2>&1 | tee "$OUT/kernels-int4-bf16.md"

step "benchmark: FLUX.1 shapes at M = 512"
timeout 30 "$PY" benchmarks/kernel_speed.py --shapes flux --tokens 512 --iters 20 2>&1 | tee "$OUT/kernels-int4-bf16-m512.md"

step "benchmark: INT4 fp16, FLUX.1 shapes"
timeout 30 "$PY" benchmarks/kernel_speed.py --shapes flux --dtype float16 --iters 20 2>&1 | tee "$OUT/kernels-int4-fp16.md"

step "benchmark: the launch path's CPU cost per call (real launches), beside bf16 F.linear"
timeout 20 "$PY" benchmarks/launch_overhead.py --gpu --calls 1000 2>&1 | tee "$OUT/launch-overhead.md"

step "benchmark: step time, FLUX.1 and SDXL at 1024² (16-bit, FP8, SVDQuant INT4), one 20-step image each"
# Needs ComfyUI (COMFYUI_PATH) and its Python packages; the reference rows time 2 steps and sample no image.
# (40 s of the 8 minutes: the lent machines have no ComfyUI, so this step is skipped there.)
if [ -n "${COMFYUI_PATH:-}" ]; then
    timeout 40 "$PY" benchmarks/step_time.py --reference-iters 2 2>&1 | tee "$OUT/step-time.md"
else
    echo "skipped: set COMFYUI_PATH to a ComfyUI checkout to run benchmarks/step_time.py" | tee "$OUT/step-time.md"
fi

step "compute-sanitizer memcheck"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 50 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" -m pytest -q tests/test_kernels_gpu.py \
    -k "test_quantize_is_bit_exact or test_w4a4_unpadded_features or (test_w4a16_matches_reference and 3000) \
        or (test_wgmma_kernel_at_flux_shapes and 3072-3072-512)" 2>&1 \
    > "$OUT/memcheck.log"
grep -E "^=========|passed|failed" "$OUT/memcheck.log" | head -60

step "compute-sanitizer racecheck"
timeout 40 compute-sanitizer --tool racecheck --error-exitcode 9 \
    "$PY" -m pytest -q tests/test_kernels_gpu.py -k "test_quantize_is_bit_exact and int4 and not uint4" 2>&1 \
    > "$OUT/racecheck.log"
grep -E "^=========|passed|failed" "$OUT/racecheck.log" | head -60
step done
