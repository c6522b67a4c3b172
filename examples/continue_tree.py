"""DTS is anytime: pass the trees back with `tree=` and the next call grows the same trees instead of starting over.

Search mode (DTS*) returns the best distinct images found so far, so more budget can only improve them.

    python examples/continue_tree.py
"""

import torch

from dts_diffusers import DTSPipeline, load_reward
from dts_diffusers.digits import bundled_model_path, digit_prompt

pipe = DTSPipeline.from_pretrained(bundled_model_path())
reward = load_reward("digit-classifier", digit=8, output="logit")  # log p saturates at 0; the logit keeps rising
options = dict(reward=reward, mode="search", num_inference_steps=20, guidance_scale=1.0, num_images_per_prompt=4)
out = pipe(digit_prompt(8), nfe_budget=320, generator=torch.Generator().manual_seed(0), **options)
for _ in range(3):
    print(f"{out.trees[0].nfe:5d} NFE: best reward {out.rewards.max():.3f}, {out.trees[0].stats()['leaves']} leaves")
    out = pipe(digit_prompt(8), nfe_budget=320, tree=out.trees, **options)
print(f"{out.trees[0].nfe:5d} NFE: best reward {out.rewards.max():.3f}, {out.trees[0].stats()['leaves']} leaves")
