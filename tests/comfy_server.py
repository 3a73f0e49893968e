"""A real headless ComfyUI server for tests: started in its own process with ``--base-directory`` in a
temporary folder whose ``custom_nodes`` holds a link to this repository (so ComfyUI's own custom-node loader
imports the pack), on a free port of 127.0.0.1; stopped (and waited for) by :meth:`ComfyServer.stop`.

Beside the pack, ``custom_nodes`` gets one test file: it installs :func:`tiny_pipeline.install_size_inference`
in the server process and adds :class:`Probe`, an output node that reports what the server process holds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_NODE = "SVDQuantModelLoader"
SUPPORT_MODULE = """import sys
sys.path.insert(0, {tests!r})
import comfy_server
import tiny_pipeline

tiny_pipeline.install_size_inference()
NODE_CLASS_MAPPINGS = {{"SVDQuantTestProbe": comfy_server.Probe}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class ComfyServer:
    def __init__(self, comfyui: Path, base: Path, start_timeout: float = 180.0, cpu: bool = True,
                 extra_args: tuple[str, ...] = (), env: dict[str, str | None] | None = None):
        self.comfyui, self.base, self.start_timeout, self.cpu = comfyui, base, start_timeout, cpu
        self.extra_args = extra_args
        self.env = env or {}  # set in the server's environment; None removes a variable
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> ComfyServer:
        custom = self.base / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        link = custom / "comfyui-svdquant"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        (custom / "svdquant_test_support.py").write_text(SUPPORT_MODULE.format(tests=str(REPO / "tests")))
        command = [sys.executable, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port",
                   str(self.port), "--disable-api-nodes", "--base-directory", str(self.base),
                   # ComfyUI's database under the test's folder: nothing is written into the ComfyUI tree
                   "--database-url", f"sqlite:///{self.base / 'comfyui.db'}", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for name, value in self.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.process.returncode} while starting:\n{self.tail()}")
            try:
                self.get(f"/object_info/{PACK_NODE}")
                return self
            except (OSError, ServerError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {self.start_timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def request(self, path: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def get(self, path: str) -> object:
        status, answer = self.request(path)
        if status != 200:
            raise ServerError(f"GET {path}: HTTP {status}: {answer}")
        return answer

    def queue(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt; (HTTP status, answer): 200 with prompt_id, or 400 with error and node_errors."""
        return self.request("/prompt", {"prompt": prompt, "client_id": "svdquant-tests"})

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """The /history entry of a finished prompt (successful or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"]["status_str"] in ("success", "error")):
                return entry
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited while running {prompt_id}:\n{self.tail()}")
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.tail()}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        status, answer = self.queue(prompt)
        if status != 200:
            raise ServerError(f"prompt rejected (HTTP {status}): {json.dumps(answer)[:2000]}")
        return self.wait(answer["prompt_id"], timeout)


def seconds(entry: dict) -> float | None:
    """How long the server took to run a prompt (its execution_start to execution_success messages)."""
    stamps = {kind: data.get("timestamp") for kind, data in entry.get("status", {}).get("messages", [])}
    if stamps.get("execution_start") is None or stamps.get("execution_success") is None:
        return None
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def execution_error(entry: dict) -> dict | None:
    """The ``execution_error`` message of a /history entry, if the prompt failed."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


class Probe:
    """Output node (runs in the server): the models ComfyUI holds loaded, and how many FLUX / SDXL diffusion
    models are alive in the process at all (after garbage collection), so a test can tell that a failed
    load left nothing behind."""

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    @classmethod
    def IS_CHANGED(cls):
        return float("nan")  # never cached: every prompt asks again

    def probe(self):
        import gc

        import comfy.model_management
        from torch import nn

        gc.collect()
        loaded = [type(m.model.model).__name__ for m in comfy.model_management.current_loaded_models
                  if m.model is not None]
        alive = sum(1 for o in gc.get_objects() if isinstance(o, nn.Module) and
                    type(o).__name__ in ("Flux", "UNetModel") and type(o).__module__.startswith("comfy.ldm"))
        return {"ui": {"loaded": loaded, "diffusion_models_alive": [alive]}}
