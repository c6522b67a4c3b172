"""Any callable is a reward: (images [B, 3, H, W] in [0, 1], prompts) -> Tensor[B]. Here: steer toward dark images.

python examples/custom_reward.py
"""

import torch

from dts_diffusers import DTSPipeline
from dts_diffusers.digits import bundled_model_path


def ink(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """More ink (darker pixels) scores higher; the bundled digits are dark ink on white."""
    return 10.0 * (1.0 - images.mean(dim=(1, 2, 3)))


pipe = DTSPipeline.from_pretrained(bundled_model_path())
options = dict(num_inference_steps=20, guidance_scale=2.0, num_images_per_prompt=8, nfe_budget=640)
for lam in (0.0, 2.0):
    out = pipe("a handwritten digit", reward=ink, lam=lam, generator=torch.Generator().manual_seed(0), **options)
    print(f"λ = {lam}: mean ink reward {out.rewards.mean():.3f}")
