"""First contact in ComfyUI's real web frontend (the one the running ComfyUI ships), in Chromium: every
example workflow opens as its file means (each widget read back from the page), with no missing node and no
page error; each runs from the page (Run) with the small stand-in models and its image arrives; a new node's
bad inputs are refused when the prompt is queued. Screenshots of each workflow are kept under the test's temp
folder (``screenshots/``); ``SVDQUANT_WRITE_THUMBNAILS=1`` also writes each run's image as the template
thumbnail beside the workflow (``workflows/<name>.jpg``, what the Templates browser shows)."""

from __future__ import annotations

import os
import time
import urllib.request

import pytest
import workflow_format as wf
from comfy_server import ComfyServer
from frontend import Frontend, unavailable
from local_hub import hub_for_workflows, server_environment

from tiny_pipeline import populate

UI_WORKFLOWS = sorted(wf.WORKFLOWS.glob("*.json"))
PACK = "comfyui-svdquant"  # the pack's folder name under custom_nodes: its templates' module name


@pytest.fixture(scope="module")
def browser(comfy, tmp_path_factory):
    why = unavailable()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp("comfyui-frontend")
    populate(base / "models")
    hub = hub_for_workflows(base / "models")  # what Download SVDQuant Model fetches
    server = ComfyServer(comfy, base, env=server_environment(hub, base)).start()
    page = Frontend(server.url, base / "screenshots")
    yield server, page
    page.close()
    server.stop()
    hub.stop()


@pytest.fixture(scope="module")
def object_info(browser):
    return browser[0].get("/object_info")


def opened(page: Frontend, path) -> tuple[dict, dict[int, dict]]:
    workflow = wf.load(path)
    page.errors.clear()
    page.load(workflow)
    return workflow, {node["id"]: node for node in page.nodes()}


def test_templates_are_the_ui_workflows_with_thumbnails(browser):
    server, page = browser
    templates = server.get("/workflow_templates")[PACK]
    assert sorted(templates) == sorted(p.stem for p in UI_WORKFLOWS)
    for name in templates:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK}/{name}.jpg", timeout=30) as answer:
            assert answer.headers["Content-Type"] == "image/jpeg" and answer.read(3) == b"\xff\xd8\xff", name
    # what the Templates browser shows under the pack's name
    category = page.page.get_by_text(PACK, exact=True).first
    for _ in range(2):  # the command toggles the dialog, which an older frontend may open by itself at start
        page.command("Comfy.BrowseTemplates")
        if category.is_visible():
            break
    category.click()
    page.page.wait_for_timeout(1500)
    for name in templates:
        assert page.page.get_by_text(name, exact=True).count(), f"template {name} is not shown"
    page.screenshot("templates")
    page.page.keyboard.press("Escape")



@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_workflow_opens_with_the_values_its_file_means(browser, object_info, path):
    wf.skip_if_too_old(path)
    _, page = browser
    workflow, shown = opened(page, path)
    for node in workflow["nodes"]:
        on_page = shown[node["id"]]
        assert on_page["registered"], f"node {node['id']}: '{node['type']}' is missing in the frontend"
        if node["type"] not in object_info:  # frontend-only nodes (Note)
            continue
        expected, problems = wf.widget_values(node, object_info[node["type"]])
        assert not problems, f"node {node['id']} ({node['type']}): {problems}"
        widgets = dict(on_page["widgets"])
        for name, value in expected.items():
            assert widgets.get(name) == value, f"node {node['id']} ({node['type']}): {name} = {widgets.get(name)!r}, " \
                                               f"the file means {value!r}"
    assert not page.errors, page.errors
    page.screenshot(path.stem)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_workflow_nodes_do_not_overlap(browser, path):
    wf.skip_if_too_old(path)
    _, page = browser
    _, shown = opened(page, path)
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in shown.values()]  # 30: the title bar above pos
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1:]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"{path.name}: nodes {a} and {b} overlap"


def new_images(server: ComfyServer, seen: set[str], timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = server.get("/history")
        fresh = [k for k in history if k not in seen]
        if fresh and history[fresh[0]].get("status", {}).get("completed") is not None:
            return history[fresh[0]]
        time.sleep(0.5)
    raise AssertionError(f"no prompt finished within {timeout:.0f} s:\n{server.tail()}")


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_workflow_runs_from_the_page(browser, path):
    """Run pressed on the opened workflow, its widgets scaled down as workflow_format.scaled_inputs says
    (64×64, 2 steps, no smoothing search): the image arrives."""
    wf.skip_if_too_old(path)
    from PIL import Image

    server, page = browser
    _, shown = opened(page, path)
    for node in shown.values():
        for name, value in wf.scaled_inputs(node["type"], dict(node["widgets"])).items():
            page.set_widget(node["id"], name, value)
    seen = set(server.get("/history"))
    page.run()
    entry = new_images(server, seen)
    assert entry["status"]["status_str"] == "success", str(entry["status"])[:3000]
    images = [i for output in entry["outputs"].values() for i in output.get("images", []) if i["type"] == "output"]
    assert images, f"{path.name}: no image arrived"
    page.screenshot(f"{path.stem}-after-run")
    saves = [n for n in shown.values() if n["type"] == "SVDQuantSaveModel"]
    for save in saves:  # the saved path on the node, and the new file in the loader's list at once
        text = entry["outputs"][str(save["id"])]["text"][0]
        page.page.wait_for_timeout(1000)
        assert dict(page.nodes_by_id()[save["id"]]["widgets"]).get("saved") == text
        saved = text.removeprefix("saved diffusion_models/")
        assert saved in page.combo_options("SVDQuantModelLoader", "model_name")
    if os.environ.get("SVDQUANT_WRITE_THUMBNAILS"):
        image = server.base / "output" / images[0]["subfolder"] / images[0]["filename"]
        with Image.open(image) as png:
            png.convert("RGB").resize((256, 256), Image.NEAREST).save(path.with_suffix(".jpg"), quality=90)


def test_a_new_quantize_node_keeps_its_seed(browser):
    """A calibration seed that changed after every run would quantize again and write a new file each time."""
    _, page = browser
    page.load(wf.load(wf.WORKFLOWS / "svdquant-quantize-and-save.json"))
    widgets = dict(page.add_node("SVDQuantQuantizeModel")["widgets"])
    assert widgets["seed"] == 0 and "control_after_generate" not in widgets
    page.screenshot("new-quantize-node")


# (a rank of 40 never leaves the page: the frontend snaps it to the widget's step of 16)
BAD_INPUTS = [("SVDQuantQuantizeModel", "rank", -16), ("SVDQuantQuantizeModel", "rank", 4096),
              ("SVDQuantQuantizeModel", "steps", 0),
              ("SVDQuantQuantizeModel", "width", 8), ("SVDQuantQuantizeModel", "precision", "int3"),
              ("SVDQuantQuantizeModel", "sampler_name", "bogus"),
              *[("SVDQuantSaveModel", "filename_prefix", p) for p in ("../up", "/tmp/abs", "C:\\x\\y", "a\\..\\..\\b")]]


@pytest.mark.parametrize("node_type, name, value", BAD_INPUTS, ids=lambda v: str(v))
def test_bad_input_is_refused_when_queued(browser, node_type, name, value):
    """Set in the page and Run pressed: ComfyUI refuses the node when the prompt is queued, naming the node and
    the input, and nothing that depends on it runs. (As always in ComfyUI, outputs that do not depend on the
    refused node still run: a bad save prefix leaves the workflow's check image to be made.)"""
    server, page = browser
    _, shown = opened(page, wf.WORKFLOWS / "svdquant-quantize-and-save.json")
    node = next(n for n in shown.values() if n["type"] == node_type)
    page.set_widget(node["id"], name, value)
    seen = set(server.get("/history"))
    try:
        page.run()
        page.page.wait_for_timeout(1000)
        queue = server.get("/queue")
        errors = page.page.evaluate("() => window.app.lastNodeErrors") or {}
    finally:  # an accepted prompt would quantize for minutes: stop it
        server.request("/queue", {"clear": True})
        server.request("/interrupt", {})
        page.page.keyboard.press("Escape")  # the error dialog
    queued_outputs = {o for entry in queue["queue_running"] + queue["queue_pending"] for o in entry[4]}
    assert str(node["id"]) not in queued_outputs and (node_type != "SVDQuantQuantizeModel" or not queued_outputs)
    assert str(node["id"]) in errors, errors
    messages = " ".join(f"{e.get('details')} {e.get('extra_info', {}).get('input_name')}"
                        for e in errors[str(node["id"])]["errors"])
    assert name in messages, messages
    assert all(str(node["id"]) not in server.get(f"/history/{k}").get(k, {}).get("outputs", {})
               for k in set(server.get("/history")) - seen)
