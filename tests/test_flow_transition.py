"""FlowTransition on an exact Gaussian flow: with the closed-form velocity, its chain keeps the flow's marginals."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from dts_diffusers.noise import row_generators
from dts_diffusers.schedulers import FlowTransition

# data x0 ~ N(MEAN, STD²) per channel, each channel 16 independent dimensions: rows x 16 samples per channel
MEAN = torch.tensor([-1.0, 0.0, 0.5, 2.0]).view(4, 1)
STD = torch.tensor([0.5, 1.0, 2.0, 1.5]).view(4, 1)
SHAPE = (4, 16)
TRAIN_TIMESTEPS = 1000


def marginal(sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of x_σ = (1 − σ)·x0 + σ·ε per channel."""
    return (1 - sigma) * MEAN, (1 - sigma) ** 2 * STD**2 + sigma**2


def exact_x0(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[x0 | x_σ] of the Gaussian data: linear in x."""
    mean, variance = marginal(sigma)
    return MEAN + (1 - sigma) * STD**2 / variance * (x - mean)


def exact_velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The rectified flow's velocity E[ε − x0 | x_σ] = (x − E[x0 | x_σ]) / σ, with σ read from the timestep."""
    sigma = float(timestep) / TRAIN_TIMESTEPS
    return (x - exact_x0(x, sigma)) / sigma


def flow_scheduler(**config) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_TIMESTEPS, shift=3.0, **config)  # SD3's shift


def assert_marginal(x: torch.Tensor, sigma: float, level: int, slack: float = 0.0) -> None:
    """Per-channel mean and variance within 5 standard errors of the sample size (plus a relative `slack`)."""
    samples = x.transpose(0, 1).reshape(SHAPE[0], -1)
    n = samples.shape[1]
    mean, variance = marginal(sigma)
    mean_error = (samples.mean(dim=1) - mean.flatten()).abs()
    variance_error = (samples.var(dim=1) - variance.flatten()).abs()
    assert (mean_error <= 5 * (variance.flatten() / n).sqrt()).all(), (level, sigma, mean_error)
    bound = variance.flatten() * (5 * math.sqrt(2 / (n - 1)) + slack)
    assert (variance_error <= bound).all(), (level, sigma, variance_error / variance.flatten())


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ancestral_flow_chain_keeps_the_flow_marginal_at_every_level(eta):
    # The step is first order: with the exact posterior mean its variance drifts by about 5 / num_steps (relative,
    # worst level) from the flow's, which 400 levels keep below a third of the 5-standard-error tolerance of 8192
    # samples per channel. The mean is exact at any number of steps.
    num_steps, rows = 400, 512
    transition = FlowTransition(flow_scheduler(), exact_velocity, num_steps, eta=eta)
    generators = row_generators(range(rows))
    x = transition.prior(SHAPE)(rows, generators)
    assert_marginal(x, transition.sigma(num_steps), num_steps)
    for level in range(num_steps, 0, -1):
        x = transition(x, level, generators)
        assert_marginal(x, transition.sigma(level - 1), level - 1)


def test_mean_is_exact_on_a_coarse_schedule():
    transition = FlowTransition(flow_scheduler(), exact_velocity, 6, eta=1.0)
    generators = row_generators(range(1024))
    x = transition.prior(SHAPE)(1024, generators)
    for level in range(6, 0, -1):
        x = transition(x, level, generators)
        mean, variance = marginal(transition.sigma(level - 1))
        error = (x.transpose(0, 1).reshape(4, -1).mean(dim=1) - mean.flatten()).abs()
        assert (error <= 5 * (variance.flatten() / (1024 * 16)).sqrt()).all(), (level, error)


def test_x0_prediction_is_x_minus_sigma_times_velocity():
    transition = FlowTransition(flow_scheduler(), exact_velocity, 8)
    x = torch.randn(3, *SHAPE)
    for level in range(1, 9):
        _, x0 = transition(x, level, row_generators([0, 1, 2]), return_x0=True)
        torch.testing.assert_close(x0, exact_x0(x, transition.sigma(level)), rtol=1e-4, atol=1e-4)


def test_small_eta_approaches_the_scheduler_own_euler_step():
    reference = flow_scheduler()
    reference.set_timesteps(8)
    transition = FlowTransition(flow_scheduler(), exact_velocity, 8, eta=1e-6)
    for level in range(8, 0, -1):
        t = reference.timesteps[8 - level]
        x = torch.randn(2, *SHAPE)
        velocity = exact_velocity(x, t)
        expected = reference.step(velocity, t, x).prev_sample
        stepped = transition.step(x, velocity, level, torch.zeros_like(x))[0]  # its noise has std O(sqrt(eta))
        torch.testing.assert_close(stepped, expected, rtol=1e-4, atol=1e-4)


def test_renoise_follows_the_forward_process():
    transition = FlowTransition(flow_scheduler(), exact_velocity, 10)
    rows = 512
    data = MEAN + STD * torch.randn(rows, *SHAPE, generator=torch.Generator().manual_seed(0))
    for to_level in (3, 7, 9):
        x = transition.renoise(data, 0, to_level, row_generators(range(rows)))
        assert_marginal(x, transition.sigma(to_level), to_level)
        higher = transition.renoise(x, to_level, 10, row_generators(range(rows, 2 * rows)))
        assert_marginal(higher, transition.sigma(10), 10)
    with pytest.raises(ValueError, match="renoise goes up the chain"):
        transition.renoise(data, 5, 5, row_generators(range(rows)))


def test_rows_draw_noise_only_from_their_own_generator():
    transition = FlowTransition(flow_scheduler(), exact_velocity, 8)
    x = torch.randn(4, *SHAPE)
    together = transition(x, 5, row_generators([10, 11, 12, 13]))
    alone = transition(x[2:3], 5, row_generators([12]))
    torch.testing.assert_close(together[2:3], alone)
    assert not torch.equal(together[0], together[1])


@pytest.mark.parametrize("eta", [0.0, -0.5, 1.5, float("nan")])
def test_eta_outside_zero_one_raises(eta):
    with pytest.raises(ValueError, match=r"eta must lie in \(0, 1\]"):
        FlowTransition(flow_scheduler(), exact_velocity, 8, eta=eta)


def test_schedulers_it_cannot_step_raise():
    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        FlowTransition(DDIMScheduler(), exact_velocity, 8)
    with pytest.raises(ValueError, match="invert_sigmas=True is not supported"):
        FlowTransition(flow_scheduler(invert_sigmas=True), exact_velocity, 8)
