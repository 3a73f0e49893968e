"""The pack in a real headless ComfyUI server (its own process, started here with --base-directory in a
temporary folder, the pack linked into its custom_nodes): the nodes ComfyUI's custom-node loader registers,
prompt validation, and bad checkpoint files failing with the pack's own message while the server goes on."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import workflow_format
from comfy_server import ComfyServer, execution_error
from safetensors import safe_open

from tiny_pipeline import PIPELINE_FLUX, populate, write_flux_lora

GOOD = "svdq-int4_r32-flux.1-dev.safetensors"
BAD_FILES = {  # file name → words the error message must contain (besides the file name)
    "corrupt.safetensors": "header is not valid JSON (the file is corrupt)",
    "truncated.safetensors": "the file is truncated: its header describes",
    "old-model.ckpt": "pickle-based PyTorch checkpoint",
    "flux1-dev.safetensors": "this is not an SVDQuant checkpoint",  # a 16-bit FLUX in ComfyUI's layout
    "broken-layer.safetensors": "tensor 'single_transformer_blocks.1.mlp_fc2.qweight' has shape",
}


BAD_LORAS = {  # file name → words the error message must contain (besides the file name)
    "sdxl-lora.safetensors": "matches no layer of this FLUX.1 model",
    "flux-lora-for-a-wider-model.safetensors": "does not fit this FLUX.1 model",
}


def write_bad_loras(folder) -> None:
    import safetensors.torch

    down, up = torch.randn(4, 640), torch.randn(640, 4)  # an SDXL attention layer's LoRA, kohya names
    safetensors.torch.save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                                 "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up},
                                str(folder / "sdxl-lora.safetensors"))
    write_flux_lora(folder / "flux-lora-for-a-wider-model.safetensors", dict(PIPELINE_FLUX, hidden_size=256))


def write_bad_files(folder) -> None:
    good = folder / GOOD
    data = good.read_bytes()
    (folder / "corrupt.safetensors").write_bytes(struct.pack("<Q", 64) + b"{" + b"\x00garbage" * 16)
    (folder / "truncated.safetensors").write_bytes(data[: len(data) * 3 // 5])
    torch.save({"weight": torch.zeros(4, 4)}, folder / "old-model.ckpt")
    from comfyui_svdquant.svdquant.checkpoint import write_checkpoint

    with safe_open(str(good), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    key = "single_transformer_blocks.1.mlp_fc2.qweight"  # a late layer: loading fails half-way through
    tensors[key] = tensors[key][:, : tensors[key].shape[1] // 2].contiguous()
    write_checkpoint(folder / "broken-layer.safetensors", tensors, metadata)


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui-server")
    populate(base / "models")
    write_bad_files(base / "models" / "diffusion_models")
    write_bad_loras(base / "models" / "loras")
    running = ComfyServer(comfy, base).start()
    yield running
    running.stop()


def loader_prompt(model_name: str, compute_dtype: str = "auto") -> dict:
    return {"1": {"class_type": "SVDQuantModelLoader",
                  "inputs": {"model_name": model_name, "compute_dtype": compute_dtype, "kernel_backend": "torch"}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


def probe(server: ComfyServer) -> dict:
    outputs = server.run({"1": {"class_type": "SVDQuantTestProbe", "inputs": {}}})["outputs"]["1"]
    return {"loaded": outputs["loaded"], "alive": outputs["diffusion_models_alive"][0]}


def flux_dev_prompt(object_info: dict) -> dict:
    workflow = workflow_format.load(workflow_format.WORKFLOWS / "flux1-dev-svdquant.json")
    return workflow_format.scaled_down(workflow_format.to_api(workflow, object_info), steps=1)


def test_pack_nodes_are_registered_by_comfyuis_custom_node_loader(server):
    import asyncio

    from comfyui_svdquant.nodes import SVDQuantExtension

    object_info = server.get("/object_info")
    for node in asyncio.run(SVDQuantExtension().get_node_list()):
        schema = node.GET_SCHEMA()
        assert schema.node_id in object_info, f"{schema.node_id} missing from /object_info"
        published = object_info[schema.node_id]
        assert published["display_name"] == schema.display_name
        assert published["category"].startswith("loaders/SVDQuant") or "SVDQuant" in published["category"]
        assert published["python_module"].startswith("custom_nodes.")  # ComfyUI's loader imported it
    options = object_info["SVDQuantModelLoader"]["input"]["required"]["model_name"][1]["options"]
    assert GOOD in options and "svdq-int4_r32-flux.1-schnell.safetensors" in options
    assert "comfyui-svdquant" not in "".join(line for line in server.tail(400).splitlines() if "IMPORT FAILED" in line)


def test_file_not_in_the_folder_is_rejected_when_the_prompt_is_validated(server):
    # the value named on its own input (ComfyUI's own check from v0.8 on, the node's before: loaders/compat.py)
    for prompt, name, value in ((loader_prompt("no-such-model.safetensors"), "model_name", "no-such-model.safetensors"),
                                (loader_prompt(GOOD, compute_dtype="float64"), "compute_dtype", "float64")):
        status, answer = server.queue(prompt)
        assert status == 400
        errors = answer["node_errors"]["1"]["errors"]
        assert any(e["extra_info"]["input_name"] == name and f"'{value}'" in e["details"] for e in errors), errors


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_fails_with_the_packs_message_and_leaves_nothing_loaded(server, name):
    before = probe(server)
    entry = server.run(loader_prompt(name))
    assert entry["status"]["status_str"] == "error"
    error = execution_error(entry)
    assert error["node_type"] == "SVDQuantModelLoader"
    assert error["exception_type"].endswith("CheckpointError"), error["exception_type"]
    message = error["exception_message"]
    assert name in message and BAD_FILES[name] in message, message
    after = probe(server)
    assert after == before, f"the failed load left a model behind: {before} → {after}"


def test_server_keeps_serving_after_a_failed_prompt(server):
    server.run(loader_prompt("broken-layer.safetensors"))
    entry = server.run(flux_dev_prompt(server.get("/object_info")))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    assert images and all((server.base / "output" / i["subfolder"] / i["filename"]).stat().st_size > 0 for i in images)
    state = probe(server)
    assert "Flux" in state["loaded"] and state["alive"] >= 1


@pytest.mark.parametrize("lora", sorted(BAD_LORAS))
def test_lora_for_another_model_fails_with_the_packs_message(server, lora):
    server.run(loader_prompt(GOOD))  # the model is loaded and cached before, as in a user's session
    before = probe(server)
    slots = {f"{key}_{i}": value for i in range(2, 5) for key, value in (("lora", "None"), ("strength", 1.0))}
    prompt = {**loader_prompt(GOOD),
              "3": {"class_type": "SVDQuantLoraStack", "inputs": {"model": ["1", 0], "lora_1": lora, "strength_1": 1.0,
                                                                   **slots, "adapter_svd_rank": 64}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}}
    entry = server.run(prompt)
    error = execution_error(entry)
    assert error is not None and error["node_type"] == "SVDQuantLoraStack", entry["status"]
    assert error["exception_type"].endswith("SVDQuantError"), error["exception_type"]
    message = error["exception_message"]
    assert lora in message and BAD_LORAS[lora] in message, message
    assert probe(server) == before
    assert server.run(loader_prompt(GOOD))["status"]["status_str"] == "success"  # and the server goes on
