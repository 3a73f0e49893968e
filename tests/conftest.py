"""Shared test setup.

The pack is loaded the way ComfyUI loads it: the repository folder imported as a package (here under
the fixed name ``comfyui_svdquant``), so every test shares one copy of each module. Tests that need
ComfyUI use the ``comfy`` fixture: it finds ComfyUI through ``COMFYUI_PATH`` (or the pack sitting in
``ComfyUI/custom_nodes/``) and skips, saying so, when there is none.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (tiny_models, ...)
from pack_import import PACKAGE, ROOT  # noqa: E402  (imports the pack as comfyui_svdquant)


def pytest_addoption(parser) -> None:
    parser.addoption("--comfyui-only", action="store_true",
                     help="run only the tests that use ComfyUI (the others do not depend on the ComfyUI version: "
                          "scripts/run_tests.sh runs them with the first tree only)")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--comfyui-only"):
        others = [item for item in items if "comfy" not in item.fixturenames]
        config.hook.pytest_deselected(items=others)
        items[:] = [item for item in items if "comfy" in item.fixturenames]


def comfyui_root() -> Path | None:
    candidates = [Path(os.environ["COMFYUI_PATH"])] if os.environ.get("COMFYUI_PATH") else []
    candidates.append(ROOT.parent.parent)  # ComfyUI/custom_nodes/<this pack>
    for candidate in candidates:
        if (candidate / "comfy" / "model_management.py").exists() and (candidate / "nodes.py").exists():
            return candidate.resolve()
    return None


SKIP_NO_COMFY = ("ComfyUI not found: run scripts/run_tests.sh with ComfyUI trees under ~/comfyui-trees, or set "
                 "COMFYUI_PATH to a ComfyUI checkout (README, 'Running the tests'), to run the integration tests")


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in-process on the CPU, with its built-in and this pack's nodes registered."""
    root = comfyui_root()
    if root is None:
        pytest.skip(SKIP_NO_COMFY)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args
    import utils.extra_config  # noqa: F401  (first, as main.py does: ComfyUI later puts comfy/ ahead on sys.path)

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)
    import nodes

    if "KSampler" in nodes.NODE_CLASS_MAPPINGS and "FluxGuidance" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    register_pack_nodes(nodes)
    return root


def register_pack_nodes(nodes_module) -> None:
    """What ComfyUI's custom-node loader does with a V3 extension, for the pack loaded above."""
    pack = sys.modules[PACKAGE]
    extension = asyncio.run(pack.comfy_entrypoint())
    for node_cls in asyncio.run(extension.get_node_list()):
        schema = node_cls.GET_SCHEMA()
        nodes_module.NODE_CLASS_MAPPINGS[schema.node_id] = node_cls
        node_cls.RELATIVE_PYTHON_MODULE = f"custom_nodes.{PACKAGE}"
        if schema.display_name is not None:
            nodes_module.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name


@pytest.fixture
def model_folders(comfy, tmp_path):
    """Fresh diffusion_models / loras folders for one test, registered with ComfyUI's folder_paths."""
    import folder_paths

    saved = {name: folder_paths.folder_names_and_paths[name] for name in ("diffusion_models", "loras")}
    folders = {}
    for name, (_, extensions) in saved.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        folder_paths.folder_names_and_paths[name] = ([str(folders[name])], extensions)
    folder_paths.filename_list_cache.clear()
    yield folders
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()


def prompt_executor(server):
    """ComfyUI's PromptExecutor as main.py makes it in the running version (v0.8 added cache_args)."""
    import inspect

    import execution

    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return execution.PromptExecutor(server, cache_args={"lru": 0, "ram": 16.0, "ram_inactive": 16.0})
    return execution.PromptExecutor(server)


def validation_errors(class_type: str, **inputs) -> list[str]:
    """What ComfyUI says, as "input: details" lines, about one node with these widget values when a prompt
    holding it is queued (its own checks and the node's validate_inputs, as the running version does them)."""
    import execution

    prompt = {"1": {"class_type": class_type, "inputs": inputs}}
    _, errors, _ = asyncio.run(execution.validate_inputs("test", prompt, "1", {}))
    return [f"{e.get('extra_info', {}).get('input_name')}: {e.get('details')}" for e in errors]


def load_node(name: str, kernel_backend: str = "torch"):
    """The MODEL that Load SVDQuant Model gives for file ``name`` (bfloat16), after ComfyUI has accepted the
    node's widget values as a queued prompt would."""
    from comfyui_svdquant.nodes.loader import SVDQuantModelLoader

    assert not validation_errors("SVDQuantModelLoader", model_name=name, compute_dtype="bfloat16",
                                 kernel_backend=kernel_backend)
    (patcher,) = SVDQuantModelLoader.execute(name, "bfloat16", kernel_backend).args
    return patcher
