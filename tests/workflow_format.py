"""ComfyUI workflow files checked against the node definitions a server publishes (``/object_info``), and
the UI format (what the editor saves: ``nodes``, ``links``, positional ``widgets_values``) turned into
the API format (``{id: {class_type, inputs}}``) that ``POST /prompt`` runs.

UI-format facts used here (ComfyUI frontend, workflow version 0.4): a node's widgets are its INT, FLOAT,
STRING, BOOLEAN and combo inputs (not ``forceInput`` ones) in definition order, required before optional;
``widgets_values`` holds one value per widget plus, after each widget whose definition has
``control_after_generate`` (or, lacking the option, an INT named seed / noise_seed), the control mode
("fixed", "increment", ...). A link is
``[id, from node, from slot, to node, to slot, type]``. Notes are editor-only nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
EDITOR_ONLY = {"Note", "MarkdownNote"}
CONTROL_MODES = {"fixed", "increment", "decrement", "randomize"}


def is_ui_format(workflow: dict) -> bool:
    return isinstance(workflow.get("nodes"), list) and isinstance(workflow.get("links"), list)


def load(path: str | Path) -> dict:
    with open(path) as f:
        return json.load(f)


def minimum_comfyui(path: str | Path) -> tuple[int, ...] | None:
    """The oldest ComfyUI a workflow runs on, where its UI file says so (``extra.svdquant.minimum_comfyui``, e.g.
    "0.8.0": a model family older versions lack); an API-format file follows its UI twin of the same name."""
    ui = WORKFLOWS / Path(path).name
    found = load(ui).get("extra", {}).get("svdquant", {}).get("minimum_comfyui") if ui.exists() else None
    return tuple(int(p) for p in found.split(".")) if found else None


def too_old_for(path: str | Path, running: tuple[int, ...] | None) -> str | None:
    """Why the ComfyUI of version ``running`` cannot run the workflow at ``path``, or None."""
    needed = minimum_comfyui(path)
    if needed is None or running is None or running >= needed:
        return None
    return (f"{Path(path).name} needs ComfyUI {'.'.join(map(str, needed))} or newer; this is "
            f"{'.'.join(map(str, running))}")


def skip_if_too_old(path: str | Path) -> None:
    """Skip the calling test, saying why, where the running ComfyUI is older than the workflow needs."""
    import pytest

    from comfyui_svdquant.loaders.compat import version

    why = too_old_for(path, version())
    if why:
        pytest.skip(why)


def inputs_of(definition: dict) -> list[tuple[str, object, dict, bool]]:
    """(name, type, options, required) of every input, in the order the editor shows them."""
    out = []
    for category in ("required", "optional"):
        specs = definition["input"].get(category, {})
        for name in definition.get("input_order", {}).get(category, list(specs)):
            spec = specs[name]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, spec[0], options, category == "required"))
    return out


def is_widget(input_type: object, options: dict) -> bool:
    return (isinstance(input_type, list) or input_type in WIDGET_TYPES) and not options.get("forceInput")


def combo_options(input_type: object, options: dict) -> list | None:
    if isinstance(input_type, list):
        return input_type
    if input_type == "COMBO":
        return options.get("options", [])
    return None


def value_problem(name: str, input_type: object, options: dict, value: object) -> str | None:
    """Why ``value`` is not valid for this input, or None."""
    choices = combo_options(input_type, options)
    if choices is not None:
        return None if value in choices else f"{name}: {value!r} is not one of {choices[:10]}"
    if input_type == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{name}: {value!r} is not an integer"
    if input_type == "FLOAT" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"{name}: {value!r} is not a number"
    if input_type in ("INT", "FLOAT"):
        if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
            return f"{name}: {value} is outside [{options.get('min')}, {options.get('max')}]"
    if input_type == "BOOLEAN" and not isinstance(value, bool):
        return f"{name}: {value!r} is not true/false"
    if input_type == "STRING" and not isinstance(value, str):
        return f"{name}: {value!r} is not a string"
    return None


def widget_values(node: dict, definition: dict) -> tuple[dict[str, object], list[str]]:
    """The node's widget values by input name, and the problems found reading them."""
    values, problems = {}, []
    given = list(node.get("widgets_values") or [])
    for name, input_type, options, _ in inputs_of(definition):
        if not is_widget(input_type, options):
            continue
        if not given:
            problems.append(f"no widget value for '{name}'")
            break
        values[name] = given.pop(0)
        # as the frontend does: an INT named seed / noise_seed gets the control widget unless told otherwise
        if options.get("control_after_generate", input_type == "INT" and name in ("seed", "noise_seed")):
            mode = given.pop(0) if given else None
            if mode not in CONTROL_MODES:
                problems.append(f"'{name}' is followed by {mode!r}, not a control_after_generate mode")
    if given:
        problems.append(f"{len(given)} widget values more than the node's widgets: {given}")
    return values, problems


def check_ui(workflow: dict, object_info: dict) -> list[str]:
    """Every way the UI-format workflow disagrees with the published node definitions."""
    problems = []
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in EDITOR_ONLY:
            continue
        definition = object_info.get(node["type"])
        if definition is None:
            problems.append(f"{where}: no such node type on the server")
            continue
        specs = {name: (input_type, options, required) for name, input_type, options, required in inputs_of(definition)}
        linked = set()
        for slot, item in enumerate(node.get("inputs", [])):
            if item["name"] not in specs:
                problems.append(f"{where}: input '{item['name']}' is not an input of {node['type']}")
                continue
            input_type = specs[item["name"]][0]
            if item.get("link") is None:
                continue
            link = links.get(item["link"])
            if link is None or link[3] != node["id"] or link[4] != slot:
                problems.append(f"{where}: input '{item['name']}' names link {item['link']}, which does not end here")
                continue
            source = nodes.get(link[1])
            source_info = object_info.get(source["type"]) if source else None
            if source_info is None or link[2] >= len(source_info["output"]):
                problems.append(f"{where}: input '{item['name']}' comes from a missing node or output")
                continue
            output_type = source_info["output"][link[2]]
            wanted = "COMBO" if isinstance(input_type, list) else input_type
            if output_type != wanted and "*" not in (output_type, wanted) or link[5] != output_type:
                problems.append(f"{where}: input '{item['name']}' ({wanted}) is linked to a {output_type} output "
                                f"(link type {link[5]})")
            linked.add(item["name"])
        for name, (input_type, options, required) in specs.items():
            if required and not is_widget(input_type, options) and name not in linked:
                problems.append(f"{where}: required input '{name}' ({input_type}) is not connected")
        values, found = widget_values(node, definition)
        problems += [f"{where}: {p}" for p in found]
        for name, value in values.items():
            if name in linked:
                continue
            problem = value_problem(name, *specs[name][:2], value)
            if problem:
                problems.append(f"{where}: {problem}")
    for link in workflow["links"]:
        if link[1] not in nodes or link[3] not in nodes:
            problems.append(f"link {link[0]} joins a node that is not in the workflow")
    return problems


def to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format workflow (bypassed and editor-only nodes left out)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in EDITOR_ONLY or node.get("mode", 0) in (2, 4):  # 2: muted, 4: bypassed
            continue
        definition = object_info[node["type"]]
        inputs, _ = widget_values(node, definition)
        for item in node.get("inputs", []):
            if item.get("link") is not None:
                link = links[item["link"]]
                inputs[item["name"]] = [str(link[1]), link[2]]
        title = node.get("title") or definition.get("display_name", node["type"])
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}
    return prompt


def check_api(prompt: dict, object_info: dict) -> list[str]:
    """Every way an API-format prompt disagrees with the published node definitions."""
    problems = []
    for node_id, node in prompt.items():
        where = f"node {node_id} ({node.get('class_type')})"
        definition = object_info.get(node.get("class_type"))
        if definition is None:
            problems.append(f"{where}: no such node type on the server")
            continue
        specs = {name: (t, o, r) for name, t, o, r in inputs_of(definition)}
        for name, value in node["inputs"].items():
            if name not in specs:
                problems.append(f"{where}: '{name}' is not an input of {node['class_type']}")
            elif isinstance(value, list):
                source = prompt.get(value[0])
                if source is None or value[1] >= len(object_info[source["class_type"]]["output"]):
                    problems.append(f"{where}: '{name}' is linked to a missing node or output {value}")
                    continue
                output_type = object_info[source["class_type"]]["output"][value[1]]
                input_type = specs[name][0]
                wanted = "COMBO" if isinstance(input_type, list) else input_type
                if output_type != wanted and "*" not in (output_type, wanted):
                    problems.append(f"{where}: '{name}' ({wanted}) is linked to a {output_type} output")
            else:
                problem = value_problem(name, *specs[name][:2], value)
                if problem:
                    problems.append(f"{where}: {problem}")
        for name, (_, _, required) in specs.items():
            if required and name not in node["inputs"]:
                problems.append(f"{where}: required input '{name}' is missing")
    return problems


def scaled_inputs(class_type: str, inputs: dict, size: int = 64, steps: int = 2,
                  smoothing_search: bool = False) -> dict:
    """What :func:`scaled_down` changes in one node (input name → new value): every width/height set to
    ``size``, every step count cut to ``steps`` and, unless ``smoothing_search``, the quantizer's per-layer
    smoothing search (the slow part of quantizing on a CPU) turned off."""
    out = {name: size for name in ("width", "height") if isinstance(inputs.get(name), int)}
    if isinstance(inputs.get("steps"), int):
        out["steps"] = min(inputs["steps"], steps)
    if class_type == "SVDQuantQuantizeModel" and not smoothing_search:
        out["smoothing"] = False
    return out


def scaled_down(prompt: dict, size: int = 64, steps: int = 2, smoothing_search: bool = False) -> dict:
    """A copy of an API-format prompt that runs in seconds with the small models (:func:`scaled_inputs`);
    nothing else changes."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        node["inputs"].update(scaled_inputs(node["class_type"], node["inputs"], size, steps, smoothing_search))
    return out
