"""DTSPipeline against the plain StableDiffusionPipeline at the same batch: guided NFE per second, peak memory, and
where DTS's wall time goes (engine bookkeeping, UNet, the rest of the denoising step, VAE decode, reward).

- `--device cuda --config sd15`: Stable Diffusion 1.5's UNet and VAE architecture (diffusers' default
  `UNet2DConditionModel` with cross_attention_dim=768, the SD VAE) with random weights in fp16 at 512x512; speed does
  not depend on the weights. Prompt embeddings are random [1, 77, 768] tensors, so no text encoder or tokenizer is
  needed (prompt encoding runs once per call and is not what is measured).
- `--device cpu --config tiny`: the tiny random-weight model of the tests (32/64 channels), float32.

Both pipelines use DDIM with eta=1 and classifier-free guidance; the plain pipeline denoises `--batch` images in one
batch, DTS grows one tree with rollout batches of `--batch`. The reward is the mean brightness of the decoded images
(cheap on any device), so the reward share is the cost of the pipeline's reward path, not of a reward model.

Writes benchmarks/results/pipeline_speed_<config>_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from dts_diffusers import DTSPipeline

RESULTS = Path(__file__).parent / "results"
SD_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def build_models(config: str) -> tuple[UNet2DConditionModel, AutoencoderKL, int, int]:
    """UNet, VAE, text-embedding width and image size of the chosen architecture (random weights)."""
    torch.manual_seed(0)
    if config == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
        )  # fmt: skip
        return unet, vae, 768, 512
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 64), latent_channels=4, layers_per_block=1, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    return unet, vae, 32, 32


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(call, device: torch.device, repeats: int) -> tuple[list[float], object, int | None]:
    """Median-ready wall times of `call()`, its last output, and the peak CUDA memory of one call."""
    walls, output, peak = [], None, None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        output = call()
        synchronize(device)
        walls.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
    return walls, output, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--config", default="tiny", choices=("tiny", "sd15"))
    parser.add_argument("--batch", type=int, default=8, help="images per plain call = DTS rollout batch size")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--rollout-batches", type=int, default=12,
        help="DTS budget in batches of full rollouts; above ~32 rollouts (pw_c=2, pw_alpha=0.8) the tree branches "
        "below the root and rollouts start at lower levels, so the UNet sees partial batches",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=None, help="image size (default 512 for sd15, 32 for tiny)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet, vae, embed_dim, size = build_models(args.config)
    size = args.size or size
    plain = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=None, tokenizer=None, scheduler=DDIMScheduler(**SD_SCHEDULE),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(device, dtype)  # fmt: skip
    dts = DTSPipeline.from_pipe(plain)
    for pipe in (plain, dts):
        pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 77, embed_dim, generator=generator).to(device, dtype)
    negative = torch.randn(1, 77, embed_dim, generator=generator).to(device, dtype)
    common = {"height": size, "width": size, "num_inference_steps": args.steps, "guidance_scale": 7.5}
    budget = args.rollout_batches * args.batch * args.steps

    def run_plain(steps: int = args.steps):
        return plain(
            prompt_embeds=embeds.expand(args.batch, -1, -1), negative_prompt_embeds=negative.expand(args.batch, -1, -1),
            eta=1.0, output_type="pt", generator=torch.Generator().manual_seed(0),
            **{**common, "num_inference_steps": steps},
        )  # fmt: skip

    def run_dts(nfe_budget: int = budget, steps: int = args.steps):
        return dts(
            prompt_embeds=embeds, negative_prompt_embeds=negative, reward=brightness, nfe_budget=nfe_budget,
            rollout_batch_size=args.batch, output_type="pt", generator=torch.Generator().manual_seed(0),
            **{**common, "num_inference_steps": steps},
        )  # fmt: skip

    run_plain(steps=2)  # warm-up: kernels, allocator, attention backend
    run_dts(nfe_budget=2 * args.batch * 2, steps=2)
    plain_walls, _, plain_peak = measure(run_plain, device, args.repeats)
    dts_walls, dts_out, dts_peak = measure(run_dts, device, args.repeats)

    plain_wall, dts_wall = statistics.median(plain_walls), statistics.median(dts_walls)
    plain_nfe = args.batch * args.steps
    timings = dict(dts_out.timings)
    phases = {
        "engine": timings["engine"],
        "unet": timings["unet"],
        "step_and_noise": timings["denoise"] - timings["unet"],
        "vae_decode": timings["vae_decode"],
        "reward": timings["reward"],
    }
    phases["other"] = timings["total"] - sum(phases.values())
    result = {
        "config": args.config,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "image_size": size,
        "steps": args.steps,
        "batch": args.batch,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "plain": {
            "nfe": plain_nfe,
            "wall_s": plain_wall,
            "walls_s": plain_walls,
            "nfe_per_s": plain_nfe / plain_wall,
            "peak_memory_bytes": plain_peak,
        },
        "dts": {
            "nfe_budget": budget,
            "nfe": dts_out.nfe,
            "unet_evals": dts_out.unet_evals,
            "reward_calls": dts_out.reward_calls,
            "wall_s": dts_wall,
            "walls_s": dts_walls,
            "nfe_per_s": dts_out.nfe / dts_wall,
            "peak_memory_bytes": dts_peak,
            "tree": {k: v for k, v in dts_out.trees[0].stats().items() if k != "timings"},
            "phase_seconds": phases,
            "phase_share": {k: v / timings["total"] for k, v in phases.items()},
        },
    }
    result["dts_over_plain_nfe_per_s"] = result["dts"]["nfe_per_s"] / result["plain"]["nfe_per_s"]
    if device.type == "cpu":
        result["note"] = (
            "CPU run on the tiny model: no GPU was lent in this session. The acceptance numbers (engine share < 2%, "
            "DTS NFE/s within 10% of the plain pipeline) are for `--device cuda --config sd15`. On a shared CPU the "
            "wall times vary between repeats (see walls_s and load_average_1min)."
        )
    out = args.out or RESULTS / f"pipeline_speed_{args.config}_{args.device}.json"
    write_atomically(out, json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("plain", "dts_over_plain_nfe_per_s")}, indent=2))
    print(json.dumps(result["dts"]["phase_share"], indent=2))


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, shares) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    speed.bar(["plain", "DTS"], [result["plain"]["nfe_per_s"], result["dts"]["nfe_per_s"]], color=["gray", "tab:blue"])
    speed.set_ylabel("guided NFE / s")
    speed.set_title(f"batch {result['batch']}, {result['steps']} steps")
    left = 0.0
    for (phase, share), color in zip(
        result["dts"]["phase_share"].items(), ("tab:red", "tab:blue", "tab:cyan", "tab:green", "tab:orange", "gray"),
        strict=True,
    ):  # fmt: skip
        shares.barh([0], [share], left=left, color=color, label=f"{phase} {100 * share:.1f}%")
        left += share
    shares.set_xlim(0, 1)
    shares.set_yticks([])
    shares.set_xlabel("share of DTS wall time")
    shares.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"DTSPipeline vs StableDiffusionPipeline: {result['config']}, {result['device']}, {result['dtype']}")
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".png") as handle:
        fig.savefig(handle, format="png", dpi=120)
    os.replace(handle.name, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
