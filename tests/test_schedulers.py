"""The transition adapter reproduces diffusers' own `scheduler.step`, level by level, in any order."""

import random

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from dts_diffusers.noise import row_generators
from dts_diffusers.schedulers import SchedulerTransition

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
SHAPE = (2, 4, 6, 6)
NUM_STEPS = 12


def fake_model(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet that depends on both its input and the timestep."""
    return 0.7 * torch.tanh(model_input) + 0.001 * float(timestep)


def shuffled_levels(seed: int = 0) -> list[int]:
    levels = list(range(1, NUM_STEPS + 1))
    random.Random(seed).shuffle(levels)
    return levels


SD_SPACING = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", [SD_SPACING, {"timestep_spacing": "trailing"}])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_matches_scheduler_step(prediction_type, spacing, eta):
    config = {**SD_SCHEDULE, **spacing, "prediction_type": prediction_type, "clip_sample": False}
    reference = DDIMScheduler(**config)
    reference.set_timesteps(NUM_STEPS)
    transition = SchedulerTransition(DDIMScheduler(**config), fake_model, NUM_STEPS, eta=eta)
    for level in shuffled_levels():
        t = reference.timesteps[NUM_STEPS - level]
        x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
        out = fake_model(x, t)
        expected = reference.step(out, t, x, eta=eta, variance_noise=noise)
        x_prev, x0 = transition.step(x, out, level, noise)
        torch.testing.assert_close(x_prev, expected.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0, expected.pred_original_sample, rtol=1e-5, atol=1e-5)


def test_ddim_clip_sample_matches():
    config = {**SD_SCHEDULE, "clip_sample": True, "clip_sample_range": 0.5}
    reference = DDIMScheduler(**config)
    reference.set_timesteps(NUM_STEPS)
    transition = SchedulerTransition(DDIMScheduler(**config), fake_model, NUM_STEPS)
    for level in shuffled_levels(1):
        t = reference.timesteps[NUM_STEPS - level]
        x, noise = 3 * torch.randn(SHAPE), torch.randn(SHAPE)
        out = fake_model(x, t)
        expected = reference.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(transition.step(x, out, level, noise)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_matches_scheduler_step(variance_type, prediction_type):
    config = {**SD_SCHEDULE, "variance_type": variance_type, "prediction_type": prediction_type, "clip_sample": False}
    reference = DDPMScheduler(**config)
    reference.set_timesteps(NUM_STEPS)
    transition = SchedulerTransition(DDPMScheduler(**config), fake_model, NUM_STEPS)
    for level in shuffled_levels(2):
        t = reference.timesteps[NUM_STEPS - level]
        x = torch.randn(1, *SHAPE[1:])
        expected = reference.step(fake_model(x, t), t, x, generator=torch.Generator().manual_seed(level)).prev_sample
        got = transition(x, level, row_generators([level]))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler_ancestral_matches_scheduler_step(prediction_type, spacing):
    """Includes the input scaling: the denoiser sees what `scale_model_input` would have given it."""
    config = {**SD_SCHEDULE, "prediction_type": prediction_type, "timestep_spacing": spacing, "steps_offset": 1}
    reference = EulerAncestralDiscreteScheduler(**config)
    transition = SchedulerTransition(EulerAncestralDiscreteScheduler(**config), fake_model, NUM_STEPS)
    for level in shuffled_levels(3):
        reference.set_timesteps(NUM_STEPS)
        reference.set_begin_index(NUM_STEPS - level)
        t = reference.timesteps[NUM_STEPS - level]
        x = 5 * torch.randn(1, *SHAPE[1:])
        out = fake_model(reference.scale_model_input(x, t), t)
        expected = reference.step(out, t, x, generator=torch.Generator().manual_seed(level))
        got, x0 = transition(x, level, row_generators([level]), return_x0=True)
        torch.testing.assert_close(got, expected.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0, expected.pred_original_sample, rtol=1e-5, atol=1e-5)
    assert transition.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma))


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_sde_first_order_matches_scheduler_step(karras):
    config = {**SD_SCHEDULE, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": karras}
    reference = DPMSolverMultistepScheduler(**config, solver_order=1)
    transition = SchedulerTransition(DPMSolverMultistepScheduler(**config), fake_model, NUM_STEPS)
    for level in shuffled_levels(4):
        reference.set_timesteps(NUM_STEPS)
        reference.set_begin_index(NUM_STEPS - level)
        t = reference.timesteps[NUM_STEPS - level]
        x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
        out = fake_model(x, t)
        expected = reference.step(out, t, x, variance_noise=noise).prev_sample
        torch.testing.assert_close(transition.step(x, out, level, noise)[0], expected, rtol=1e-4, atol=1e-5)


def test_rows_do_not_depend_on_batch_and_children_differ():
    transition = SchedulerTransition(DDIMScheduler(**SD_SCHEDULE), fake_model, NUM_STEPS)
    x = torch.randn(1, *SHAPE[1:]).repeat(3, 1, 1, 1)
    batched = transition(x, 7, row_generators([1, 2, 3]))
    alone = transition(x[1:2], 7, row_generators([2]))
    torch.testing.assert_close(batched[1:2], alone)
    assert not torch.allclose(batched[0], batched[1])  # same parent, different seeds: different children


def test_prior_scales_by_init_noise_sigma_per_row():
    transition = SchedulerTransition(EulerAncestralDiscreteScheduler(**SD_SCHEDULE), fake_model, NUM_STEPS)
    prior = transition.prior((4, 3, 3), dtype=torch.bfloat16)
    x = prior(2, row_generators([5, 6]))
    assert x.dtype == torch.bfloat16 and x.shape == (2, 4, 3, 3)
    expected = transition.init_noise_sigma * torch.randn((4, 3, 3), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(x[1], expected.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("scheduler", "eta", "match"),
    [
        (DDIMScheduler(**SD_SCHEDULE), 0.0, "eta > 0"),
        (EulerDiscreteScheduler(**SD_SCHEDULE), 1.0, "EulerAncestralDiscreteScheduler"),
        (DPMSolverMultistepScheduler(**SD_SCHEDULE), 1.0, "sde-dpmsolver"),
        (PNDMScheduler(**SD_SCHEDULE), 1.0, "DDIMScheduler.from_config"),
        (DDPMScheduler(**SD_SCHEDULE), 0.5, "eta applies to DDIMScheduler only"),
    ],
)
def test_deterministic_or_unsupported_schedulers_raise(scheduler, eta, match):
    with pytest.raises(ValueError, match=match):
        SchedulerTransition(scheduler, fake_model, NUM_STEPS, eta=eta)


def test_level_out_of_range_raises():
    transition = SchedulerTransition(DDIMScheduler(**SD_SCHEDULE), fake_model, NUM_STEPS)
    with pytest.raises(ValueError, match=r"level must lie in 1\.\.12"):
        transition(torch.zeros(SHAPE), 0, row_generators([0, 1]))


STOCHASTIC = [
    (DDIMScheduler, {}),
    (DDPMScheduler, {}),
    (EulerAncestralDiscreteScheduler, {}),
    (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
]


@pytest.mark.parametrize(("scheduler", "options"), STOCHASTIC)
def test_renoise_from_x0_is_the_schedulers_add_noise(scheduler, options):
    """From level 0, renoise is `scheduler.add_noise` at the level's timestep, row i's noise from generators[i]."""
    reference = scheduler(**SD_SCHEDULE, **options)
    reference.set_timesteps(NUM_STEPS)
    transition = SchedulerTransition(scheduler(**SD_SCHEDULE, **options), fake_model, NUM_STEPS)
    x0 = torch.randn(SHAPE)
    for level in (1, 5, NUM_STEPS):
        got = transition.renoise(x0, 0, level, row_generators([3, 4]))
        noise = torch.stack([torch.randn(SHAPE[1:], generator=g) for g in row_generators([3, 4])])
        timestep = reference.timesteps[NUM_STEPS - level]
        expected = reference.add_noise(x0, noise, timestep.reshape(1))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("scheduler", "options"), STOCHASTIC)
def test_renoise_between_levels_has_the_forward_marginal(scheduler, options):
    """x_lo = add_noise(x0, ·, t_lo) renoised to level hi has add_noise(x0, ·, t_hi)'s mean and spread."""
    reference = scheduler(**SD_SCHEDULE, **options)
    reference.set_timesteps(NUM_STEPS)
    transition = SchedulerTransition(scheduler(**SD_SCHEDULE, **options), fake_model, NUM_STEPS)
    x0 = torch.linspace(-1, 1, 8).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)

    def noised(level):
        timestep = reference.timesteps[NUM_STEPS - level].reshape(1)  # broadcast over the rows
        return reference.add_noise(x0, torch.randn(x0.shape, generator=generator), timestep)

    for low, high in ((2, 6), (6, 12)):
        got = transition.renoise(noised(low), low, high, row_generators(range(len(x0))))
        expected = noised(high)
        torch.testing.assert_close(got.mean(0), expected.mean(0), atol=0.05 * expected.std(), rtol=0)
        torch.testing.assert_close(got.std(0), expected.std(0), rtol=0.03, atol=0)


def test_renoise_keeps_dtype_and_checks_levels():
    transition = SchedulerTransition(DDIMScheduler(**SD_SCHEDULE), fake_model, NUM_STEPS)
    x = torch.randn(SHAPE, dtype=torch.bfloat16)
    assert transition.renoise(x, 3, 4, row_generators([0, 1])).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="renoise goes up the chain"):
        transition.renoise(x, 4, 4, row_generators([0, 1]))
