"""The ComfyUI nodes without ComfyUI: schemas ComfyUI can render, and bad inputs rejected with clear messages."""

import pytest
import torch
from dts_diffusers.comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, nodes, sampling

SOCKET_TYPES = {"MODEL", "CONDITIONING", "LATENT", "VAE", "SAMPLER", "DTS_REWARD"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING"}


def all_inputs(node):
    spec = node.INPUT_TYPES()
    assert set(spec) <= {"required", "optional"}
    return {**spec["required"], **spec.get("optional", {})}


@pytest.mark.parametrize("node_id", list(NODE_CLASS_MAPPINGS))
def test_every_input_has_a_valid_type_and_default_within_bounds(node_id):
    node = NODE_CLASS_MAPPINGS[node_id]
    assert node_id in NODE_DISPLAY_NAME_MAPPINGS
    assert callable(getattr(node, node.FUNCTION))
    assert len(getattr(node, "RETURN_NAMES", node.RETURN_TYPES)) == len(node.RETURN_TYPES)
    assert set(node.RETURN_TYPES) <= SOCKET_TYPES | WIDGET_TYPES | {"FLOAT", "STRING"}
    for name, spec in all_inputs(node).items():
        kind, options = spec[0], spec[1] if len(spec) > 1 else {}
        if isinstance(kind, list):
            assert kind and all(isinstance(choice, str) for choice in kind), name
            assert options.get("default", kind[0]) in kind, name
        elif kind in ("INT", "FLOAT"):
            assert options["min"] <= options["default"] <= options["max"], name
            assert isinstance(options["default"], int if kind == "INT" else float), name
        elif kind == "STRING":
            assert isinstance(options["default"], str), name
        else:
            assert kind in SOCKET_TYPES, (name, kind)


def test_function_signatures_take_every_input():
    import inspect

    for node in NODE_CLASS_MAPPINGS.values():
        parameters = inspect.signature(getattr(node, node.FUNCTION)).parameters
        spec = node.INPUT_TYPES()
        takes_rest = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        for name in spec["required"]:
            assert name in parameters, (node.__name__, name)
        for name in spec.get("optional", {}):
            assert name in parameters or takes_rest, (node.__name__, name)


def test_scheduler_choices_fall_back_to_comfyui_0_8_names_without_comfyui():
    names = nodes.scheduler_names()
    assert "karras" in names and "normal" in names


def test_tree_options_map_node_inputs_to_sample_dts():
    options = nodes.tree_options("search", 2.0, 1.0, branch_every=5, rollout_batch=8, baseline="smc")
    assert options == {
        "mode": "search", "method": "smc", "lam": 2.0, "eta": 1.0, "branch_every": 5, "pw_c": 2.0, "pw_alpha": 0.8,
        "c_uct": 1.0, "batch_size": 8,
    }  # fmt: skip
    assert nodes.tree_options("sample", 1.0, 1.0)["branch_every"] is None  # 0 = the paper's schedule


def test_bad_inputs_raise_in_the_node_function_with_clear_messages():
    sampler = NODE_CLASS_MAPPINGS["DTSSamplerSelect"]()
    with pytest.raises(ValueError, match="lam must be >= 0"):
        sampler.get_sampler(None, None, "", "sample", -1.0, 100, 1.0)
    with pytest.raises(ValueError, match="eta must be > 0"):
        sampler.get_sampler(None, None, "", "sample", 1.0, 100, 0.0)
    ksampler = NODE_CLASS_MAPPINGS["DTSSampler"]()
    common = dict(model=None, positive=None, negative=None, latent_image=None, vae=None, reward=None, reward_prompt="",
                  seed=0, cfg=7.0, scheduler="karras", denoise=1.0, mode="sample", num_outputs=1)  # fmt: skip
    with pytest.raises(ValueError, match="below one rollout"):
        ksampler.sample(steps=20, lam=1.0, nfe_budget=10, eta=1.0, **common)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ksampler.sample(steps=20, lam=1.0, nfe_budget=100, eta=0.0, **common)


def test_reward_loader_builds_a_registered_reward_and_rejects_bad_choices():
    loader = NODE_CLASS_MAPPINGS["DTSRewardLoader"]()
    assert "jpeg-compressibility" in dict(all_inputs(loader))["reward_name"][0]
    (reward,) = loader.load("jpeg-compressibility", sampling.NO_WEIGHTS, "cpu", "auto", "")
    images = torch.rand(2, 3, 32, 32)
    images[1] = 0.5  # a flat image compresses better
    scores = reward(images, "a prompt")
    assert scores.shape == (2,) and scores[1] > scores[0]
    with pytest.raises(ValueError, match="takes no weights"):
        loader.load("jpeg-compressibility", "some-file.safetensors", "cpu", "auto", "")
    with pytest.raises(ValueError, match="JSON object"):
        loader.load("jpeg-compressibility", sampling.NO_WEIGHTS, "cpu", "auto", "[1, 2]")
    with pytest.raises(ValueError, match="unknown reward"):
        loader.load("no-such-reward", sampling.NO_WEIGHTS, "cpu", "auto", "")
