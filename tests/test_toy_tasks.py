"""The rare-mode toy tasks: exact chains (the base model's mode mass is the mixture weight) and π*'s mode mass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dts_diffusers.engine import default_branch_levels
from dts_diffusers.noise import row_generators
from dts_diffusers.toy import bimodal_1d, long_chain, rare_mode_8d


def run_chain(task, rows: int, seed: int = 0) -> torch.Tensor:
    generators = row_generators(range(seed * rows, (seed + 1) * rows))
    x = task.chain.prior(rows, generators)
    for level in range(task.num_steps, 0, -1):
        x = task.chain.transition(x, level, generators)
    return x


def rare_weight(task) -> float:
    return float(task.chain.log_weights.exp().min())


def closed_form_mass(task) -> float:
    """π*'s mass on the rare component by Gauss–Hermite quadrature of E[exp(λ r)] per component (no sampling)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)  # ∫ f(z) φ(z) dz ≈ Σ w f(z) / √(2π)
    weights = weights / math.sqrt(2 * math.pi)
    chain = task.chain
    masses = []
    for mean, std, log_w in zip(chain.means, chain.stds, chain.log_weights, strict=True):
        if chain.dim == 8:  # the reward reads only the projection on the diagonal, N(μ·e, s²)
            proj = float(mean.sum()) / math.sqrt(8) + float(std) * nodes
            x = torch.tensor(proj[:, None] / math.sqrt(8), dtype=torch.float32).expand(-1, 8)
            expect = (weights * np.exp(task.lam * task.reward(x).double().numpy())).sum()
        else:  # 2D: a product grid
            gx, gy = np.meshgrid(nodes, nodes, indexing="ij")
            pts = mean.numpy()[None] + float(std) * np.stack([gx.ravel(), gy.ravel()], -1)
            r = task.reward(torch.tensor(pts, dtype=torch.float32)).double().numpy()
            expect = (np.outer(weights, weights).ravel() * np.exp(task.lam * r)).sum()
        masses.append(math.exp(float(log_w)) * expect)
    masses = np.array(masses) / sum(masses)
    return float(masses[int(chain.log_weights.argmin())])


@pytest.mark.parametrize("make, rows", [(rare_mode_8d, 6000), (long_chain, 2000)])
def test_exact_chain_gives_the_mixture_weight_of_the_rare_mode(make, rows):
    task = make()
    x = run_chain(task, rows)
    assert x.shape == (rows, task.chain.dim)
    weight = rare_weight(task)
    freq = task.high_mode_mass(x)
    se = math.sqrt(weight * (1 - weight) / rows)
    assert abs(freq - weight) < 4 * se, (freq, weight, se)
    # the common mode(s) come out with the data's spread: per-coordinate std 0.5
    common = x[~task.high_mode(x)].to(torch.float64)
    centred = common - task.chain.means[task.chain._log_resp(common, 0).argmax(-1)]
    assert centred.std(0).sub(0.5).abs().max() < 0.05


@pytest.mark.parametrize("make", [rare_mode_8d, long_chain])
def test_target_mass_on_the_rare_mode_is_substantial_and_matches_quadrature(make):
    task = make()
    mass = task.high_mode_mass(task.target_samples(20_000, seed=0, pool=300_000))
    assert 0.3 < mass < 0.7
    assert abs(mass - closed_form_mass(task)) < 0.05
    data = task.chain.sample_data(200_000, torch.Generator().manual_seed(1))
    assert abs(task.high_mode_mass(data) - rare_weight(task)) < 0.002


def test_task_shapes_and_branch_levels():
    rare = rare_mode_8d()
    assert (rare.name, rare.num_steps, rare.chain.dim) == ("rare-mode-8d", 20, 8)
    assert rare.branch_levels == default_branch_levels(20)
    assert abs(rare_weight(rare) - 0.005) < 1e-12
    chain = long_chain()
    assert (chain.name, chain.num_steps, chain.chain.dim) == ("long-chain-100", 100, 2)
    assert chain.branch_levels == list(range(100, 0, -10))
    for task in (rare, chain):
        r = task.reward(task.chain.sample_data(1000, torch.Generator().manual_seed(0)))
        assert r.shape == (1000,) and r.dtype == torch.float32 and r.abs().max() <= 1
        x = task.chain.prior(3, row_generators([0, 1, 2]))
        out, x0 = task.chain.transition(x, task.num_steps, row_generators([0, 1, 2]), return_x0=True)
        assert out.shape == x0.shape == x.shape


def test_bimodal_high_mode_is_the_positive_half():
    task = bimodal_1d()
    x = torch.tensor([[-1.0], [0.5], [2.0], [-0.1]])
    assert task.high_mode(x).tolist() == [False, True, True, False]
    assert task.high_mode_mass(x) == 0.5
    assert task.branch_levels == default_branch_levels(20) and task.lam == 1.5
