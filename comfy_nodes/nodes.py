"""The node classes (ComfyUI's classic schema). They import without ComfyUI; the work is in `.sampling`.

Inputs that bound a value (λ ≥ 0, budget ≥ 1) or pick from a list (mode, method) are enforced by ComfyUI's prompt
validation; the rest (a budget below one rollout, eta = 0, missing reward weights) raise inside the node's function, so
ComfyUI reports a node error.

The frontend restores a node's widget values by position, and widgets a saved workflow lacks keep their defaults, so
new inputs go last: `method` (default "dts") is the last optional input. It took the slot of the earlier `baseline`
input: API workflows that still name `baseline` run DTS (ComfyUI drops inputs a node does not declare); UI workflows
saved with it hold "none" in that slot, which ComfyUI rejects as not in the list until a method is picked.
Optional sockets (`tree`, `sigmas`) hold no widget value, so they follow `method`; outputs are only ever appended.
The `widening` choice took the slot of the two floats `pw_c` and `pw_alpha`: API workflows that still name them run
with the default widening; UI workflows saved with them hold shifted values, which ComfyUI rejects until re-saved.
"""

from __future__ import annotations

from dts_diffusers.engine import WIDENINGS
from dts_diffusers.methods import METHODS
from dts_diffusers.options import TreeOptions

from . import sampling

CATEGORY = "sampling/dts"
# ComfyUI 0.8.0's scheduler names, used when ComfyUI is not importable (CI, docs).
FALLBACK_SCHEDULERS = [
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal",
]  # fmt: skip


def scheduler_names() -> list[str]:
    try:
        import comfy.samplers
    except ImportError:
        return list(FALLBACK_SCHEDULERS)
    return list(comfy.samplers.SCHEDULER_NAMES)


def reward_names() -> list[str]:
    from dts_diffusers.rewards import reward_names as names

    return names()


def search_inputs() -> dict:
    """Inputs shared by DTS Sampler and DTS Sampler (SAMPLER): the tree's target and budget."""
    return {
        "mode": (["sample", "search"], {"default": "sample", "tooltip": "sample: draw the outputs from "
                                        "p·exp(λ·r); search: return the best found (DTS* with method dts)"}),
        "lam": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10000.0, "step": 0.1, "round": False,
                          "tooltip": "λ, the reward's strength; 0 samples the model unchanged"}),
        "nfe_budget": ("INT", {"default": 160, "min": 1, "max": 1000000, "tooltip": "model evaluations in total "
                               "(one denoising step of one sample); at least the number of steps"}),
        "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "round": False, "tooltip":
                          "ancestral noise of each step; the tree branches on it, so it must be > 0"}),
    }  # fmt: skip


def advanced_inputs() -> dict:
    return {
        "branch_every": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "branch every N steps; 0 = at "
                                 "x_T and four more evenly spaced levels (the paper's schedule)"}),
        "widening": (list(WIDENINGS), {"default": "default", "tooltip": "progressive widening per level: "
                     "default keeps the method's own; paper is the paper's uniform C·n^α with C = 2, α = 0.8 (what "
                     "dts-paper / dts*-paper use)"}),
        "c_uct": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "UCT exploration "
                            "(search mode)"}),
        "rollout_batch": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "rollouts denoised together"}),
        "method": (list(METHODS), {"default": "dts", "tooltip": "dts: the tree (DTS, or DTS* in search mode); "
                                   "dts*: always the search; dts-paper / dts*-paper: the paper's Algorithm 1 / DTS* "
                                   "(uniform widening, rollout values); the rest are particle baselines (best-of-N, "
                                   "SMC, FK-steering, SVDD, DAS, BFS, ...) under the same budget"}),
    }  # fmt: skip


def tree_options(mode, lam, eta, branch_every=0, widening="default", c_uct=1.0, rollout_batch=4, method="dts") -> dict:
    """Node inputs → `sample_dts` keywords: the checked `TreeOptions` (a bad value fails here, so ComfyUI reports it on
    the node) and the step's noise level."""
    options = TreeOptions(
        lam=lam, mode=mode, method=method, branch_every=branch_every or None, widening=widening, c_uct=c_uct,
        rollout_batch_size=rollout_batch,
    )  # fmt: skip
    return {"tree_options": options, "eta": eta}


class DTSRewardLoader:
    DESCRIPTION = (
        "Load a reward model for DTS from ComfyUI/models/dts_rewards or the local Hugging Face cache. ComfyUI's model "
        "management holds it: loaded to the GPU to score, offloaded when the UNet needs the room (--lowvram, "
        "--novram and --cpu apply)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("DTS_REWARD",)
    RETURN_NAMES = ("reward",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = reward_names()
        return {
            "required": {
                "reward_name": (names, {"default": "image-reward" if "image-reward" in names else names[0]}),
                "weights": (sampling.reward_weight_choices(), {"default": sampling.HUB_CACHE, "tooltip":
                            "a file or folder in models/dts_rewards, the hub cache, or (none) for rewards without "
                            "weights"}),
                "device": (["auto", "cpu"], {"default": "auto", "tooltip": "auto: ComfyUI's device, loaded there to "
                           "score and offloaded as ComfyUI offloads the UNet; cpu: always scored on the CPU"}),
                "dtype": (list(sampling.DTYPES), {"default": "auto"}),
            },
            "optional": {
                "options": ("STRING", {"default": "", "multiline": False, "tooltip": 'loader arguments as JSON, '
                            'e.g. {"digit": 3}'}),
            },
        }  # fmt: skip

    def load(self, reward_name, weights, device, dtype, options=""):
        return (sampling.load_reward_for_comfy(reward_name, weights, device, dtype, options),)


class DTSSampler:
    DESCRIPTION = (
        "KSampler with Diffusion Tree Sampling: spends an NFE budget growing a tree of denoising paths scored by the "
        "reward, then draws the outputs from p·exp(λ·r) (sample) or returns the best found (search, DTS*). The "
        "method input runs a particle baseline (best-of-N, SMC, BFS, ...) under the same budget instead."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "FLOAT", "STRING", "DTS_TREE")
    RETURN_NAMES = ("latent", "rewards", "summary", "tree")
    OUTPUT_IS_LIST = (False, True, False, False)
    OUTPUT_TOOLTIPS = (
        "the drawn samples", "their rewards", "method, rewards, best found, NFE spent",
        "the grown tree: feed it to another DTS Sampler's tree input to continue it with more budget",
    )  # fmt: skip
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "vae": ("VAE", {"tooltip": "decodes rollouts for the reward"}),
                "reward": ("DTS_REWARD",),
                "reward_prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "the prompt the reward "
                                  "scores against (usually the positive prompt)"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "scheduler": (scheduler_names(), {"default": "karras"}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                **search_inputs(),
                "num_outputs": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "samples drawn from the tree; "
                                "0 = as many as the latent batch (KSampler's rule)"}),
            },
            "optional": {
                **advanced_inputs(),
                "tree": ("DTS_TREE", {"tooltip": "continue this tree (another DTS Sampler's tree output) with "
                         "nfe_budget more NFE; it must have been grown with the same steps, sigmas, latent, λ, mode "
                         "and method"}),
            },
        }  # fmt: skip

    def sample(self, model, positive, negative, latent_image, vae, reward, reward_prompt, seed, steps, cfg, scheduler,
               denoise, mode, lam, nfe_budget, eta, num_outputs, **advanced):  # fmt: skip
        tree = advanced.pop("tree", None)
        latent, rewards, summary, grown = sampling.run_dts_sampler(
            model, positive, negative, latent_image, vae, reward, reward_prompt, seed, steps, cfg, scheduler, denoise,
            nfe_budget, num_outputs, tree=tree, **tree_options(mode, lam, eta, **advanced),
        )  # fmt: skip
        return {"ui": {"text": [summary], "rewards": rewards}, "result": (latent, rewards, summary, grown)}


class DTSSamplerSelect:
    DESCRIPTION = (
        "A SAMPLER for SamplerCustom / SamplerCustomAdvanced that runs DTS (or the method picked): any GUIDER, SIGMAS "
        "and NOISE; returns as many samples as the latent batch. DTS Run Report shows its rewards."
    )
    CATEGORY = "sampling/custom_sampling/samplers"
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("VAE",),
                "reward": ("DTS_REWARD",),
                "reward_prompt": ("STRING", {"default": "", "multiline": True}),
                **search_inputs(),
            },
            "optional": {
                **advanced_inputs(),
                "sigmas": ("SIGMAS", {"tooltip": "optional: the SIGMAS the custom sampler gets, so a budget below one "
                           "rollout is reported here"}),
            },
        }  # fmt: skip

    def get_sampler(self, vae, reward, reward_prompt, mode, lam, nfe_budget, eta, sigmas=None, **advanced):
        options = tree_options(mode, lam, eta, **advanced)
        return (sampling.dts_ksampler(vae, reward, reward_prompt, sigmas, nfe_budget=nfe_budget, **options),)


class DTSRunReport:
    DESCRIPTION = (
        "The rewards and summary of a DTS Sampler (SAMPLER)'s last run: connect its SAMPLER and the output of the "
        "SamplerCustom / SamplerCustomAdvanced that used it (which makes the report run after the sampling)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("rewards", "summary")
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_NODE = True  # runs (and shows its summary) with nothing connected to its outputs
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        samples = ("LATENT", {"tooltip": "the output of the custom sampler that used the SAMPLER"})
        return {"required": {"sampler": ("SAMPLER",), "samples": samples}}

    def report(self, sampler, samples):
        rewards, summary = sampling.run_report(sampler, samples)
        return {"ui": {"text": [summary], "rewards": rewards}, "result": (rewards, summary)}


NODE_CLASS_MAPPINGS = {
    "DTSRewardLoader": DTSRewardLoader,
    "DTSSampler": DTSSampler,
    "DTSSamplerSelect": DTSSamplerSelect,
    "DTSRunReport": DTSRunReport,
}
# The node ids stay (saved workflows name them); the display names differ case-insensitively, as search does.
NODE_DISPLAY_NAME_MAPPINGS = {
    "DTSRewardLoader": "DTS Reward Loader",
    "DTSSampler": "DTS Sampler",
    "DTSSamplerSelect": "DTS Sampler (SAMPLER)",
    "DTSRunReport": "DTS Run Report",
}
