"""Every reward module imports on the installed transformers (5.x in CI) without the `image-reward` package."""

import importlib
import importlib.util
import sys

import pytest

MODULES = ["base", "hub", "preprocess", "jpeg", "clip", "image_reward", "classifier", "hpsv2"]


@pytest.mark.parametrize("module", MODULES)
def test_reward_module_imports(module):
    importlib.import_module(f"dts_diffusers.rewards.{module}")


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
