"""Every reward module imports on the installed transformers (5.x in CI) without the `image-reward` package."""

import importlib
import importlib.util
import inspect
import sys

import pytest

# each module and what it must define: its loaders (registered under dts_diffusers.rewards.base._BUILTIN) or helpers
MODULES = {
    "base": ["Reward", "CallableReward", "WeightedSum", "load_reward", "as_reward"],
    "hub": ["resolve_file", "load_pretrained", "read_state_dict", "read_json_config", "WeightsFileError"],
    "preprocess": ["clip_preprocess", "resize_short_side", "center_crop", "normalize"],
    "jpeg": ["load_jpeg_compressibility", "load_jpeg_incompressibility"],
    "clip": ["load_clip_score", "load_pickscore", "load_aesthetic"],
    "image_reward": ["load_image_reward", "convert_to_safetensors"],
    "classifier": ["load_classifier_reward", "load_digit_reward", "check_pt2_archive"],
    "hpsv2": ["load_hpsv2"],
}


@pytest.mark.parametrize("module", MODULES)
def test_reward_module_imports(module):
    """The module imports, defines its public names itself, and its registered loaders keep the loader contract."""
    from dts_diffusers.rewards.base import _BUILTIN

    imported = importlib.import_module(f"dts_diffusers.rewards.{module}")
    for name in MODULES[module]:
        assert callable(getattr(imported, name)) and getattr(imported, name).__module__ == imported.__name__, name
    loaders = [target.split(":")[1] for target in _BUILTIN.values() if target.split(":")[0] == imported.__name__]
    assert set(loaders) <= set(MODULES[module])
    for name in loaders:  # load_reward calls factory(device=..., dtype=..., **kwargs)
        assert list(inspect.signature(getattr(imported, name)).parameters)[:2] == ["device", "dtype"], name


def test_image_reward_never_imports_the_reference_package():
    importlib.import_module("dts_diffusers.rewards.image_reward")
    assert "ImageReward" not in sys.modules and "image_reward" not in sys.modules


def test_every_registered_loader_resolves():
    from dts_diffusers.rewards.base import reward_loader, reward_names

    for name in reward_names():
        assert callable(reward_loader(name))


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip not installed (extra 'hpsv2')")
def test_hpsv2_backend_imports():
    from dts_diffusers.rewards.hpsv2 import import_open_clip

    assert hasattr(import_open_clip(), "create_model")
