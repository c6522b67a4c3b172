"""Particle baselines and resampling: SSP's rounding law, presets' rules, best-of-N importance resampling."""

import numpy as np
import pytest
import torch

from dts_diffusers.methods import METHODS, PARTICLE_PRESETS, build_sampler
from dts_diffusers.particles import score_particles, temperature_schedule, tilt
from dts_diffusers.resampling import multinomial, ssp_counts, systematic
from dts_diffusers.toy import bimodal_1d

TASK = bimodal_1d()


def test_ssp_gives_floor_or_ceil_copies_n_in_total_and_is_unbiased():
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(9))
    counts = np.array([ssp_counts(weights, 13, rng) for _ in range(20000)])
    assert (counts.sum(1) == 13).all()
    assert (counts >= np.floor(13 * weights)).all() and (counts <= np.ceil(13 * weights)).all()
    np.testing.assert_allclose(counts.mean(0), 13 * weights, atol=0.02)


@pytest.mark.parametrize("resample", [multinomial, systematic])
def test_other_resamplers_are_unbiased(resample):
    rng = np.random.default_rng(1)
    weights = np.array([0.5, 0.3, 0.2])
    counts = np.stack([np.bincount(resample(weights, 10, rng), minlength=3) for _ in range(20000)])
    np.testing.assert_allclose(counts.mean(0), 10 * weights, atol=0.05)


def test_scoring_rules_on_a_hand_checked_example():
    current, parent = np.array([0.5, 2.0, 1.0]), np.array([1.0, 1.0, -np.inf])
    np.testing.assert_allclose(score_particles("current", current, parent), [0.5, 2.0, 1.0])
    np.testing.assert_allclose(score_particles("difference", current, parent), [-0.5, 1.0, 1.0])
    np.testing.assert_allclose(score_particles("max", current, parent), [1.0, 2.0, 1.0])
    np.testing.assert_array_equal(tilt(np.zeros(3), np.inf, np.array([1.0, 3.0, 3.0])), [-np.inf, 0.0, 0.0])
    ramp = temperature_schedule("increase", 2.0, 4)
    assert ramp.mean() == pytest.approx(2.0) and (np.diff(ramp) > 0).all()


def test_presets_reproduce_their_methods_rules():
    assert PARTICLE_PRESETS["svdd"] == {**PARTICLE_PRESETS["svdd"], "temperature": "inf", "scoring": "current"}
    assert PARTICLE_PRESETS["das"]["resampling"] == "ssp" and PARTICLE_PRESETS["das"]["scoring"] == "difference"
    assert PARTICLE_PRESETS["fk"]["scoring"] == "max" and PARTICLE_PRESETS["fk"]["temperature"] == "constant"
    assert PARTICLE_PRESETS["bfs"] | {} == {**PARTICLE_PRESETS["bfs"], "temperature": "increase", "scoring": "max"}
    # SVDD is greedy: after its first evaluation every particle descends from the best-scoring one
    svdd = build_sampler("svdd", TASK.chain.prior, TASK.chain.transition, TASK.reward, 20, num_particles=8, seed=0)
    svdd.run(160)
    assert len(torch.unique(svdd.sample(8, return_rewards=True)[0])) >= 1
    assert svdd.stats()["particles"] == 8


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dts*"])
def test_every_method_honours_the_budget_and_seed(method):
    def build():
        return build_sampler(method, TASK.chain.prior, TASK.chain.transition, TASK.reward, 20, lam=1.5, seed=3)

    a, b = build().run(1000), build().run(1000)
    assert a.nfe <= 1000
    assert torch.equal(a.sample(16), b.sample(16))


def test_best_of_n_importance_resampling_targets_pi_star():
    bon = build_sampler("best-of-n", TASK.chain.prior, TASK.chain.transition, TASK.reward, 20, lam=1.5, seed=0)
    mass = (bon.run(40_000).sample(4000) > 0).float().mean().item()
    target = (TASK.target_samples(100_000, 0) > 0).float().mean().item()
    assert abs(mass - target) < 0.06


def test_unknown_method_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of dts, dts\\*, best-of-n"):
        build_sampler("mcmc", TASK.chain.prior, TASK.chain.transition, TASK.reward, 20)
