"""Loading the kernels of a GPU: through ``cupy.RawModule`` and CuPy's kernel cache, once per family however
many threads ask. The lock is checked on the CPU; the cache needs a GPU (skipped, saying so, elsewhere).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from comfyui_svdquant.kernels import build, runtime

TESTS = Path(__file__).resolve().parent


def test_threads_loading_a_family_together_compile_it_once(monkeypatch):
    builds = []

    def slow_build(family: str, arch: str) -> list:
        builds.append((family, arch))
        time.sleep(0.3)  # a compile: the other threads ask meanwhile
        return [object() for _ in build.FAMILIES[family]]

    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(Device=lambda index: contextlib.nullcontext())
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(build, "build_family", slow_build)
    device = runtime.Device(0, "Fake GPU", (8, 9), "sm_89")
    threads = [threading.Thread(target=device.load, args=("int4",)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == [("int4", "sm_89")]
    assert len(device._modules["int4"]) == 2 and not device.unsupported


# Run in a fresh process each time (CuPy also keeps compiled modules in memory): loads the w4a16 family,
# optionally a variant of it, and prints how many pack sources NVRTC compiled.
_LOAD = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import pack_import
import torch
from cupy_backends.cuda.libs import nvrtc
compiled = []
create = nvrtc.createProgram
nvrtc.createProgram = lambda src, *rest: compiled.append("svdq_" in src) or create(src, *rest)
from comfyui_svdquant.kernels import build, runtime
device = runtime.probe(torch.cuda.current_device())
device.load("w4a16")
assert "w4a16" not in device.unsupported, device.unsupported
if sys.argv[1:] == ["variant"]:
    device.variant(build.FAMILIES["w4a16"][0], ["SVDQ_CACHE_TEST"])
print(sum(compiled))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CuPy's kernel cache is filled on a CUDA GPU only")
def test_a_second_process_takes_the_kernels_from_cupys_cache(tmp_path):
    env = {**os.environ, "CUPY_CACHE_DIR": str(tmp_path)}

    def compiles(*args: str) -> int:
        done = subprocess.run([sys.executable, "-c", _LOAD, *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    assert compiles() == 1  # compiled, and written to the cache
    cached = sorted(tmp_path.iterdir())
    assert cached
    assert compiles() == 0 and sorted(tmp_path.iterdir()) == cached  # the next process: from the cache
    assert compiles("variant") == 1  # other options: compiled, another entry
    assert len(list(tmp_path.iterdir())) > len(cached)
