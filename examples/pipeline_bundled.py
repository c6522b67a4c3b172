"""DTS in a diffusers pipeline, on the tiny digits model that ships with the package (offline, CPU, ~10 s).

The reward is the bundled classifier's log-probability of the digit 3; λ = 0 samples the base model. For Stable
Diffusion 1.x / 2.x, pass a hub id or folder instead (e.g. "stable-diffusion-v1-5/stable-diffusion-v1-5",
dtype=torch.float16, then .to("cuda")) and a reward such as "image-reward".

    python examples/pipeline_bundled.py
"""

import torch

from dts_diffusers import DTSPipeline, load_reward
from dts_diffusers.digits import bundled_model_path, digit_prompt

pipe = DTSPipeline.from_pretrained(bundled_model_path())
reward = load_reward("digit-classifier", digit=3)
for lam in (0.0, 1.0):
    out = pipe(
        digit_prompt(3),
        reward=reward,
        lam=lam,
        nfe_budget=640,
        num_inference_steps=20,
        guidance_scale=1.0,
        num_images_per_prompt=8,
        generator=torch.Generator().manual_seed(0),
    )
    print(f"λ = {lam}: mean log p(3 | image) {out.rewards.mean():.2f} after {out.nfe} NFE")
out.images[0].save("digit-3.png")
