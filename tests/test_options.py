"""TreeOptions: one checked object of tree options, built once by every front end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dts_diffusers.pipelines import DTSPipeline

from dts_diffusers import TreeOptions, Widening
from dts_diffusers.methods import METHODS
from tests.test_pipeline import STEPS, RecordingReward, run, sd_path  # noqa: F401  (sd_path is a fixture)


@pytest.fixture
def pipe(sd_path):  # noqa: F811
    from diffusers import DDIMScheduler

    pipe = DTSPipeline.from_pretrained(sd_path)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_defaults_are_the_pipelines_and_normalised():
    options = TreeOptions()
    assert (options.lam, options.mode, options.method, options.rollout_batch_size) == (1.0, "sample", "dts", 16)
    given = TreeOptions(lam=np.float32(2), rollout_batch_size=np.int64(4), branch_levels=np.array([20, 10]))
    assert type(given.lam) is float and type(given.rollout_batch_size) is int
    assert given.branch_levels == (20, 10)
    assert given.levels(40) == [20, 10]
    assert TreeOptions(branch_every=5).levels(20) == [20, 15, 10, 5]
    assert TreeOptions().levels(50) == [50, 40, 30, 20, 10]


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"lam": -1.0}, ValueError, "lam must be a finite number >= 0"),
        ({"lam": float("inf")}, ValueError, "mode='search'"),
        ({"lam": True}, TypeError, "lam must be a real number"),
        ({"mode": "greedy"}, ValueError, "mode must be 'sample'"),
        ({"method": "mcts"}, ValueError, "unknown method 'mcts'"),
        ({"method_options": {"widening": "paper"}}, ValueError, "use widening="),
        ({"method": "dfs", "method_options": {"no_such": 1}}, ValueError, "has no option no_such"),
        ({"method_options": [1]}, TypeError, "method_options must be a dict"),
        ({"branch_every": 0}, ValueError, "branch_every must be >= 1"),
        ({"branch_levels": "50,40"}, TypeError, "branch_levels must be a list"),
        ({"widening": "wide"}, ValueError, "widening must be a Widening or one of"),
        ({"widening": 2.0}, TypeError, "widening must be a Widening"),
        ({"c_uct": float("nan")}, ValueError, "c_uct must be a finite number"),
        ({"rollout_batch_size": 0}, ValueError, "rollout_batch_size must be >= 1"),
        ({"latent_cache_bytes": 2.5}, TypeError, "latent_cache_bytes must be an integer"),
        ({"latent_cache_device": "nowhere"}, ValueError, "latent_cache_device='nowhere' is not a usable device"),
    ],
)
def test_bad_values_fail_when_built_and_when_replaced(changes, error, match):
    with pytest.raises(error, match=match):
        TreeOptions(**changes)
    with pytest.raises(error, match=match):
        TreeOptions().replace(**changes)


def test_build_replaces_given_fields_and_refuses_other_objects():
    base = TreeOptions(lam=3.0, mode="search", rollout_batch_size=4)
    built = TreeOptions.build(base, lam=5.0)
    assert (built.lam, built.mode, built.rollout_batch_size) == (5.0, "search", 4)
    assert base.lam == 3.0  # frozen: building never changes the given options
    with pytest.raises(TypeError, match="tree_options must be a TreeOptions"):
        TreeOptions.build({"lam": 1.0})
    assert TreeOptions.split_keywords({"lam": 1, "height": 8}) == ({"lam": 1}, {"height": 8})


def test_every_method_gets_sampler_options_it_accepts():
    from dts_diffusers.methods import sampler_option_names

    for method in METHODS:
        options = TreeOptions(method=method, widening=Widening(), latent_cache_bytes=1 << 20).sampler_options(20)
        assert options["branch_levels"] == [20, 16, 12, 8, 4]
        assert options["batch_size"] == 16
        if method in ("dts", "dts*"):
            assert set(options) <= set(sampler_option_names(method)), method
    assert "widening" not in TreeOptions().sampler_options(20)  # "default" keeps each method's own widening
    assert TreeOptions(method="dfs", method_options={"max_backtracks": 2}).sampler_options(20)["max_backtracks"] == 2


def test_pipeline_takes_tree_options_and_keywords_alike(pipe):
    options = TreeOptions(lam=2.0, mode="search", branch_every=2, rollout_batch_size=3)
    reward = RecordingReward()
    by_object = pipe(
        "a red square", reward=reward, tree_options=options, num_inference_steps=STEPS, nfe_budget=24,
        generator=torch.Generator().manual_seed(0), output_type="np",
    )  # fmt: skip
    by_keywords = run(pipe, lam=2.0, mode="search")
    np.testing.assert_array_equal(by_object.images, by_keywords.images)
    assert by_object.trees[0].built_for["mode"] == "search"
    assert by_object.trees[0].built_for["lam"] == 2.0
    overridden = run(pipe, tree_options=options, lam=0.0)
    assert overridden.trees[0].built_for["lam"] == 0.0 and overridden.trees[0].built_for["mode"] == "search"
    with pytest.raises(ValueError, match="mode must be 'sample'"):
        run(pipe, tree_options=options, mode="best")
    with pytest.raises(TypeError, match="unexpected keyword argument 'lamb'"):
        run(pipe, lamb=1.0)


@pytest.mark.parametrize("method", ["best-of-n", "smc", "dts"])
def test_reward_sees_at_most_the_larger_batch(pipe, method):
    """Particle methods hand the whole population to the reward at once; the pipeline scores it in chunks of
    vae_batch_size, so decoded images never pile up with the budget."""
    reward = RecordingReward()
    out = run(pipe, method=method, reward=reward, nfe_budget=96, rollout_batch_size=3, vae_batch_size=2)
    largest = max(len(images) for images, _ in reward.calls)
    assert largest <= max(3, 2)
    assert out.reward_calls == sum(len(images) for images, _ in reward.calls)
    assert torch.isfinite(out.rewards).all()
