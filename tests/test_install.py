"""install.py: adds only what the kernels miss for PyTorch's CUDA, never changes an installed package, runs
no pip when nothing is missing, and never fails (ComfyUI-Manager runs it on its own).

The last test installs CuPy for real, in a fresh venv that sees PyPI's CUDA build of torch (and its pinned
nvidia-* wheels) through a .pth file; it needs that torch in a venv (~/comfyui-trees/torch-venv, or
$SVDQUANT_TORCH_VENV) and PyPI or a wheel mirror.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCH_VENV = Path(os.environ.get("SVDQUANT_TORCH_VENV", Path.home() / "comfyui-trees" / "torch-venv"))


def _install_script():
    spec = importlib.util.spec_from_file_location("svdquant_install_script", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


install = _install_script()


def _dist(site: Path, name: str, version: str, files: tuple[str, ...] = ()) -> importlib.metadata.Distribution:
    """A real installed distribution (dist-info with METADATA and RECORD) in ``site``."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{file},,\n" for file in files))
    return importlib.metadata.PathDistribution(info)


def _env(tmp_path: Path, *dists: tuple) -> dict:
    return {install._canonical(d[0]): _dist(tmp_path, *d) for d in dists}


def test_cupy_is_added_and_torchs_nvrtc_used(tmp_path):
    env = _env(tmp_path, ("torch", "2.7.0"), ("nvidia-cuda-nvrtc-cu12", "12.8.93",
                                               ("nvidia/cuda_nvrtc/lib/libnvrtc.so.12",)))
    assert install.missing_wheels("12.8", env) == ["cupy-cuda12x>=13"]
    env = _env(tmp_path / "13", ("torch", "2.14.1"), ("cupy-cuda13x", "14.2.0"),
               ("nvidia-cuda-nvrtc", "13.0.88", ("nvidia/cu13/lib/libnvrtc.so.13",)))
    assert install.missing_wheels("13.0", env) == []


def test_nvrtc_bundled_in_torch_counts(tmp_path):  # the Windows CUDA wheels carry their DLLs in torch/lib
    env = _env(tmp_path, ("torch", "2.7.0", ("torch/lib/nvrtc64_120_0.dll", "torch/lib/torch_cuda.dll")))
    assert install.missing_wheels("12.8", env) == ["cupy-cuda12x>=13"]


def test_nvrtc_is_added_at_torchs_cuda_version_only_when_missing(tmp_path):
    env = _env(tmp_path, ("torch", "2.7.0"), ("nvidia-cuda-nvrtc", "13.0.88", ("nvidia/cu13/lib/libnvrtc.so.13",)))
    assert install.missing_wheels("12.8", env) == ["cupy-cuda12x>=13", "nvidia-cuda-nvrtc-cu12==12.8.*"]


def test_cupy_for_another_cuda_is_reported_not_overwritten(tmp_path):
    env = _env(tmp_path, ("torch", "2.14.1"), ("cupy-cuda12x", "13.6.0"))
    with pytest.raises(RuntimeError, match="cupy-cuda12x installed, but PyTorch uses CUDA 13.0: pip uninstall"):
        install.missing_wheels("13.0", env)


def test_no_cupy_for_cuda_11(tmp_path):
    assert install.missing_wheels("11.8", _env(tmp_path, ("torch", "2.0.0"))) is None


def test_pip_gets_every_installed_distribution_as_a_constraint(tmp_path, monkeypatch):
    env = _env(tmp_path, ("torch", "2.7.0"), ("nvidia-cuda-nvrtc-cu12", "12.8.93"), ("numpy", "2.1.3"))
    calls = []

    def pip(args, **_):
        constraints = Path(args[args.index("--constraint") + 1]).read_text().split()
        calls.append((args, constraints))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(install.subprocess, "run", pip)
    assert install.install_wheels(["cupy-cuda12x>=13"], env)
    (args, constraints), = calls
    assert args[:4] == [sys.executable, "-m", "pip", "install"] and args[-1] == "cupy-cuda12x>=13"
    assert constraints == ["numpy==2.1.3", "nvidia-cuda-nvrtc-cu12==12.8.93", "torch==2.7.0"]
    monkeypatch.setattr(install.subprocess, "run", lambda args, **_: types.SimpleNamespace(returncode=1))
    assert not install.install_wheels(["cupy-cuda12x>=13"], env)  # pip failed: reported, not raised


def test_nothing_missing_runs_no_pip(tmp_path, monkeypatch, capsys):
    env = _env(tmp_path, ("torch", "2.14.1"), ("nvidia-cuda-nvrtc", "13.0.88", ("nvidia/cu13/lib/libnvrtc.so.13",)),
               ("cupy-cuda13x", "14.2.0"))
    monkeypatch.setattr(install, "installed", lambda: env)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(install.subprocess, "run", lambda *a, **k: pytest.fail(f"pip was run: {a}"))
    assert install.main([]) == 0
    assert "CuPy and NVRTC for CUDA 13.0 are installed: nothing to install" in capsys.readouterr().out


def test_install_never_fails_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert install.main([]) == 0
    assert "PyTorch path" in capsys.readouterr().out


# --- for real: a fresh venv with PyPI's CUDA torch ---


def _torch_site() -> Path | None:
    found = sorted(TORCH_VENV.glob("lib/python3*/site-packages/torch/version.py"))
    return found[0].parent.parent if found and sys.platform == "linux" else None


def _run(python: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=ROOT, **kwargs)


def _versions(python: Path) -> dict[str, str]:
    listed = json.loads(_run(python, "-m", "pip", "list", "--format=json").stdout)
    return {install._canonical(p["name"]): p["version"] for p in listed}


@pytest.mark.skipif(_torch_site() is None, reason=f"needs PyPI's CUDA torch wheel installed in a venv at {TORCH_VENV} "
                                                  "(set SVDQUANT_TORCH_VENV) on Linux")
def test_fresh_venv_with_pypis_cuda_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([str(TORCH_VENV / "bin" / "python"), "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "torch.pth").write_text(f"{_torch_site()}\n")  # torch and pip come from there, as if installed here
    assert _run(python, "-m", "pip", "check").returncode == 0, "the torch venv itself is broken"
    before = _versions(python)
    torch_cuda = _run(python, "-c", "import torch; print(torch.version.cuda)").stdout.strip()
    assert torch_cuda.startswith("13.") and "nvidia-cuda-nvrtc" in before and "cupy-cuda13x" not in before

    first = _run(python, "install.py")
    assert first.returncode == 0, first.stderr
    assert "[SVDQuant] installing cupy-cuda13x>=13.6 (" in first.stdout, first.stdout  # torch brings NVRTC
    after = _versions(python)
    assert {name: after.get(name) for name in before} == before  # nothing changed, torch's nvidia-* pins included
    assert set(after) - set(before) == {"cupy-cuda13x"}
    check = _run(python, "-m", "pip", "check")
    assert check.returncode == 0, check.stdout
    nvrtc = _run(python, "-c", "import torch; from cupy_backends.cuda.libs import nvrtc; print(*nvrtc.getVersion())")
    assert nvrtc.stdout.split() == torch_cuda.split("."), nvrtc.stderr  # CuPy uses the NVRTC torch brought

    # A second run finds everything and calls no pip: a pip that would only say it was called.
    spy = tmp_path / "spy" / "pip"
    spy.mkdir(parents=True)
    (spy / "__init__.py").write_text("")
    (spy / "__main__.py").write_text(f"open({str(tmp_path / 'pip-called')!r}, 'w').close()\nraise SystemExit(3)\n")
    second = _run(python, "install.py", env={**os.environ, "PYTHONPATH": str(spy.parent)})
    assert second.returncode == 0, second.stderr
    assert "nothing to install" in second.stdout and not (tmp_path / "pip-called").exists(), second.stdout
