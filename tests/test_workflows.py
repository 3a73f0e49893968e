"""Every workflow in workflows/ (UI and API format) against a real headless ComfyUI server: it matches the
node definitions the server publishes (/object_info: node types, input names and types, links, widget
values), and it runs end to end with the small stand-in models of tiny_pipeline and writes an image.

For speed the run uses 64×64 pixels, at most 2 sampling steps and no smoothing search in the quantizer
(workflow_format.scaled_down); every other setting is the workflow's own. The stand-ins carry the file names
the workflows use."""

from __future__ import annotations

import json

import pytest
import workflow_format as wf
from comfy_server import ComfyServer
from local_hub import hub_for_workflows, server_environment

from tiny_pipeline import populate

# UI workflows in workflows/ (ComfyUI offers them as templates), API-format ones in workflows/api/, each named
# after its UI twin (API-format files cannot be opened as templates, and ComfyUI lists only the top folder).
WORKFLOW_FILES = sorted(wf.WORKFLOWS.glob("*.json")) + sorted((wf.WORKFLOWS / "api").glob("*.json"))


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui-workflows")
    populate(base / "models")
    hub = hub_for_workflows(base / "models")  # what Download SVDQuant Model fetches
    running = ComfyServer(comfy, base, env=server_environment(hub, base)).start()
    yield running
    running.stop()
    hub.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def api_prompt(path, object_info: dict) -> dict:
    workflow = wf.load(path)
    return wf.to_api(workflow, object_info) if wf.is_ui_format(workflow) else workflow


def test_there_are_example_workflows():
    names = {p.name for p in WORKFLOW_FILES}
    assert {"flux1-dev-svdquant.json", "flux1-schnell-svdquant.json"} <= names
    assert all(wf.is_ui_format(wf.load(p)) == (p.parent == wf.WORKFLOWS) for p in WORKFLOW_FILES)



def test_a_workflow_names_the_oldest_comfyui_it_runs_on(tmp_path, monkeypatch):
    """A workflow of a model older ComfyUI lacks says so in its file; its tests skip there, saying why, and its
    API-format twin follows it."""
    workflow = wf.load(wf.WORKFLOWS / "flux1-schnell-svdquant.json")
    workflow["extra"]["svdquant"] = {"minimum_comfyui": "0.8.0"}
    (tmp_path / "api").mkdir()
    (tmp_path / "new.json").write_text(json.dumps(workflow))
    monkeypatch.setattr(wf, "WORKFLOWS", tmp_path)
    assert wf.minimum_comfyui(tmp_path / "new.json") == wf.minimum_comfyui(tmp_path / "api" / "new.json") == (0, 8, 0)
    assert wf.too_old_for(tmp_path / "new.json", (0, 3, 64)) == "new.json needs ComfyUI 0.8.0 or newer; this is 0.3.64"
    assert wf.too_old_for(tmp_path / "new.json", (0, 8, 0)) is None
    monkeypatch.undo()
    assert all(wf.minimum_comfyui(p) is None for p in WORKFLOW_FILES if p.name.startswith("flux1"))


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: str(p.relative_to(wf.WORKFLOWS)))
def test_workflow_matches_the_registered_node_definitions(object_info, path):
    wf.skip_if_too_old(path)
    workflow = wf.load(path)
    problems = wf.check_ui(workflow, object_info) if wf.is_ui_format(workflow) else wf.check_api(workflow, object_info)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", [p for p in WORKFLOW_FILES if p.parent.name == "api"], ids=lambda p: p.name)
def test_api_format_file_is_its_ui_workflow(object_info, path):
    wf.skip_if_too_old(path)
    ui = wf.WORKFLOWS / path.name
    assert ui.exists(), f"api/{path.name} has no UI-format twin {ui.name}"

    def without_titles(prompt: dict) -> dict:
        return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}

    assert without_titles(wf.load(path)) == without_titles(wf.to_api(wf.load(ui), object_info))


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: str(p.relative_to(wf.WORKFLOWS)))
def test_workflow_runs_end_to_end_and_writes_an_image(server, object_info, path):
    wf.skip_if_too_old(path)
    import numpy as np
    from PIL import Image  # ComfyUI's requirement

    entry = server.run(wf.scaled_down(api_prompt(path, object_info)))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:4000]
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    assert images, f"{path.name} saved no image"
    for image in images:
        file = server.base / image["type"] / image["subfolder"] / image["filename"]  # output/ or temp/
        with Image.open(file) as png:
            assert png.format == "PNG" and png.size == (64, 64)
            pixels = np.asarray(png.convert("RGB"), dtype=np.float32)
        assert pixels.std() > 1.0, f"{file.name} is a flat image"
