"""ComfyUI glue for `sample_dts`: a `SAMPLER` function, the KSampler-shaped run, and reward loading.

ComfyUI is imported inside the functions only, so the node classes (and CI) import without it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import torch

from dts_diffusers.k_sampling import SearchTree, sample_dts, single_latent

from . import memory
from .memory import ComfyReward

REWARD_FOLDER = "dts_rewards"
HUB_CACHE = "(hub cache)"
NO_WEIGHTS = "(none)"
SET_BY_THE_NODE = ("device", "dtype", "pretrained_model_name_or_path")  # the loader's widgets set these
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

logger = logging.getLogger(__name__)


def register_reward_folder() -> None:
    """Register `models/dts_rewards` with ComfyUI's folder_paths (weights of reward models go there)."""
    import folder_paths

    if REWARD_FOLDER not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, REWARD_FOLDER)
        folder_paths.folder_names_and_paths[REWARD_FOLDER] = ([path], {""})


def reward_weight_choices() -> list[str]:
    """Files and folders (a transformers model is a folder) found in every registered `dts_rewards` path."""
    choices = [NO_WEIGHTS, HUB_CACHE]
    try:
        import folder_paths
    except ImportError:
        return choices
    register_reward_folder()
    for root in folder_paths.get_folder_paths(REWARD_FOLDER):
        if os.path.isdir(root):
            choices += sorted(name for name in os.listdir(root) if not name.startswith("."))
    return choices


def load_reward_for_comfy(reward_name: str, weights: str, device: str, dtype: str, options: str) -> ComfyReward:
    """Build a registered reward, held by ComfyUI's model management; weights come from `models/dts_rewards/<weights>`
    or the local hub cache."""
    import inspect

    from dts_diffusers.rewards import load_reward, reward_loader

    parameters = inspect.signature(reward_loader(reward_name)).parameters
    kwargs = parse_options(reward_name, options, [name for name in parameters if name not in SET_BY_THE_NODE])
    if weights not in (NO_WEIGHTS, HUB_CACHE):
        if "pretrained_model_name_or_path" not in parameters:
            raise ValueError(f"the {reward_name!r} reward takes no weights; set weights to {NO_WEIGHTS!r}")
        import folder_paths

        register_reward_folder()
        path = next(
            (
                os.path.join(root, weights)
                for root in folder_paths.get_folder_paths(REWARD_FOLDER)
                if os.path.exists(os.path.join(root, weights))
            ),
            None,
        )
        if path is None:
            raise FileNotFoundError(
                f"reward weights {weights!r} not found in {folder_paths.get_folder_paths(REWARD_FOLDER)}; put the file "
                f"or folder in ComfyUI/models/{REWARD_FOLDER}/"
            )
        kwargs["pretrained_model_name_or_path"] = path
    if "local_files_only" in parameters:
        kwargs.setdefault("local_files_only", True)  # never download from inside a workflow
    load_device, offload_device = memory.reward_devices(device)
    try:
        reward = load_reward(reward_name, device=offload_device, dtype=DTYPES[dtype], **kwargs)
    except OSError as err:
        raise OSError(
            f"{err}\nIn ComfyUI: put the weights in ComfyUI/models/{REWARD_FOLDER}/ and pick them in 'weights'."
        ) from err
    return memory.ComfyReward(reward, load_device, offload_device)


def parse_options(reward_name: str, options: str, accepted: list[str]) -> dict:
    """The `options` input as loader keywords; errors name the input and the keys this reward accepts."""
    keys = ", ".join(accepted) or "none"
    try:
        kwargs = json.loads(options) if options.strip() else {}
    except json.JSONDecodeError as err:
        raise ValueError(
            f"options: not valid JSON ({err.msg} at column {err.colno}): {options!r}; give a JSON object such as "
            f'{{"digit": 3}} (the {reward_name!r} reward accepts: {keys})'
        ) from None
    if not isinstance(kwargs, dict):
        raise ValueError(
            f'options must be a JSON object of loader arguments, e.g. {{"digit": 3}} (got {options!r}); the '
            f"{reward_name!r} reward accepts: {keys}"
        )
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        set_here = [key for key in unknown if key in SET_BY_THE_NODE]
        hint = f" ({', '.join(set_here)}: set by the loader's own inputs)" if set_here else ""
        raise ValueError(
            f"options: the {reward_name!r} reward has no option {', '.join(map(repr, unknown))}{hint}; "
            f"it accepts: {keys}"
        )
    return kwargs


def _vae_decoder(vae, base_model):
    """Latents as the sampler holds them (model space) → images [B, 3, H, W] in [0, 1] through the graph's VAE."""

    def decode(latents: torch.Tensor) -> torch.Tensor:
        images = vae.decode(base_model.process_latent_out(latents.float()))
        if images.ndim == 5:  # video VAEs give [B, T, H, W, C]; score the first frame
            images = images[:, 0]
        return images[..., :3].movedim(-1, 1).float()

    return decode


def comfy_sample_dts(
    model,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args=None,
    callback=None,
    disable=None,
    *,
    vae,
    reward,
    reward_prompt: str = "",
    keep_tree: bool = False,
    **options,
) -> torch.Tensor:
    """The `SAMPLER` function: ComfyUI's `model` (KSamplerX0Inpaint) and `noise` (x noised for sigmas[0]).

    The tree batches rows freely, so the inpainting state ComfyUI stores per latent row is narrowed to the one latent
    every root child starts from. Progress goes to a ComfyUI progress bar in NFE units, one update per denoising step
    batch, instead of ComfyUI's `callback` (whose bar counts the sigmas' steps). Each scoring batch loads the reward
    through model management and the sampling run's models back after it. `info` keeps the grown tree only with
    `keep_tree` (DTS Sampler's `tree` output); a SAMPLER's report keeps rewards and stats, not the tree's latents.
    """
    import comfy.model_management

    tree = options.get("tree")
    if tree is None:
        check_budget(options["nfe_budget"], len(sigmas) - 1, "the custom sampler's SIGMAS", "DTS Sampler (SAMPLER): ")

    extra_args = dict(extra_args or {})
    if getattr(model, "latent_image", None) is not None:
        model.latent_image = single_latent(model.latent_image)
    if getattr(model, "noise", None) is not None:
        model.noise = model.noise[:1]
    if extra_args.get("denoise_mask") is not None:
        extra_args["denoise_mask"] = extra_args["denoise_mask"][:1]
    base_model = model.inner_model.inner_model
    in_use = memory.sampling_models(model)

    def score(images: torch.Tensor) -> torch.Tensor:
        scores = reward(images, reward_prompt)
        memory.reload_for_sampling(in_use)
        return scores

    samples = sample_dts(
        model,
        noise,
        sigmas,
        extra_args,
        nfe_progress(in_use[0], options["nfe_budget"], tree.sampler.nfe if tree is not None else 0),
        disable,
        reward=score,
        decode=_vae_decoder(vae, base_model),
        interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
        **options,
    )
    if not keep_tree and options.get("info") is not None:
        options["info"].pop("tree", None)
    return samples


def nfe_progress(patcher, nfe_budget: int, start: int) -> Callable[[dict], None]:
    """A ComfyUI progress bar over this run's `nfe_budget`, previewing the best sample found so far (the step's x̂_0
    before the first is scored) with the previewer ComfyUI's samplers use (--preview-method)."""
    import comfy.utils
    import latent_preview

    previewer = latent_preview.get_previewer(patcher.load_device, patcher.model.latent_format)
    bar = comfy.utils.ProgressBar(nfe_budget)

    def progress(state: dict) -> None:
        preview = previewer.decode_latent_to_preview_image("JPEG", state["denoised"]) if previewer else None
        bar.update_absolute(state["nfe"] - start, nfe_budget, preview)

    return progress


def check_budget(nfe_budget: int, steps: int, source: str, node: str = "") -> None:
    """A budget below one rollout fails before any model work, naming the input to change."""
    if nfe_budget < steps:
        raise ValueError(
            f"{node}nfe_budget={nfe_budget} is below one rollout: one sample costs {steps} NFE, one per step of "
            f"{source}; give at least {steps} (e.g. {steps * 8} for 8 rollouts)"
        )


def dts_ksampler(vae, reward, reward_prompt: str, sigmas: torch.Tensor | None = None, **options):
    """A ComfyUI `SAMPLER` (for SamplerCustom / SamplerCustomAdvanced) running `method` with the reward bound.

    Its `info` dict (in `extra_options`) holds the last run's rewards and stats for DTS Run Report. `sigmas`, when
    given (the SIGMAS the custom sampler gets), lets the budget be checked here, so the error lands on this node.
    """
    check_options(options)
    if sigmas is not None:
        check_budget(options["nfe_budget"], len(sigmas) - 1, "the connected sigmas")
    import comfy.samplers

    extra = {"vae": vae, "reward": reward, "reward_prompt": reward_prompt, "info": {}, **options}
    return comfy.samplers.KSAMPLER(comfy_sample_dts, extra_options=extra)


def run_report(sampler, samples: dict) -> tuple[list[float], str]:
    """The rewards and summary of the last run of a DTS SAMPLER, read after the custom sampler that ran it."""
    info = getattr(sampler, "extra_options", {}).get("info")
    if info is None:
        raise ValueError("sampler must come from DTS Sampler (SAMPLER) (this SAMPLER is another sampler)")
    if not info:
        raise ValueError(
            "this DTS SAMPLER has not run yet: connect samples to the output of the SamplerCustom(Advanced) that "
            "uses it, so the report runs after it"
        )
    rows = samples["samples"].shape[0]
    if rows != len(info["rewards"]):
        raise ValueError(
            f"samples has {rows} rows but the sampler's last run drew {len(info['rewards'])}: connect the output of "
            "the custom sampler that uses this SAMPLER"
        )
    return [float(r) for r in info["rewards"]], summarize(info)


def check_options(options: dict) -> None:
    """Fail at the node with a clear message before any model work (the tree options checked themselves when built)."""
    if not options.get("eta", 1.0) > 0:
        raise ValueError(
            "eta must be > 0: DTS branches on the fresh noise of each ancestral step, and eta=0 is deterministic "
            "(every child would be identical); use eta=1"
        )


def run_dts_sampler(
    model,
    positive,
    negative,
    latent: dict,
    vae,
    reward,
    reward_prompt: str,
    seed: int,
    steps: int,
    cfg: float,
    scheduler: str,
    denoise: float,
    nfe_budget: int,
    num_outputs: int,
    tree: SearchTree | None = None,
    **options,
) -> tuple[dict, list[float], str, SearchTree]:
    """KSampler with DTS: returns the LATENT of the drawn samples, their rewards, a summary line and the tree.

    The batch rule of both sampler nodes: a latent batch of B (copies of one latent, as EmptyLatentImage gives) asks
    for B samples from one tree; `num_outputs` > 0 overrides B. `tree` continues an earlier run's tree with
    `nfe_budget` more NFE instead of growing a new one.
    """
    check_options(options)
    if tree is None:
        check_budget(nfe_budget, steps, "the steps input")
    elif not isinstance(tree, SearchTree):
        raise ValueError(f"tree must be the tree output of a DTS Sampler (got {type(tree).__name__})")
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils

    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    num_outputs = num_outputs or latent_image.shape[0]
    latent_image = single_latent(latent_image).expand(num_outputs, *latent_image.shape[1:]).contiguous()
    noise = comfy.sample.prepare_noise(latent_image, seed)
    noise_mask = latent.get("noise_mask")
    sigmas = comfy.samplers.KSampler(
        model, steps=steps, device=model.load_device, sampler="euler_ancestral", scheduler=scheduler, denoise=denoise,
        model_options=model.model_options,
    ).sigmas  # fmt: skip
    if len(sigmas) < 2:
        raise ValueError(f"denoise={denoise} leaves no step to take; use denoise > 0")
    sampler = dts_ksampler(
        vae, reward, reward_prompt, nfe_budget=nfe_budget, num_outputs=num_outputs, seed=seed, tree=tree,
        keep_tree=True, **options,
    )  # fmt: skip
    info = sampler.extra_options["info"]
    samples = comfy.sample.sample_custom(
        model, noise, cfg, sampler, sigmas, positive, negative, latent_image, noise_mask=noise_mask,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
    )  # fmt: skip
    comfy.model_management.soft_empty_cache()
    out = {key: value for key, value in latent.items() if key not in ("samples", "batch_index")}
    out["samples"] = samples
    rewards = [float(r) for r in info["rewards"]]
    return out, rewards, summarize(info), info["tree"]


def summarize(info: dict) -> str:
    stats = info["stats"]
    rewards = ", ".join(f"{r:.4f}" for r in info["rewards"].tolist())
    leaves = stats.get("leaves")
    short = leaves is not None and leaves < len(info["rewards"])
    repeated = f" (the tree has only {leaves} leaves: some repeat; raise nfe_budget)" if short else ""
    return (
        f"{info['method'].upper()}: rewards [{rewards}]{repeated}; best found {info['best_reward']:.4f}; "
        f"NFE {stats['nfe']}/{info['nfe_budget']}; reward evaluations {stats['reward_evals']}"
    )
