"""`sample_dts` with real denoisers: the exact Gaussian denoiser (where the chain's law is known in closed form) and a
tiny random-weight UNet wrapped to the k-diffusion contract `model(x, sigma) -> denoised`."""

import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

from dts_diffusers import k_sampling
from dts_diffusers.engine import WIDENINGS
from dts_diffusers.k_sampling import SigmaChain, find_model_sampling, is_flow_sampling, method_label, sample_dts
from dts_diffusers.methods import METHODS, build_sampler
from dts_diffusers.noise import row_generators
from dts_diffusers.tree import PAPER_WIDENING, Widening

DATA_STD = 0.5


def karras_sigmas(n: int, sigma_min: float = 0.02, sigma_max: float = 20.0, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1)])


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x0 + σε = x] for x0 ~ N(0, s²I)."""
    sigma = sigma.view(-1, *[1] * (x.ndim - 1))
    return x * DATA_STD**2 / (DATA_STD**2 + sigma**2)


def gaussian_flow_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | (1 - σ)x0 + σε = x] for x0 ~ N(0, s²I)."""
    sigma = sigma.view(-1, *[1] * (x.ndim - 1))
    return x * (1 - sigma) * DATA_STD**2 / ((1 - sigma) ** 2 * DATA_STD**2 + sigma**2)


def ancestral_chain_law(sigmas: torch.Tensor, latent: float, flow: bool = False) -> tuple[float, float]:
    """Mean and variance of x_0 after the η=1 ancestral chain on the Gaussian started at the noised `latent`, written
    out from the update rules."""
    s2 = DATA_STD**2
    sigma0 = float(sigmas[0])
    mean, var = (1 - sigma0) * latent if flow else latent, sigma0**2
    for a, b in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        k = (1 - a) * s2 / ((1 - a) ** 2 * s2 + a**2) if flow else s2 / (s2 + a**2)  # denoised = k·x
        if b == 0:
            coef, up = k, 0.0
        elif flow:
            down = b * b / a
            scale = (1 - b) / (1 - down)
            coef = scale * (down / a + (1 - down / a) * k)
            up = math.sqrt(b * b - down * down * (1 - b) ** 2 / (1 - down) ** 2)
        else:
            up = math.sqrt(b * b * (a * a - b * b) / (a * a))
            down = math.sqrt(b * b - up * up)
            coef = 1 + (down - a) / a * (1 - k)
        mean, var = coef * mean, coef * coef * var + up * up
    return mean, var


def linear_reward(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def test_lam_zero_samples_the_chain_and_reward_tilts_as_predicted():
    """λ=0 gives the base chain's law N(0, v); r(x)=x tilts it to N(λv, v)."""
    sigmas = karras_sigmas(10)
    _, var = ancestral_chain_law(sigmas, 0.0)
    x = torch.zeros(1, 1)
    base = sample_dts(
        gaussian_denoiser, x, sigmas, reward=linear_reward, nfe_budget=10 * 600, lam=0.0, num_outputs=1000,
        disable=True, seed=0,
    )  # fmt: skip
    tilted = sample_dts(
        gaussian_denoiser, x, sigmas, reward=linear_reward, nfe_budget=10 * 600, lam=2.0, num_outputs=1000,
        disable=True, seed=0,
    )  # fmt: skip
    assert base.shape == (1000, 1)
    assert abs(base.mean().item()) < 0.25 * math.sqrt(var)
    assert base.std().item() == pytest.approx(math.sqrt(var), rel=0.15)
    assert tilted.mean().item() == pytest.approx(2.0 * var, rel=0.3)
    assert tilted.std().item() == pytest.approx(math.sqrt(var), rel=0.25)


def test_flow_models_use_the_rectified_flow_step_detected_from_comfy_model_sampling():
    class CONST:  # ComfyUI's rectified-flow model sampling, recognised by class name
        pass

    class Guider:
        inner_model = type("BaseModel", (), {"model_sampling": CONST()})()

    class ComfyLikeModel:  # ComfyUI's KSamplerX0Inpaint → CFGGuider → BaseModel.model_sampling
        inner_model = Guider()

        def __call__(self, x, sigma):
            return gaussian_flow_denoiser(x, sigma)

    model = ComfyLikeModel()
    assert is_flow_sampling(find_model_sampling(model))
    sigmas = torch.linspace(1.0, 0.0, 11)
    _, var = ancestral_chain_law(sigmas, 0.0, flow=True)
    out = sample_dts(
        model, torch.zeros(1, 1), sigmas, reward=linear_reward, nfe_budget=10 * 400, lam=0.0, num_outputs=800,
        disable=True, seed=1,
    )  # fmt: skip
    assert out.std().item() == pytest.approx(math.sqrt(var), rel=0.15)
    assert abs(out.mean().item()) < 0.25 * math.sqrt(var)
    # img2img: the flow prior is (1 - σ_0)·latent + σ_0·ε, far from the σ-space law on the same schedule
    sigmas = torch.linspace(0.6, 0.0, 7)
    model.latent_image = torch.full((1, 1), 3.0)
    mean, var = ancestral_chain_law(sigmas, 3.0, flow=True)
    eps_mean, _ = ancestral_chain_law(sigmas, 3.0, flow=False)
    assert abs(eps_mean - mean) > 0.5
    out = sample_dts(
        model, torch.zeros(1, 1), sigmas, reward=linear_reward, nfe_budget=6 * 400, lam=0.0, num_outputs=800,
        disable=True, seed=1,
    )  # fmt: skip
    assert out.mean().item() == pytest.approx(mean, abs=0.25 * math.sqrt(var))
    assert out.std().item() == pytest.approx(math.sqrt(var), rel=0.2)


def test_img2img_root_renoises_the_clean_latent_not_the_given_x():
    """With denoise < 1 (σ_0 < σ_max) every root child starts at latent + σ_0·ε with its own ε."""
    sigmas = karras_sigmas(20)[10:]
    clean = torch.full((1, 1), 3.0)
    mean, var = ancestral_chain_law(sigmas, 3.0)
    x = clean + sigmas[0] * torch.randn(1, 1)  # what ComfyUI hands the sampler

    class ComfyLikeModel:  # ComfyUI's KSAMPLER sets `latent_image` on the model it passes
        latent_image = clean

        def __call__(self, x, sigma):
            return gaussian_denoiser(x, sigma)

    out = sample_dts(
        ComfyLikeModel(), x, sigmas, reward=linear_reward, nfe_budget=10 * 400, lam=0.0, num_outputs=800,
        disable=True,
    )  # fmt: skip
    assert out.mean().item() == pytest.approx(mean, abs=0.2 * math.sqrt(var))
    assert out.std().item() == pytest.approx(math.sqrt(var), rel=0.2)


def test_bad_settings_raise_clear_errors():
    sigmas = karras_sigmas(4)
    x = torch.zeros(1, 1)
    run = dict(reward=linear_reward, nfe_budget=40, disable=True)
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        sample_dts(gaussian_denoiser, x, sigmas, lam=-1.0, **run)
    with pytest.raises(ValueError, match="eta must be > 0"):
        sample_dts(gaussian_denoiser, x, sigmas, eta=0.0, **run)
    with pytest.raises(ValueError, match="below one rollout"):
        sample_dts(gaussian_denoiser, x, sigmas, reward=linear_reward, nfe_budget=3, disable=True)
    with pytest.raises(ValueError, match="one latent at a time"):
        sample_dts(gaussian_denoiser, x, sigmas, latent_image=torch.tensor([[0.0], [1.0]]), **run)


def test_callback_and_interrupt():
    sigmas = karras_sigmas(5)
    events = []
    out = sample_dts(
        gaussian_denoiser, torch.zeros(2, 3), sigmas, callback=events.append, reward=linear_reward, nfe_budget=5 * 24,
        rollout_batch_size=4, disable=True,
    )  # fmt: skip
    assert out.shape == (2, 3)
    nfes = [e["nfe"] for e in events]  # one event per batch: at most 4 rollouts of 5 steps
    assert all(0 <= after - before <= 4 * 5 for before, after in zip([0, *nfes[:-1]], nfes, strict=True))
    assert {"x", "i", "sigma", "sigma_hat", "denoised"} <= set(events[0])
    assert [e["i"] for e in events] == sorted(e["i"] for e in events) and events[-1]["i"] == 4
    assert 5 * 24 - 5 < events[-1]["nfe"] <= 5 * 24  # to within one rollout: the frontier's rollouts differ in cost

    calls = []
    info = {}
    sample_dts(
        gaussian_denoiser, torch.zeros(1, 3), sigmas, reward=linear_reward, nfe_budget=5 * 24, rollout_batch_size=4,
        disable=True, interrupt=lambda: calls.append(1) or len(calls) == 2, info=info,
    )  # fmt: skip
    assert 0 < info["stats"]["nfe"] <= 2 * 4 * 5  # stopped after the second batch


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_under_the_budget_with_progress_and_best_first_in_search(method):
    sigmas = karras_sigmas(5)
    budget = 5 * 12
    events, info = [], {}
    out = sample_dts(
        gaussian_denoiser, torch.zeros(1, 3), sigmas, callback=events.append, reward=linear_reward, nfe_budget=budget,
        method=method, lam=2.0, num_outputs=3, rollout_batch_size=4, disable=True, info=info,
    )  # fmt: skip
    assert out.shape == (3, 3) and torch.isfinite(out).all()
    assert info["method"] == method and 0 < info["stats"]["nfe"] <= budget
    assert events and events[-1]["nfe"] == info["stats"]["nfe"]
    assert torch.allclose(linear_reward(out), info["rewards"])

    info = {}
    out = sample_dts(
        gaussian_denoiser, torch.zeros(1, 3), sigmas, reward=linear_reward, nfe_budget=budget, method=method,
        mode="search", lam=2.0, num_outputs=3, rollout_batch_size=4, disable=True, info=info,
    )  # fmt: skip
    assert info["method"] in ("dts*", "dts*-paper", f"{method} search")
    rewards = linear_reward(out)
    assert rewards[0].item() == pytest.approx(info["best_reward"], abs=1e-5)
    assert torch.equal(rewards, rewards.sort(descending=True).values)


def test_mode_and_method_name_the_choices():
    run = dict(reward=linear_reward, nfe_budget=40, disable=True)
    with pytest.raises(ValueError, match=r"mode must be 'sample' .* or 'search'"):
        sample_dts(gaussian_denoiser, torch.zeros(1, 1), karras_sigmas(4), mode="best", **run)
    with pytest.raises(ValueError, match=r"choose one of dts, dts\*, dts-paper, dts\*-paper, best-of-n"):
        sample_dts(gaussian_denoiser, torch.zeros(1, 1), karras_sigmas(4), method="mcts", **run)


def test_method_label_names_the_tree_presets_by_mode():
    assert [method_label(m, "sample") for m in ("dts", "dts*", "dts-paper", "dts*-paper", "smc")] == [
        "dts", "dts*", "dts-paper", "dts*-paper", "smc",
    ]  # fmt: skip
    assert [method_label(m, "search") for m in ("dts", "dts*", "dts-paper", "dts*-paper", "smc")] == [
        "dts*", "dts*", "dts*-paper", "dts*-paper", "smc search",
    ]  # fmt: skip


def test_widening_default_keeps_the_method_own_and_a_choice_overrides_it(monkeypatch):
    built = []

    def spy(*args, **options):
        built.append(build_sampler(*args, **options))
        return built[-1]

    monkeypatch.setattr(k_sampling, "build_sampler", spy)
    run = dict(reward=linear_reward, nfe_budget=40, rollout_batch_size=4, disable=True)
    custom = Widening.uniform(1.0, 0.5)
    cases = [
        ("dts", "default", WIDENINGS["default"]),
        ("dts-paper", "default", PAPER_WIDENING),
        ("dts*-paper", "default", PAPER_WIDENING),
        ("dts", "paper", PAPER_WIDENING),
        ("dts-paper", custom, custom),
    ]
    for method, widening, expected in cases:
        sample_dts(gaussian_denoiser, torch.zeros(1, 1), karras_sigmas(4), method=method, widening=widening, **run)
        assert built[-1].widening == expected, (method, widening)
    with pytest.raises(ValueError, match="widening must be a Widening or one of default, paper"):
        sample_dts(gaussian_denoiser, torch.zeros(1, 1), karras_sigmas(4), widening="wide", **run)


def sigma_chain(sigmas: torch.Tensor, flow: bool) -> SigmaChain:
    latent = torch.zeros(1, 4)
    return SigmaChain(gaussian_denoiser, sigmas, latent, {}, flow, 1.0, lambda sigma, noise, lat: lat + sigma * noise)


def assert_normal(x: torch.Tensor, mean: torch.Tensor | float, std: float) -> None:
    """Sample mean and std within 4 standard errors of N(mean, std²)."""
    n = x.numel()
    assert abs((x - mean).mean().item()) < 4 * std / math.sqrt(n)
    assert abs((x - mean).std().item() - std) < 4 * std / math.sqrt(2 * n)


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_renoise_draws_the_forward_process(flow):
    """From a fixed x_lo the draw is N(a·x_lo, σ_hi² - a²σ_lo²) (a = 1, or (1-σ_hi)/(1-σ_lo) for flow); renoising
    clean data x0 ~ N(0, s²) in one or two hops gives the forward marginal at the level reached."""
    sigmas = torch.linspace(0.9, 0.0, 7) if flow else torch.linspace(3.0, 0.0, 7)  # comparable σ_lo and σ_hi
    chain = sigma_chain(sigmas, flow)
    num_steps, n = 6, 4000
    sigma = {level: float(sigmas[num_steps - level]) for level in range(num_steps + 1)}
    x_lo = torch.linspace(-2, 2, 4).expand(n, 4)

    x_hi = chain.renoise(x_lo, 2, 5, row_generators(range(n)))
    scale = (1 - sigma[5]) / (1 - sigma[2]) if flow else 1.0
    assert_normal(x_hi, scale * x_lo, math.sqrt(sigma[5] ** 2 - scale**2 * sigma[2] ** 2))

    x0 = DATA_STD * torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    for hops in ([0, 4], [0, 1, 4]):
        x = x0
        for k, (lo, hi) in enumerate(itertools.pairwise(hops)):
            x = chain.renoise(x, lo, hi, row_generators(range(10**6 * (k + 1), 10**6 * (k + 1) + n)))
        signal = 1 - sigma[4] if flow else 1.0
        assert_normal(x, 0.0, math.sqrt(signal**2 * DATA_STD**2 + sigma[4] ** 2))


def test_renoise_rows_use_only_their_generators_and_levels_go_up():
    chain = sigma_chain(karras_sigmas(6), flow=False)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    batch = chain.renoise(x, 1, 3, row_generators([10, 11, 12, 13, 14]))
    alone = chain.renoise(x[2:3], 1, 3, row_generators([12]))
    assert torch.equal(batch[2:3], alone)
    with pytest.raises(ValueError, match="renoise goes up the chain"):
        chain.renoise(x, 3, 3, row_generators(range(5)))
    with pytest.raises(ValueError, match="renoise goes up the chain"):
        chain.renoise(x, 1, 7, row_generators(range(5)))


class UNetDenoiser:
    """A diffusers eps-prediction UNet under the sigma contract: c_in = 1/sqrt(σ²+1), denoised = x - σ·eps."""

    def __init__(self, unet: UNet2DConditionModel, scheduler: EulerDiscreteScheduler, cond: torch.Tensor):
        self.unet, self.cond = unet, cond
        self.log_sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().log()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional training timestep of each sigma, by interpolation in log sigma (k-diffusion `sigma_to_t`)."""
        t = np.interp(sigma.log().numpy(), self.log_sigmas.numpy(), np.arange(len(self.log_sigmas)))
        return torch.from_numpy(t).float()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_in = 1 / (sigma**2 + 1).sqrt()
        eps = self.unet(x * c_in.view(-1, 1, 1, 1), self.timestep(sigma), self.cond.expand(x.shape[0], -1, -1)).sample
        return x - sigma.view(-1, 1, 1, 1) * eps


@pytest.fixture(scope="module")
def tiny_sd_parts():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    ).eval()  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    ).eval()  # fmt: skip
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return UNetDenoiser(unet, scheduler, torch.randn(1, 4, 32)), vae, scheduler


def test_tiny_unet_search_returns_its_best_decoded_sample(tiny_sd_parts):
    denoiser, vae, scheduler = tiny_sd_parts
    scheduler.set_timesteps(6)
    sigmas = scheduler.sigmas.float()

    def decode(latents):
        return (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)

    def brightness(images):
        assert images.shape[1:] == (3, 16, 16) and images.min() >= 0 and images.max() <= 1
        return images.mean(dim=(1, 2, 3))

    x = torch.randn(1, 4, 8, 8) * sigmas[0]
    info = {}
    found = sample_dts(
        denoiser, x, sigmas, reward=brightness, decode=decode, nfe_budget=6 * 12, mode="search", lam=10.0,
        num_outputs=3, rollout_batch_size=4, seed=3, disable=True, info=info,
    )  # fmt: skip
    assert found.shape == (3, 4, 8, 8) and torch.isfinite(found).all()
    assert info["rewards"][0].item() == pytest.approx(info["best_reward"]) == info["rewards"].max().item()
    assert torch.allclose(brightness(decode(found)), info["rewards"], atol=1e-5)
    again = sample_dts(
        denoiser, x, sigmas, reward=brightness, decode=decode, nfe_budget=6 * 12, mode="search", lam=10.0,
        num_outputs=3, rollout_batch_size=4, seed=3, disable=True,
    )  # fmt: skip
    assert torch.equal(again, found)


@pytest.mark.parametrize("method", ["dts", "dts*", "smc"])
def test_a_kept_tree_continues_as_one_longer_run_and_is_not_changed(method):
    """Anytime sampling: budgets accumulate, so 24 NFE then 24 more grow the tree one run of 48 grows (a particle
    method adds populations sized by its first budget); the kept tree holds no model between runs and stays as it
    was (ComfyUI caches it as a node output)."""
    sigmas = karras_sigmas(4)
    x = torch.zeros(1, 2)
    common = dict(
        reward=linear_reward, lam=1.0, method=method, num_outputs=2, disable=True, seed=3, rollout_batch_size=2
    )
    once, first, second = {}, {}, {}
    sample_dts(gaussian_denoiser, x, sigmas, nfe_budget=48, info=once, **common)
    sample_dts(gaussian_denoiser, x, sigmas, nfe_budget=24, info=first, **common)
    tree = first["tree"]
    assert tree.chain.model is None and tree.scorer.reward is None
    sample_dts(gaussian_denoiser, x, sigmas, nfe_budget=24, info=second, tree=tree, **common)
    assert tree.sampler.nfe == first["stats"]["nfe"] <= 24
    assert second["nfe_budget"] == tree.sampler.nfe + 24
    assert second["stats"]["nfe"] == once["stats"]["nfe"] and second["best_reward"] >= first["best_reward"]
    if method != "smc":
        assert second["best_reward"] == once["best_reward"] and second["stats"]["leaves"] == once["stats"]["leaves"]
    assert second["tree"] is not tree and second["tree"].chain.model is None


def test_a_tree_continues_only_the_run_it_was_grown_for():
    sigmas = karras_sigmas(4)
    x = torch.zeros(1, 2)
    info = {}
    sample_dts(gaussian_denoiser, x, sigmas, reward=linear_reward, nfe_budget=8, disable=True, info=info)
    tree = info["tree"]
    cases = [
        (dict(x=x, sigmas=karras_sigmas(5)), r"steps=5 \(the tree has 4\)"),
        (dict(x=x, sigmas=sigmas * 0.5), "sigmas="),
        (dict(x=torch.zeros(1, 3), sigmas=sigmas), r"latent shape=\[3\] \(the tree has \[2\]\)"),
        (dict(x=x, sigmas=sigmas, lam=2.0), r"lam=2.0 \(the tree has 1.0\)"),
        (dict(x=x, sigmas=sigmas, mode="search"), "mode=search"),
        (dict(x=x, sigmas=sigmas, method="smc"), "method=smc"),
        (dict(x=x, sigmas=sigmas, latent_image=torch.ones(1, 2)), "a different latent image"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=f"cannot continue the given tree: .*{message}.*start a new tree"):
            sample_dts(gaussian_denoiser, reward=linear_reward, nfe_budget=8, disable=True, tree=tree, **kwargs)
    assert tree.sampler.nfe == info["stats"]["nfe"]


@pytest.mark.parametrize("method", ["best-of-n", "smc", "dts"])
def test_the_reward_sees_at_most_a_rollout_batch(method):
    """Particle methods score their whole population at once; the sampler decodes and scores it in rollout batches,
    so a large budget never sits decoded in memory (ComfyUI's VAE decode) at once."""
    seen = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return linear_reward(x)

    sample_dts(
        gaussian_denoiser, torch.zeros(1, 2), karras_sigmas(4), reward=recording, nfe_budget=4 * 24, method=method,
        rollout_batch_size=3, disable=True,
    )  # fmt: skip
    assert max(seen) <= 3 and sum(seen) >= 24
