"""Particle baselines: SSP's rounding law, presets' rules, best-of-N importance resampling, local search."""

import numpy as np
import pytest
import torch

from dts_diffusers.methods import METHODS, PARTICLE_PRESETS, build_sampler
from dts_diffusers.particles import reward_ascent, score_particles, temperature_schedule, tilt
from dts_diffusers.resampling import multinomial, ssp_counts, systematic
from dts_diffusers.toy import bimodal_1d, checkerboard_2d

TASK = bimodal_1d()
CHECKERBOARD = checkerboard_2d(num_steps=20)  # reward −½‖x‖²: smooth, so its gradient is informative everywhere


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
        chain = TASK.chain
        return build_sampler(
            method, chain.prior, chain.transition, TASK.reward, 20, lam=1.5, seed=3, renoise=chain.renoise
        )

    a, b = build().run(1000), build().run(1000)
    assert a.nfe <= 1000
    assert torch.equal(a.sample(16), b.sample(16))


@pytest.mark.parametrize("method", ["dts", "dts*", "dts-paper", "best-of-n", "smc", "dfs"])
def test_an_early_stop_drops_the_rest_of_the_budget(method):
    """A callback that stops a run early leaves nothing of that run's budget behind: a later run(b) spends at most
    b more (not b plus what the stop left), and does spend it."""
    chain = TASK.chain
    sampler = build_sampler(
        method, chain.prior, chain.transition, TASK.reward, 20, lam=1.5, seed=3, renoise=chain.renoise,
        num_particles=8, batch_size=4,
    )  # fmt: skip
    sampler.run(2000, callback=lambda s: True)
    stopped = sampler.nfe
    assert 0 < stopped <= 200
    sampler.run(300)
    assert stopped + 200 < sampler.nfe <= stopped + 300


def test_best_of_n_importance_resampling_targets_pi_star():
    bon = build_sampler("best-of-n", TASK.chain.prior, TASK.chain.transition, TASK.reward, 20, lam=1.5, seed=0)
    mass = (bon.run(40_000).sample(4000) > 0).float().mean().item()
    target = (TASK.target_samples(100_000, 0) > 0).float().mean().item()
    assert abs(mass - target) < 0.06


def test_unknown_method_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of dts, dts\\*, dts-paper, dts\\*-paper, best-of-n"):
        build_sampler("mcmc", TASK.chain.prior, TASK.chain.transition, TASK.reward, 20)


# ---------------------------------------------------------------------------------------------------------------------
# local search: gradient step on x̂_0, re-noise to the level, predict again
# ---------------------------------------------------------------------------------------------------------------------
class Recorder:
    """Wraps the chain's transition and renoise, recording rows per call and renoise levels."""

    def __init__(self, chain):
        self.chain, self.rows, self.renoised = chain, 0, []

    def transition(self, x, level, generators, return_x0=False):
        self.rows += len(x)
        return self.chain.transition(x, level, generators, return_x0=return_x0)

    def renoise(self, x, from_level, to_level, generators):
        self.renoised.append((from_level, to_level, len(x)))
        return self.chain.renoise(x, from_level, to_level, generators)


def final_rewards(sampler) -> np.ndarray:
    if hasattr(sampler, "_populations"):
        return np.concatenate([p.rewards for p in sampler._populations])
    return np.asarray(sampler._rewards)


def test_reward_ascent_is_one_gradient_step_on_x0_alone():
    x0 = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    out = reward_ascent(CHECKERBOARD.reward, x0, 0.25)  # ∇(−½‖x‖²) = −x
    torch.testing.assert_close(out, 0.75 * x0)
    assert not out.requires_grad


@pytest.mark.parametrize("method", ["bfs", "dfs"])
def test_local_search_raises_the_mean_reward_at_equal_evaluation_levels(method):
    chain = CHECKERBOARD.chain

    def mean_reward(steps: int, seed: int) -> float:
        sampler = build_sampler(
            method, chain.prior, chain.transition, CHECKERBOARD.reward, 20, seed=seed, renoise=chain.renoise,
            num_particles=64, local_search_steps=steps, local_search_step_size=0.3,
        )  # fmt: skip
        assert sampler.eval_levels == [20, 16, 12, 8, 4]
        return float(final_rewards(sampler.run(64 * (20 + 5 * steps))).mean())

    for seed in (0, 1):
        without, with_local_search = mean_reward(0, seed), mean_reward(2, seed)
        assert with_local_search > without + 0.5  # about -0.15 against -1.2 (BFS) or -2.2 (DFS)


@pytest.mark.parametrize("method", ["bfs", "dfs"])
def test_local_search_costs_one_nfe_per_repetition(method):
    recorder = Recorder(CHECKERBOARD.chain)
    sampler = build_sampler(
        method, CHECKERBOARD.chain.prior, recorder.transition, CHECKERBOARD.reward, 20, renoise=recorder.renoise,
        num_particles=8, eval_levels=[15, 5], local_search_steps=3, max_backtracks=0, batch_size=4,
    )  # fmt: skip
    sampler.run(8 * (20 + 3 * 2))
    assert sampler.nfe == recorder.rows == 8 * 26
    assert sorted({(a, b) for a, b, _ in recorder.renoised}) == [(4, 5), (14, 15)]  # each step back to its level
    assert sum(rows for *_, rows in recorder.renoised) == 8 * 3 * 2
    with pytest.raises(ValueError, match="below one rollout"):
        build_sampler(
            method, CHECKERBOARD.chain.prior, recorder.transition, CHECKERBOARD.reward, 20, renoise=recorder.renoise,
            eval_levels=[15, 5], local_search_steps=3,
        ).run(25)  # fmt: skip


@pytest.mark.parametrize("method", ["bfs", "dfs"])
def test_local_search_needs_a_differentiable_reward_and_renoise(method):
    chain = CHECKERBOARD.chain

    def detached(x0):
        return CHECKERBOARD.reward(x0).detach()

    sampler = build_sampler(
        method, chain.prior, chain.transition, detached, 20, renoise=chain.renoise, local_search_steps=1
    )
    with pytest.raises(ValueError, match=r"needs a differentiable reward.*differentiable=True"):
        sampler.run(100)
    with pytest.raises(ValueError, match=r"renoise=transition\.renoise"):
        build_sampler(method, chain.prior, chain.transition, CHECKERBOARD.reward, 20, local_search_steps=1)
    with pytest.raises(ValueError, match="local_search_steps must be a non-negative integer"):
        build_sampler(method, chain.prior, chain.transition, CHECKERBOARD.reward, 20, renoise=chain.renoise,
                      local_search_steps=-1)  # fmt: skip


def test_build_sampler_refuses_an_option_no_method_takes_and_drops_the_others_options():
    """One set of arguments drives every method (SMC ignores the tree's options), but a misspelled option is an
    error, not a silent default."""
    chain = TASK.chain
    smc = build_sampler("smc", chain.prior, chain.transition, TASK.reward, 20, level_cost_exponent=1.0, seed=0)
    assert not hasattr(smc, "level_cost_exponent")  # a tree option, dropped for SMC
    with pytest.raises(TypeError, match=r"unknown option\(s\) level_cost_exponant; 'dts' takes .*level_cost_exponent"):
        build_sampler("dts", chain.prior, chain.transition, TASK.reward, 20, level_cost_exponant=1.0)
