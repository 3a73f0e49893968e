"""CI without a GPU: compile every kernel for every supported target with CuPy's NVRTC binding and check
the machine code (SASS): the tensor-core instruction each target must run natively, and no local memory;
and that what CuPy's RawModule compiles on a GPU is that same code.

Needs CuPy (``cupy-cuda13x``) with PyTorch's NVRTC (and ``nvidia-cuda-cuobjdump`` or ``nvidia-cuda-nvdisasm``
for the SASS checks; see requirements-test.txt); skips, saying what to install, without them.
"""

from __future__ import annotations

import re
import shutil
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

from comfyui_svdquant.kernels import build, sass

try:
    build.nvrtc()
except build.CompileError as exc:
    pytest.skip(f"{exc} (CI: pip install -r requirements-test.txt)", allow_module_level=True)

TOOL = sass.find_tool()
NEEDS_TOOL = pytest.mark.skipif(TOOL is None, reason="no cuobjdump/nvdisasm: pip install nvidia-cuda-cuobjdump")

# What each (target, family) must contain, per kernel: the MMA mnemonic and how many per kernel.
# INT4 GEMM main loop: 32 MMAs of m16n8k64 per 64-column step (a 64x64 warp tile), i.e. 32 native
# IMMA.16864 on sm_80/86/89 and 128 IMMA.8832 on sm_75; on sm_90a/sm_120a (two s8 MMAs each) the warp
# walks K twice, for 32 columns at a time: 32 IMMA.16832 in a loop run twice.
INT4_MMA = {
    "sm_75": ("IMMA.8832.{a}4.S4", 128),
    "sm_80": ("IMMA.16864.{a}4.S4", 32),
    "sm_86": ("IMMA.16864.{a}4.S4", 32),
    "sm_89": ("IMMA.16864.{a}4.S4", 32),
    "sm_90a": ("IMMA.16832.{a}8.S8", 32),
    "sm_120a": ("IMMA.16832.{a}8.S8", 32),
}
FP4_MMA = ("OMMA.SF.16864.F32.E2M1.E2M1.UE4M3.4X", 32)  # block-scaled NVFP4, sm_120a

# Kernel 2's K loop on the RTX path, per 64-column step per warp (32 IMMA.16864): today's instruction count
# is the bound, so that a regression shows without a GPU. The authors' kernel, instantiated for a FLUX linear
# on sm_89 (nvcc 13.0, 2026-12-05), runs 13.0 instructions per IMMA with no barrier in its loop; ours must
# not run more.
RTX_LOOP = 380
RTX_TARGET_PER_IMMA = 13


def _units(arch: str) -> list[build.Unit]:
    reasons = build.families_for(build.capability_of(arch))
    return [u for family, why in reasons.items() if not why for u in build.FAMILIES[family]]


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, str], build.Program]:
    """(arch, unit stem) → program, compiled once for the module, two at a time (CI has 2 cores;
    NVRTC releases the GIL)."""
    jobs = [(arch, unit) for arch in build.CI_TARGETS for unit in _units(arch)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        programs = pool.map(lambda job: build.compile_cubin(job[1], job[0], verbose=True), jobs)
        return {(arch, unit.stem): program for (arch, unit), program in zip(jobs, programs, strict=True)}


@pytest.fixture(scope="module")
def listings(compiled) -> dict[tuple[str, str], dict[str, str]]:
    if TOOL is None:
        pytest.skip("no cuobjdump/nvdisasm: pip install nvidia-cuda-cuobjdump")
    with ThreadPoolExecutor(max_workers=2) as pool:
        texts = pool.map(lambda program: sass.disassemble(program.cubin, TOOL), compiled.values())
        return dict(zip(compiled, texts, strict=True))


def _kernels(listings, arch: str, stem: str) -> dict[str, dict[str, int]]:
    return {name: sass.opcodes(text) for name, text in listings[(arch, stem)].items()}


def _quantize_kernels(listings, arch: str) -> dict[str, dict[str, int]]:
    """Kernel 1's entry points on ``arch`` (svdq_quantize_<mode>_<dtype>; not the split K's branch sum)."""
    return {name: ops for unit in _units(arch) if unit.stem.startswith("quantize")
            for name, ops in _kernels(listings, arch, unit.stem).items() if "branch_sum" not in name}


def test_supported_families_per_target():
    assert build.families_for((7, 0))["int4"]  # Volta: no 4-bit tensor cores
    for arch in build.CI_TARGETS:
        reasons = build.families_for(build.capability_of(arch))
        assert reasons["int4"] is None and reasons["w4a16"] is None, arch
        assert (reasons["nvfp4"] is None) == arch.startswith("sm_12"), arch


def _entry_points(arch: str, stem: str) -> set[str]:
    dtypes = ("fp16",) if arch == "sm_75" else ("bf16", "fp16")  # sm_75: no bf16 tensor cores
    source, _, family = stem.partition("-")
    if source == "gemv_w4a16":
        return {f"svdq_gemv_w4a16_{d}_m{m}" for d in dtypes for m in (1, 2, 4)}
    modes = ("int4", "uint4") if family == "int4" else ("nvfp4",)
    if source == "quantize":  # kernel 1, and the second stage of its split K
        return {f"svdq_quantize_{mode}_{d}" for mode in [*modes, "branch_sum"] for d in dtypes}
    return {f"svdq_gemm_{mode}_{d}" for mode in modes for d in dtypes}


@pytest.mark.parametrize("arch", build.CI_TARGETS)
def test_every_kernel_compiles_without_spills(compiled, arch):
    for unit in _units(arch):
        log = compiled[(arch, unit.stem)].log
        assert set(re.findall(r"Compiling entry function '(\w+)'", log)) == _entry_points(arch, unit.stem)
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert spills and all(s == ("0", "0") for s in spills), (arch, unit.stem, spills)
        stacks = re.findall(r"(\d+) bytes stack frame", log)
        assert all(s == "0" for s in stacks), (arch, unit.stem, stacks)


@NEEDS_TOOL
@pytest.mark.parametrize("arch", build.CI_TARGETS)
def test_no_local_memory(listings, arch):
    for unit in _units(arch):
        for name, ops in _kernels(listings, arch, unit.stem).items():
            assert sass.count(ops, "LDL") == 0 and sass.count(ops, "STL") == 0, (arch, name)


@NEEDS_TOOL
@pytest.mark.parametrize("arch", build.CI_TARGETS)
def test_int4_gemm_uses_the_native_tensor_core_instruction(listings, arch):
    mnemonic, per_kernel = INT4_MMA[arch]
    kernels = _kernels(listings, arch, "gemm_w4a4-int4")
    assert kernels
    for name, ops in kernels.items():
        expected = mnemonic.format(a="U" if "uint4" in name else "S")
        assert ops.get(expected, 0) == per_kernel, (arch, name, expected, dict(ops))
        imma = {op: n for op, n in ops.items() if op.startswith("IMMA")}
        assert imma == {expected: per_kernel}, (arch, name, imma)  # nothing emulated, nothing else
        # the branch-up: m16n8k16 (two m16n8k8 on sm_75) in 16-bit with fp32 accumulation
        assert sass.count(ops, "HMMA") > 0, (arch, name)


def _rtx_loops(listings, arch: str) -> dict[str, dict[str, int]]:
    return {name: sass.main_loop(text, "IMMA") for name, text in listings[(arch, "gemm_w4a4-int4")].items()}


@NEEDS_TOOL
@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89"])
def test_rtx_gemm_main_loop_does_not_grow(listings, arch):
    for name, loop in _rtx_loops(listings, arch).items():
        assert sass.count(loop, "IMMA") == 32, (arch, name)
        assert sum(loop.values()) <= RTX_LOOP, (arch, name, sum(loop.values()), loop.most_common(8))
        assert sass.count(loop, "LDL") + sass.count(loop, "STL") == 0, (arch, name)


@NEEDS_TOOL
@pytest.mark.parametrize("arch", ["sm_80", "sm_89"])
def test_rtx_gemm_main_loop_is_as_lean_as_the_authors(listings, arch):
    """Issue 15: at most 13 instructions per IMMA.16864 per K-step, and no barrier in the loop (the next step's
    operands are loaded into registers while this step's MMAs run)."""
    for name, loop in _rtx_loops(listings, arch).items():
        assert sum(loop.values()) <= RTX_TARGET_PER_IMMA * sass.count(loop, "IMMA"), (arch, name, loop.most_common(8))
        assert sass.count(loop, "BAR") == 0, (arch, name)


@NEEDS_TOOL
@pytest.mark.parametrize("arch", ["sm_80", "sm_89"])
def test_check_reports_the_rtx_main_loop(listings, arch):
    """``install.py --targets ... --check`` prints each GEMM's K loop, the figures docs/BENCHMARKS.md quotes; the
    quantize kernels (no integer MMA) have none."""
    for name, listing in listings[(arch, "gemm_w4a4-int4")].items():
        found = re.fullmatch(r"; main loop: (\d+) instructions for 32 IMMA \((\d+\.\d) each\), 0 barriers",
                             sass.loop_summary(listing))
        assert found and int(found[1]) <= RTX_LOOP and float(found[2]) <= RTX_TARGET_PER_IMMA, (arch, name, found)
    assert all(sass.loop_summary(text) == "" for text in listings[(arch, "quantize-int4")].values())


@NEEDS_TOOL
def test_nvfp4_gemm_uses_the_block_scaled_fp4_mma(listings):
    kernels = _kernels(listings, "sm_120a", "gemm_w4a4-nvfp4")
    assert set(kernels) == {"svdq_gemm_nvfp4_bf16", "svdq_gemm_nvfp4_fp16"}
    mnemonic, per_kernel = FP4_MMA
    for name, ops in kernels.items():
        assert ops.get(mnemonic, 0) == per_kernel, (name, {op: n for op, n in ops.items() if "MMA" in op})
        assert sass.count(ops, "IMMA") == 0, name


@NEEDS_TOOL
@pytest.mark.parametrize("arch", build.CI_TARGETS)
def test_quantize_runs_the_branch_down_on_tensor_cores(listings, arch):
    kernels = _quantize_kernels(listings, arch)
    assert kernels, arch
    for name, ops in kernels.items():
        hmma = "HMMA.1688.F32" if arch == "sm_75" else "HMMA.16816.F32" + (".BF16" if "bf16" in name else "")
        # 4 rank tiles x 4 k16 steps x 2 halves per 64-column group (two m16n8k8 each on sm_75)
        assert ops.get(hmma, 0) == (64 if arch == "sm_75" else 32), (arch, name, dict(ops))


# Kernel 1's divisions. Per 64-column group a lane quantizes 32 elements (rows g and g + 8, 16 columns): they
# share 16 smoothing factors and 2 scales (NVFP4: 4). One IEEE division per element and divisor was 2 per
# element (131 division sequences in each INT4 kernel: 65 MUFU.RCP and 66 FCHK); one reciprocal per divisor
# needs a division sequence per divisor and no more. A division sequence starts with MUFU.RCP (a reciprocal or
# a division by a variable) or FCHK (a division by a constant, m / 7, which needs no MUFU), wherever the
# compiler puts it (inline, or in the subroutine of a slow path).
KERNEL1_DIVISORS = {"int4": 16 + 2, "uint4": 16 + 2, "nvfp4": 16 + 4}


@NEEDS_TOOL
@pytest.mark.parametrize("arch", build.CI_TARGETS)
def test_quantize_divides_once_per_divisor(listings, arch):
    kernels = _quantize_kernels(listings, arch)
    assert kernels, arch
    for name, ops in kernels.items():
        sequences = sass.count(ops, "MUFU.RCP") + sass.count(ops, "FCHK")
        assert sequences <= KERNEL1_DIVISORS[name.split("_")[2]], (arch, name, sequences)


# The W4A16 GEMV streams its weights: per slab of 2048 columns each lane issues its 8 16-byte weight loads
# (the kernel's only non-coherent 16-byte loads) before its first multiply, so that 4 KB per warp are in
# flight at once (the kernel that loaded a step at a time read the modulation weights at 0.4 to 0.65 TB/s on
# an H200).
GEMV_LOADS_IN_FLIGHT = 8


@NEEDS_TOOL
@pytest.mark.parametrize("arch", build.CI_TARGETS)
def test_gemv_issues_a_slab_of_weight_loads_before_it_multiplies(listings, arch):
    for name, text in listings[(arch, "gemv_w4a16")].items():
        ops = sass._INSTRUCTION.findall(text)
        first_multiply = next(i for i, op in enumerate(ops) if op.startswith("FFMA"))
        loads = [op for op in ops[:first_multiply] if op.startswith("LDG.E.128.CONSTANT")]
        assert len(loads) >= GEMV_LOADS_IN_FLIGHT, (arch, name, len(loads))


# --- the opt-in wgmma kernel 2 (sm_90a) ---

# Per 64-column step and thread (the K loop holds two steps): 2 IGMMA.64x128x32 for 64 accumulators, whose
# group sums cost 2 FFMA each (2.0 per accumulator, as the mma.sync path) and one MOV to re-arm; the
# nibble spreading and operand stores are amortised over the CTA tile. The bound is today's count.
WGMMA_LOOP = 664


@pytest.fixture(scope="module")
def wgmma_program() -> build.Program:
    return build.compile_cubin(build.WGMMA, build.WGMMA_ARCH, verbose=True)


def test_wgmma_kernel_compiles_without_spills_or_serialised_wgmma(wgmma_program):
    log = wgmma_program.log
    assert set(re.findall(r"Compiling entry function '(\w+)'", log)) == {
        f"svdq_gemm_wgmma_{mode}_{dtype}" for mode in ("int4", "uint4") for dtype in ("bf16", "fp16")}
    assert re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log) == [("0", "0")] * 4
    assert re.findall(r"(\d+) bytes stack frame", log) == ["0"] * 4
    assert "C7514" not in log, log  # ptxas serialising the wgmma pipeline (accumulators read while in flight)
    assert all(int(n) <= 48 * 1024 for n in re.findall(r"(\d+) bytes smem", log))  # static: no launch attribute


@NEEDS_TOOL
def test_wgmma_kernel_runs_igmma_and_a_lean_loop(wgmma_program):
    for name, text in sass.disassemble(wgmma_program.cubin, TOOL).items():
        ops = sass.opcodes(text)
        a = "U8" if "uint4" in name else "S8"
        assert len(re.findall(rf"IGMMA\.64x128x32\.{a}\.S8 ", text)) == 4, name
        assert sass.count(ops, "IGMMA") == 4 and sass.count(ops, "IMMA") == 0, (name, dict(ops))
        assert sass.count(ops, "HMMA") == 16, name  # the branch-up: 16 m16n8k16 per rank tile
        assert sass.count(ops, "LDL") + sass.count(ops, "STL") == 0, name
        loop = sass.main_loop(text, "IGMMA")
        assert sass.count(loop, "IGMMA") == 4 and sass.count(loop, "FFMA") == 256, (name, loop.most_common(8))
        assert sum(loop.values()) <= WGMMA_LOOP, (name, sum(loop.values()), loop.most_common(8))


@NEEDS_TOOL
def test_rawmodule_options_build_the_wgmma_code_ci_checks(wgmma_program):
    runtime_build = build.compile_cubin(build.WGMMA, build.WGMMA_ARCH,
                                        extra=tuple(o.format(cc="90") for o in build.RAWMODULE_ADDS))
    assert sass.disassemble(runtime_build.cubin, TOOL) == sass.disassemble(wgmma_program.cubin, TOOL)


# --- what runs on a GPU is what CI checked ---


@NEEDS_TOOL
@pytest.mark.parametrize("arch,unit", [("sm_90a", build.FAMILIES["int4"][1]), ("sm_120a", build.FAMILIES["nvfp4"][1])],
                         ids=["sm_90a", "sm_120a"])
def test_rawmodule_options_build_the_code_ci_checks(listings, arch, unit):
    """RawModule appends its own flags, among them the device's plain -arch (sm_120 on an RTX 50): NVRTC
    must still build the arch-specific target, instruction for instruction the code checked above."""
    cc = "".join(c for c in arch if c.isdigit())
    runtime_build = build.compile_cubin(unit, arch, extra=tuple(o.format(cc=cc) for o in build.RAWMODULE_ADDS))
    assert sass.disassemble(runtime_build.cubin, TOOL) == listings[(arch, unit.stem)]


def test_translation_unit_carries_the_headers():
    """CuPy's kernel cache is keyed on the source text: the headers must be part of it."""
    headers = {name: (build.SOURCE_DIR / name).read_text().replace("#pragma once", "") for name in build.HEADERS}
    for units in build.FAMILIES.values():
        for unit in units:
            text = build.translation_unit(unit)
            assert '#include "' not in text, unit
            for name, body in headers.items():
                assert text.count(f'#line 1 "{name}"\n') == 1, (unit, name)  # each header once
                assert all(part in text for part in re.split(r'#include "[\w.]+"', body)), (unit, name)


def _sources_with(tmp_path, monkeypatch, header: str, line: int, replacement: str):
    tmp_path.mkdir(exist_ok=True)
    for path in build.SOURCE_DIR.iterdir():
        if path.suffix in (".cu", ".cuh"):
            shutil.copy(path, tmp_path)
    lines = (tmp_path / header).read_text().split("\n")
    lines[line - 1] = replacement
    (tmp_path / header).write_text("\n".join(lines))
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)


def test_a_header_change_changes_the_source_cupy_hashes(tmp_path, monkeypatch):
    unit = build.FAMILIES["w4a16"][0]
    before = build.translation_unit(unit)
    _sources_with(tmp_path, monkeypatch, "ptx.cuh", 1, "// another comment: another cache entry")
    assert build.translation_unit(unit) != before


def test_compile_errors_name_the_header_and_its_line(tmp_path, monkeypatch):
    _sources_with(tmp_path, monkeypatch, "common.cuh", 20, "this is no C++;")
    with pytest.raises(build.CompileError, match=r"common\.cuh\(20\): error"):
        build.compile_cubin(build.FAMILIES["w4a16"][0], "sm_89")


def test_load_module_hands_cupy_every_part_of_the_cache_key(monkeypatch):
    """On a GPU the cubin comes from cupy.RawModule, which keys its cache on code, options (the -arch among
    them), the device's arch and NVRTC's version. Recorded here without a GPU: what the pack passes it."""
    made = []

    class RawModule:
        def __init__(self, code, options):
            made.append((code, options))

        def compile(self):
            pass

    cupy = types.ModuleType("cupy")
    cupy.RawModule = RawModule
    cupy.cuda = types.SimpleNamespace(compiler=types.SimpleNamespace(CompileException=Exception))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    unit = build.FAMILIES["nvfp4"][1]
    build.load_module(unit, "sm_120a", ("SVDQ_EMULATED_S4",))
    code, options = made[0]
    assert code == build.translation_unit(unit)
    assert options == ("-arch=sm_120a", "--std=c++17", "-ftz=true", "-DSVDQ_FAMILY_NVFP4", "-DSVDQ_EMULATED_S4")


def test_cupys_kernel_cache_is_keyed_on_source_options_arch_and_nvrtc(tmp_path, monkeypatch):
    """The cache behind RawModule, run without a GPU: CuPy's own compile-with-cache code and real NVRTC, with
    what a GPU would answer (its arch; loading the cubin) put in. It reads CuPy internals (CuPy 14): a CuPy
    that changes them fails here, and this check needs another way in."""
    from cupy._core import core
    from cupy.cuda import compiler

    gpu = {"cc": "89"}
    compiles = []
    real_compile = compiler._compile_using_nvrtc_no_warning
    cache = tmp_path / "cache"
    monkeypatch.setattr(compiler, "_kernel_cache_backend", compiler._DiskKernelCacheBackend(str(cache)))
    monkeypatch.setattr(compiler, "_empty_file_preprocess_cache", {})
    monkeypatch.setattr(compiler, "_get_arch", lambda: gpu["cc"])
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch: (f"-arch=sm_{arch}", "cubin"))
    monkeypatch.setattr(compiler, "_compile_using_nvrtc_no_warning",
                        lambda *args, **kwargs: compiles.append(args[2]) or real_compile(*args, **kwargs))
    module = types.SimpleNamespace(load=lambda cubin: None, _set_mapping=lambda mapping: None)
    monkeypatch.setattr(compiler, "function", types.SimpleNamespace(Module=lambda: module))

    def rawmodule(defines: tuple[str, ...] = ()) -> tuple[int, int]:
        """What RawModule(code, options).compile() does on that GPU: (compiles so far, cache entries)."""
        unit = build.FAMILIES["w4a16"][0]
        arch = build.target(build.capability_of(f"sm_{gpu['cc']}"))
        options = core.assemble_cupy_compiler_options(tuple(build.options(unit, arch, defines=defines)))
        compiler._compile_module_with_cache(build.translation_unit(unit), options)
        return len(compiles), len(list(cache.iterdir()))

    assert rawmodule() == (1, 1)
    assert rawmodule() == (1, 1)  # the same again: from the disk cache
    assert rawmodule(("SVDQ_CACHE_TEST",)) == (2, 2)  # other options
    gpu["cc"] = "120"
    assert rawmodule() == (3, 3) and compiles[-1] == "120"  # another arch (sm_120a)
    monkeypatch.setattr(compiler, "_get_nvrtc_version", lambda: (13, 9))
    assert rawmodule() == (4, 4)  # another NVRTC
    _sources_with(tmp_path / "src", monkeypatch, "ptx.cuh", 1, "// another comment: another cache entry")
    assert rawmodule() == (5, 5)  # another header
