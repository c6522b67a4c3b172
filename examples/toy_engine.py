"""The engine on an exact toy chain: DTS against best-of-N at equal NFE, scored against exact samples of π*.

The 1D chain has a common low-reward mode and a rare high-reward one; π* ∝ p·exp(λ·r) moves most of the mass to the
rare mode, and an exact large-sample estimate of that mass is available. Runs in a few seconds on a CPU.

    python examples/toy_engine.py
"""

from dts_diffusers import build_sampler
from dts_diffusers.toy import bimodal_1d

task = bimodal_1d()
chain = task.chain
target = task.high_mode_mass(task.target_samples(20_000, seed=0))
print(f"rare-mode mass: base model {chain.log_weights.exp().min():.3f}, target π* {target:.3f}")

for method in ("dts", "best-of-n"):
    sampler = build_sampler(
        method, chain.prior, chain.transition, task.reward, task.num_steps, lam=task.lam,
        branch_levels=task.branch_levels, seed=0,
    )  # fmt: skip
    sampler.run(20_000)  # NFE: one denoising step of one sample
    samples = sampler.sample(2_000)
    print(f"{method:10s} {sampler.nfe:6d} NFE: rare-mode mass {task.high_mode_mass(samples):.3f}")

dts = build_sampler("dts", chain.prior, chain.transition, task.reward, task.num_steps, lam=task.lam, seed=0)
dts.run(5_000)
stats = dts.stats()
print(f"a DTS tree after 5000 NFE: {stats['leaves']} leaves, {stats['nfe_per_leaf']:.1f} NFE per leaf")
