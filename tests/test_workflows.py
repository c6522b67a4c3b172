"""The shipped workflows reference only nodes ComfyUI 0.8.0 (or this pack) has, with widget values our nodes accept,
and each UI-format workflow has an API-format twin describing the same graph."""

import json
from pathlib import Path

import pytest
from dts_diffusers.comfy_nodes import NODE_CLASS_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
CORE_NODES = set(json.loads((Path(__file__).parent / "data" / "comfyui_0.8.0_nodes.json").read_text())["nodes"])
UI_FILES = sorted(p for p in WORKFLOWS.glob("*.json") if not p.stem.endswith("_api"))


def check_widget(node_type: str, name: str, value) -> None:
    spec = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    kind, options = {**spec["required"], **spec.get("optional", {})}[name][:2]
    if isinstance(kind, list):
        assert value in kind, f"{node_type}.{name}={value!r} is not one of {kind}"
    elif kind in ("INT", "FLOAT"):
        assert options["min"] <= value <= options["max"], f"{node_type}.{name}={value} out of range"
        assert kind == "FLOAT" or isinstance(value, int), f"{node_type}.{name} must be an integer"
    elif kind == "STRING":
        assert isinstance(value, str)


def widget_names(node_type: str) -> list[str]:
    """Widget inputs in the order the frontend stores them; a seed's 'control after generate' follows it."""
    spec = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    names = []
    for name, s in {**spec["required"], **spec.get("optional", {})}.items():
        if isinstance(s[0], list) or s[0] in ("INT", "FLOAT", "STRING"):
            names.append(name)
            if len(s) > 1 and s[1].get("control_after_generate"):
                names.append("")
    return names


def test_there_are_ui_workflows_with_api_twins_and_example_copies():
    assert {p.stem for p in UI_FILES} >= {
        "sd15_image_reward_dts", "sdxl_dts_star_search", "sampler_custom_advanced_dts", "tiny_cpu_dts",
        "sd15_dts_anytime_tree",
    }  # fmt: skip
    for path in UI_FILES:
        assert (WORKFLOWS / f"{path.stem}_api.json").is_file()
        assert (ROOT / "example_workflows" / path.name).read_bytes() == path.read_bytes()
    assert {p.name for p in (ROOT / "example_workflows").glob("*.json")} == {p.name for p in UI_FILES}


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_nodes_links_and_widgets(path):
    workflow = json.loads(path.read_text())
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in nodes.values():
        assert node["type"] in CORE_NODES | set(NODE_CLASS_MAPPINGS), node["type"]
        if node["type"] in NODE_CLASS_MAPPINGS:
            names = widget_names(node["type"])
            assert len(node["widgets_values"]) == len(names), node["type"]
            for name, value in zip(names, node["widgets_values"], strict=True):
                if name:
                    check_widget(node["type"], name, value)
                else:
                    assert value in ("fixed", "increment", "decrement", "randomize")
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        assert nodes[source]["outputs"][source_slot]["type"] == kind
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
    assert workflow["last_link_id"] == max(link[0] for link in workflow["links"])
    assert workflow["last_node_id"] == max(nodes)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_twin_has_the_same_graph_and_valid_values(path):
    ui = json.loads(path.read_text())
    api = json.loads((WORKFLOWS / f"{path.stem}_api.json").read_text())
    assert {str(node["id"]): node["type"] for node in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    ui_links = {(str(s), ss, str(t)) for _, s, ss, t, _, _ in ui["links"]}
    api_links = {
        (v[0], v[1], target) for target, node in api.items() for v in node["inputs"].values() if isinstance(v, list)
    }
    assert ui_links == api_links
    for node_id, node in api.items():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in api and isinstance(value[1], int)
        if node["class_type"] in NODE_CLASS_MAPPINGS:
            spec = NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()
            assert set(spec["required"]) <= set(node["inputs"]), node_id
            for name, value in node["inputs"].items():
                if not isinstance(value, list):
                    check_widget(node["class_type"], name, value)
            ui_node = next(n for n in ui["nodes"] if str(n["id"]) == node_id)
            names = widget_names(node["class_type"])
            ui_values = {n: v for n, v in zip(names, ui_node["widgets_values"], strict=True) if n}
            assert ui_values == {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}


def test_the_anytime_workflow_continues_the_first_samplers_tree_with_the_same_settings():
    api = json.loads((WORKFLOWS / "sd15_dts_anytime_tree_api.json").read_text())
    first, second = api["6"]["inputs"], api["10"]["inputs"]
    assert second["tree"] == ["6", 3] and NODE_CLASS_MAPPINGS["DTSSampler"].RETURN_NAMES[3] == "tree"
    assert {k: v for k, v in first.items() if k != "nfe_budget"} == {
        k: v for k, v in second.items() if k not in ("nfe_budget", "tree")
    }
    assert api["7"]["inputs"]["samples"] == ["10", 0]
