"""Read the machine code (SASS) of a cubin: which instructions each kernel really contains.

Used by the CI tests (native 4-bit MMA on each target, no local-memory traffic) and by
``python install.py --targets ... --check``. Needs ``cuobjdump`` or ``nvdisasm`` (the ``nvidia-cuda-cuobjdump`` /
``nvidia-cuda-nvdisasm`` wheels, or a CUDA toolkit); no GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

TOOLS = ("cuobjdump", "nvdisasm")
_FUNCTION = re.compile(r"Function : (\w+)|^//-+ \.text\.(\w+) -+$", re.M)
_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*(?:\.[A-Z0-9_]+)*)", re.M)
# An instruction with its address and, for a branch, its target (cuobjdump: "BRA 0x2120"; nvdisasm: a label).
_ADDRESSED = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*(?:\.[A-Z0-9_]+)*)"
                        r"(?:[^;]*?\b(?:0x([0-9a-f]+)|`?\(?\.L_x_(\d+)\)?`?))?", re.M)
_LABEL = re.compile(r"^\.L_x_(\d+):\s*$", re.M)


def find_tool() -> Path | None:
    """cuobjdump or nvdisasm: from the pip wheels, a CUDA toolkit, or PATH."""
    exe = ".exe" if sys.platform == "win32" else ""
    dirs = [Path(p) / "nvidia" / sub / "bin" for p in sys.path if p for sub in ("cu13", "cu12", "cuda_cuobjdump",
                                                                                 "cuda_nvdisasm")]
    dirs += [Path(os.environ[v]) / "bin" for v in ("CUDA_PATH", "CUDA_HOME") if os.environ.get(v)]
    for tool in TOOLS:
        for d in dirs:
            if (d / (tool + exe)).is_file():
                return d / (tool + exe)
        found = shutil.which(tool)
        if found:
            return Path(found)
    return None


def disassemble(cubin: bytes, tool: Path) -> dict[str, str]:
    """Kernel name → its SASS listing."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        args = [str(tool), "-sass", str(path)] if "cuobjdump" in tool.name else [str(tool), "-c", str(path)]
        text = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    marks = list(_FUNCTION.finditer(text))
    return {(m.group(1) or m.group(2)): text[m.end(): marks[i + 1].start() if i + 1 < len(marks) else len(text)]
            for i, m in enumerate(marks)}


def opcodes(listing: str) -> Counter:
    """Full mnemonics (with modifiers, e.g. ``IMMA.16864.S4.S4``) and how often each occurs."""
    return Counter(_INSTRUCTION.findall(listing))


def main_loop(listing: str, mnemonic: str) -> Counter:
    """The opcodes of the innermost loop that holds every ``mnemonic`` instruction of a kernel (e.g. the
    GEMM's K loop around its IMMAs): the instructions from a backward branch's target to the branch."""
    labels = {}
    for match in _LABEL.finditer(listing):  # nvdisasm: a label stands before the instruction it names
        following = _ADDRESSED.search(listing, match.end())
        if following:
            labels[match.group(1)] = int(following.group(1), 16)
    code = []
    for address, op, target, label in _ADDRESSED.findall(listing):
        goal = None
        if op.startswith("BRA"):
            goal = int(target, 16) if target else labels.get(label)
        code.append((int(address, 16), op, goal))
    where = [a for a, op, _ in code if op == mnemonic or op.startswith(mnemonic + ".")]
    if not where:
        raise ValueError(f"no {mnemonic} in this kernel")
    loops = [(goal, a) for a, _, goal in code if goal is not None and goal <= min(where) and a >= max(where)]
    if not loops:
        raise ValueError(f"the {mnemonic} instructions are in no loop")
    start, end = min(loops, key=lambda loop: loop[1] - loop[0])
    return Counter(op for a, op, _ in code if start <= a <= end)


def count(ops: Counter, prefix: str) -> int:
    """Occurrences of mnemonics starting with ``prefix`` (``"STL"`` matches ``STL.64`` too)."""
    return sum(n for op, n in ops.items() if op == prefix or op.startswith(prefix + "."))


def summary(ops: Counter) -> str:
    """The tensor-core instructions and the local-memory traffic of one kernel, in a line."""
    tensor = [f"{op} x{n}" for op, n in sorted(ops.items()) if op.split(".")[0] in ("HMMA", "IMMA", "OMMA")]
    return f"{', '.join(tensor) or 'no MMA'}; local-memory instructions: {count(ops, 'LDL') + count(ops, 'STL')}"


def loop_summary(listing: str) -> str:
    """The K loop around a kernel's integer or FP4 tensor-core instructions, as a phrase to append to
    :func:`summary` ("" for a kernel without one): its length, its MMAs and its barriers."""
    for mnemonic in ("IMMA", "OMMA"):
        try:
            loop = main_loop(listing, mnemonic)
        except ValueError:
            continue
        size, mmas = sum(loop.values()), count(loop, mnemonic)
        return (f"; main loop: {size} instructions for {mmas} {mnemonic} ({size / mmas:.1f} each), "
                f"{count(loop, 'BAR')} barriers")
    return ""
