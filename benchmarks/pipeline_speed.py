"""DTS against the plain diffusers pipeline and the best-of-N / SMC baselines at the same batch: guided NFE per second,
peak memory, and where each method's wall time goes (engine bookkeeping, UNet, the rest of the denoising step, VAE
decode, reward); and the per-row noise draw, the old CPU path against the device path.

Models are the real architectures with random weights (speed does not depend on the weights), built from configs
written below, on the device itself; nothing is downloaded. Prompt embeddings are random tensors of each model's
shapes, so no text encoder runs (prompt encoding happens once per call and is not what is measured):

- `sd15`: Stable Diffusion 1.5 (the SD UNet with 768-wide cross-attention, the SD VAE), 512x512, DDIM;
- `sdxl`: SDXL base 1.0 (UNet with 2048-wide cross-attention and text-time conditioning, the SDXL VAE), 1024x1024,
  DDIM; the VAE decodes in float32 (its config says force_upcast);
- `sd3`: Stable Diffusion 3 medium (the 24-layer MMDiT, the 16-channel VAE), 1024x1024, flow matching (the plain
  pipeline's deterministic Euler, DTS's FlowTransition);
- `tiny`, `tiny-xl`, `tiny-sd3`: the same families at test size, for the CPU.

Every method runs at the same `--batch`: the plain pipeline denoises `--batch` images in one call; DTS, best-of-N and
SMC spend `--rollout-batches` x batch x steps NFE in rollout batches of `--batch`. Repeats are interleaved (one call
of every method per round, the order rotated each round), so a change of load spreads over the methods; the JSON has
every wall time, the medians, and the paired per-round NFE/s ratios to the plain pipeline (median, min, max). The
reward is the mean brightness of the decoded images (cheap on any device), so the reward share is the pipeline's
reward path, not a reward model. Phase times come from the pipeline's PhaseTimer (named in the JSON): on CUDA,
`pipelines.timing.PhaseTimer` charges each GPU phase its CUDA-event time, while `engine` and `denoise` are host wall
times, so on a GPU the shares need not sum to one.

The noise section times `noise.randn_rows` (on CUDA: Philox on the device; on the CPU it is the per-row path)
against the per-row path it replaced on accelerators (one CPU `torch.randn` per row, stacked, copied from pageable
memory) at the model's latent shape, at batch and twice it: the host time until the call returns, the time until the
noise is complete, and on CUDA the host time when the GPU still has work queued (the old copy waits for it); plus
whether the draw and the timer run under `torch.cuda.set_sync_debug_mode("error")`, and the largest difference
between the Philox noise computed on the GPU and on the CPU for the same rows.

    python benchmarks/pipeline_speed.py --smoke                      # CPU, every tiny family, seconds
    python benchmarks/pipeline_speed.py --config tiny                # CPU, the tiny SD model
    bash benchmarks/gpu.sh                                           # CUDA: sd15, sdxl, sd3 in float16

Writes benchmarks/results/pipeline_speed_<name>_<device>.json and .png (`--name`, default the configs joined by
"+"), rewritten after every config.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from dts_diffusers.pipelines import pipeline_dts
from dts_diffusers.pipelines.timing import PhaseTimer
from ranking import write_atomically

from dts_diffusers import DTSPipeline, DTSSD3Pipeline, DTSXLPipeline
from dts_diffusers.noise import philox_rows, randn_rows, row_generators

RESULTS = Path(__file__).parent / "results"
METHODS = ("plain", "dts", "best-of-n", "smc")
SD_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
SD_VAE = {  # the SD 1.x / SDXL / SD3 autoencoder: 4 levels of 128..512 channels
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
}
TINY_VAE = {
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
}
TINY_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}


@dataclass(frozen=True)
class Config:
    """One architecture: its family ("sd", "sdxl", "sd3"), backbone and VAE configs, image size, default batch,
    steps and rollout batches, and the shapes of its prompt embeddings (tokens, width, pooled width)."""

    family: str
    backbone: dict
    vae: dict
    size: int
    embeds: tuple[int, int, int | None]
    batch: int
    steps: int
    rollout_batches: int
    notes: str = ""
    scheduler: dict = field(default_factory=dict)


# fmt: off
CONFIGS = {
    "sd15": Config(
        "sd",
        {"sample_size": 64, "cross_attention_dim": 768},  # diffusers' defaults are SD 1.x's UNet
        {**SD_VAE, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215},
        512, (77, 768, None), batch=8, steps=50, rollout_batches=4,
        notes="runwayml/stable-diffusion-v1-5 unet/vae config.json",
    ),
    "sdxl": Config(
        "sdxl",
        {
            "sample_size": 128, "cross_attention_dim": 2048, "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10),
            "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        {**SD_VAE, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        1024, (77, 2048, 1280), batch=4, steps=30, rollout_batches=2,
        notes="stabilityai/stable-diffusion-xl-base-1.0 unet/vae config.json",
    ),
    "sd3": Config(
        "sd3",
        {
            "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
            "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
        },
        {
            **SD_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
            "use_quant_conv": False, "use_post_quant_conv": False,
        },
        1024, (333, 4096, 2048), batch=4, steps=28, rollout_batches=2,
        notes="stabilityai/stable-diffusion-3-medium-diffusers transformer/vae config.json (CLIP 77 + T5 256 tokens)",
        scheduler={"shift": 3.0},
    ),
    "tiny": Config(
        "sd", {**TINY_UNET, "sample_size": 16, "cross_attention_dim": 32},
        {**TINY_VAE, "latent_channels": 4, "sample_size": 32}, 32, (77, 32, None), batch=8, steps=20,
        rollout_batches=4, notes="the tests' tiny SD",
    ),
    "tiny-xl": Config(
        "sdxl",
        {
            **TINY_UNET, "sample_size": 16, "cross_attention_dim": 64, "attention_head_dim": (2, 4),
            "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
            "transformer_layers_per_block": (1, 2), "projection_class_embeddings_input_dim": 80,
        },
        {**TINY_VAE, "latent_channels": 4, "sample_size": 32}, 32, (77, 64, 32), batch=8, steps=20,
        rollout_batches=4, notes="the tests' tiny SDXL",
    ),
    "tiny-sd3": Config(
        "sd3",
        {
            "sample_size": 16, "patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 1,
            "attention_head_dim": 8, "num_attention_heads": 4, "caption_projection_dim": 32,
            "joint_attention_dim": 32, "pooled_projection_dim": 64,
        },
        {
            **TINY_VAE, "latent_channels": 4, "sample_size": 32, "shift_factor": 0.0609, "scaling_factor": 1.5035,
            "use_quant_conv": False, "use_post_quant_conv": False,
        },
        32, (77, 32, 64), batch=8, steps=20, rollout_batches=4, notes="the tests' tiny SD3",
        scheduler={"shift": 3.0},
    ),
}
# fmt: on
SMOKE = {"config": ["tiny", "tiny-xl", "tiny-sd3"], "steps": 4, "batch": 2, "rollout_batches": 2, "repeats": 2}


def build_pipelines(config: Config, device: torch.device, dtype: torch.dtype):
    """The plain pipeline and its DTS twin (sharing the modules), random weights built on `device`."""
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**config.vae)
        if config.family == "sd3":
            backbone = SD3Transformer2DModel(**config.backbone)
        else:
            backbone = UNet2DConditionModel(**config.backbone)
    if config.family == "sd3":
        plain = StableDiffusion3Pipeline(
            transformer=backbone, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(**config.scheduler),
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
            tokenizer_3=None,
        )  # fmt: skip
        dts_class = DTSSD3Pipeline
    elif config.family == "sdxl":
        plain = StableDiffusionXLPipeline(
            vae=vae, unet=backbone, scheduler=DDIMScheduler(**SD_SCHEDULE), text_encoder=None, text_encoder_2=None,
            tokenizer=None, tokenizer_2=None, add_watermarker=False,
        )  # fmt: skip
        dts_class = DTSXLPipeline
    else:
        plain = StableDiffusionPipeline(
            unet=backbone, vae=vae, scheduler=DDIMScheduler(**SD_SCHEDULE), text_encoder=None, tokenizer=None,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        dts_class = DTSPipeline
    plain = plain.to(device, dtype)
    dts = dts_class.from_pipe(plain)
    for pipe in (plain, dts):
        pipe.set_progress_bar_config(disable=True)
    return plain, dts


def conditioning(config: Config, device: torch.device, dtype: torch.dtype) -> dict:
    """Random prompt embeddings (one prompt) of the model's shapes, with the argument names its pipelines take."""
    generator = torch.Generator().manual_seed(0)
    tokens, width, pooled = config.embeds

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    embeds = {"prompt_embeds": draw(1, tokens, width), "negative_prompt_embeds": draw(1, tokens, width)}
    if pooled is not None:
        embeds |= {"pooled_prompt_embeds": draw(1, pooled), "negative_pooled_prompt_embeds": draw(1, pooled)}
    return embeds


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def method_calls(config: Config, plain, dts, embeds: dict, args) -> dict[str, Callable]:
    """One call per method at the run's batch; each returns (NFE spent, the output)."""
    common = {
        "height": config.size, "width": config.size, "num_inference_steps": args.steps, "guidance_scale": 7.0,
        "output_type": "pt",
    }  # fmt: skip
    budget = args.rollout_batches * args.batch * args.steps
    eta = {} if config.family == "sd3" else {"eta": 1.0}  # SD3's own pipeline is the deterministic flow Euler

    def run_plain(steps: int = args.steps):
        batch = {name: value.expand(args.batch, *value.shape[1:]) for name, value in embeds.items()}
        seeded = {"generator": torch.Generator().manual_seed(0), "num_inference_steps": steps}
        out = plain(**batch, **eta, **{**common, **seeded})
        return args.batch * steps, out

    def tree_call(method: str):
        def run(nfe_budget: int = budget, steps: int = args.steps):
            out = dts(
                **embeds, reward=brightness, nfe_budget=nfe_budget, rollout_batch_size=args.batch, method=method,
                generator=torch.Generator().manual_seed(0), **{**common, "num_inference_steps": steps},
            )  # fmt: skip
            return out.nfe, out

        return run

    return {"plain": run_plain, **{method: tree_call(method) for method in METHODS[1:]}}


def time_call(call: Callable, device: torch.device) -> tuple[float, int, object, int | None]:
    """Wall time of one call (the device drained before and after), its NFE, output and peak CUDA memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    nfe, output = call()
    synchronize(device)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return wall, nfe, output, peak


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def phases(timings: dict) -> dict:
    """The pipeline's phase seconds, with the denoising step's own work (denoise less the UNet) split out."""
    seconds = {
        "engine": timings.get("engine", 0.0),
        "unet": timings.get("unet", 0.0),
        "step_and_noise": timings.get("denoise", 0.0) - timings.get("unet", 0.0),
        "vae_decode": timings.get("vae_decode", 0.0),
        "reward": timings.get("reward", 0.0),
    }
    return {"seconds": seconds, "share": {name: value / timings["total"] for name, value in seconds.items()}}


def measure_methods(calls: dict[str, Callable], device: torch.device, repeats: int) -> dict:
    """Interleaved rounds: every method once per round, the order rotated; per-method medians and spreads, and
    NFE/s ratios to the plain pipeline paired by round."""
    names = list(calls)
    rows = {name: {"walls_s": [], "nfe_per_s": [], "peaks": [], "phases": []} for name in names}
    for round_index in range(repeats):
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            wall, nfe, output, peak = time_call(calls[name], device)
            row = rows[name]
            row["walls_s"].append(wall)
            row["nfe_per_s"].append(nfe / wall)
            row["nfe"] = nfe
            row["peaks"].append(peak)
            if name != "plain":
                row["phases"].append(phases(output.timings))
                row["unet_evals"], row["reward_calls"] = output.unet_evals, output.reward_calls
                if name == "dts":
                    row["tree"] = {k: v for k, v in output.trees[0].stats().items() if k != "timings"}
    result = {}
    for name, row in rows.items():
        entry = {
            "nfe": row["nfe"],
            "wall_s": spread(row["walls_s"]),
            "nfe_per_s": spread(row["nfe_per_s"]),
            "peak_memory_bytes": max(row["peaks"]) if device.type == "cuda" else None,
        }
        if name != "plain":
            paired = [a / b for a, b in zip(row["nfe_per_s"], rows["plain"]["nfe_per_s"], strict=True)]
            entry["nfe_per_s_over_plain"] = spread(paired)
            entry["unet_evals"], entry["reward_calls"] = row["unet_evals"], row["reward_calls"]
            entry["phase_seconds"] = median_phases(row["phases"], "seconds")
            entry["phase_share"] = median_phases(row["phases"], "share")
            if "tree" in row:
                entry["tree"] = row["tree"]
        result[name] = entry
    return result


def median_phases(measured: list[dict], key: str) -> dict:
    return {phase: statistics.median(m[key][phase] for m in measured) for phase in measured[0][key]}


def old_randn_rows(generators, shape, device: torch.device) -> torch.Tensor:
    """The per-row path randn_rows replaced: one CPU torch.randn per row, stacked, then a pageable copy."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


@contextmanager
def sync_debug(device: torch.device):
    """Make any synchronising CUDA call raise inside the block (a no-op on the CPU)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def runs_without_sync(fn: Callable, device: torch.device) -> bool | None:
    if device.type != "cuda":
        return None
    try:
        with sync_debug(device):
            fn()
    except RuntimeError:
        return False
    return True


def noise_section(shape: tuple[int, ...], batch: int, device: torch.device, repeats: int) -> dict:
    """randn_rows against the old per-row path, interleaved, at batch and twice batch."""
    busy = torch.randn(4096, 4096, device=device, dtype=torch.float16) if device.type == "cuda" else None
    result = {"shape": list(shape)}
    for rows in (batch, 2 * batch):
        generators = row_generators(range(rows))
        draws = {
            "old": lambda generators=generators: old_randn_rows(generators, shape, device),
            "new": lambda generators=generators: randn_rows(generators, shape, device=device),
        }
        for draw in draws.values():
            draw()  # warm-up
        times = {name: {"host_ms": [], "complete_ms": [], "host_ms_gpu_busy": []} for name in draws}
        for round_index in range(repeats):
            for name in sorted(draws, reverse=bool(round_index % 2)):
                synchronize(device)
                start = time.perf_counter()
                draws[name]()
                times[name]["host_ms"].append(1e3 * (time.perf_counter() - start))
                synchronize(device)
                times[name]["complete_ms"].append(1e3 * (time.perf_counter() - start))
                if device.type == "cuda":  # ~20 ms of queued work, a UNet call's: the old pageable copy waits for it
                    for _ in range(100):
                        busy @ busy
                    start = time.perf_counter()
                    draws[name]()
                    times[name]["host_ms_gpu_busy"].append(1e3 * (time.perf_counter() - start))
                    synchronize(device)
        entry = {name: {key: spread(v) for key, v in series.items() if v} for name, series in times.items()}
        entry["old_over_new_complete_ms"] = (
            entry["old"]["complete_ms"]["median"] / entry["new"]["complete_ms"]["median"]
        )
        result[f"batch_{rows}"] = entry
    generators = row_generators(range(batch))
    if device.type == "cuda":
        on_device = randn_rows(row_generators(range(batch)), shape, device=device).cpu()  # the Philox path
        on_cpu = philox_rows(generators, shape, torch.device("cpu"))  # the same computation on the CPU
        result["max_abs_philox_cpu_vs_device"] = float((on_device - on_cpu).abs().max())
    result["randn_rows_without_sync"] = runs_without_sync(lambda: randn_rows(generators, shape, device=device), device)

    def timed_phases():
        timer = PhaseTimer(device)
        for _ in range(100):
            with timer("unet"):
                busy @ busy

    result["phase_timer_without_sync"] = runs_without_sync(timed_phases, device)
    return result


def run_config(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    config = CONFIGS[name]
    built = time.perf_counter()
    plain, dts = build_pipelines(config, device, dtype)
    embeds = conditioning(config, device, dtype)
    build_s = time.perf_counter() - built
    calls = method_calls(config, plain, dts, embeds, args)
    calls["plain"](steps=2)  # warm-up: kernels, allocator, attention backend, at 2 steps
    for method in METHODS[1:]:
        calls[method](nfe_budget=2 * args.batch * 2, steps=2)
    methods = measure_methods(calls, device, args.repeats)
    side = config.size // plain.vae_scale_factor
    latent_shape = (plain.vae.config.latent_channels, side, side)
    noise = noise_section(latent_shape, args.batch, device, args.noise_repeats)
    del plain, dts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "config": name,
        "architecture": config.notes,
        "image_size": config.size,
        "build_s": build_s,
        "methods": methods,
        "noise": noise,
        "dts_over_plain_nfe_per_s": methods["dts"]["nfe_per_s_over_plain"]["median"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                        help="default float16 on CUDA, float32 on the CPU")  # fmt: skip
    parser.add_argument("--config", nargs="+", default=["tiny"], choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=None, help="images per plain call = rollout batch size")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--rollout-batches", type=int, default=None,
        help="DTS / best-of-N / SMC budget in batches of full rollouts (default per config)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every method")
    parser.add_argument("--noise-repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="every tiny family at 4 steps, batch 2 (CPU check)")
    parser.add_argument("--name", default=None, help="result file stem (default: the configs joined by '+')")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.name = args.name or "smoke"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    name = args.name or "+".join(args.config)
    out = args.out_dir / f"pipeline_speed_{name}_{args.device}.json"
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "phase_timer": f"{pipeline_dts.PhaseTimer.__module__}.PhaseTimer",
        "smoke": args.smoke,
        "configs": {},
    }
    if device.type == "cpu":
        report["note"] = (
            "CPU run (no GPU): tiny models, the speed of this machine only; the acceptance numbers come from "
            "benchmarks/gpu.sh"
        )
    for config_name in args.config:
        config = CONFIGS[config_name]
        run_args = argparse.Namespace(**vars(args))
        for key in ("batch", "steps", "rollout_batches"):
            if getattr(run_args, key) is None:
                setattr(run_args, key, getattr(config, key))
        report["load_average_1min_before"] = os.getloadavg()[0]
        result = run_config(config_name, run_args, device, dtype)
        result |= {"batch": run_args.batch, "steps": run_args.steps, "rollout_batches": run_args.rollout_batches}
        result["load_average_1min_after"] = os.getloadavg()[0]
        report["configs"][config_name] = result
        write_atomically(out, json.dumps(report, indent=2) + "\n")
        plot(report, out.with_suffix(".png"))
        print(json.dumps(summary(result), indent=2), flush=True)


def summary(result: dict) -> dict:
    methods, noise = result["methods"], result["noise"]
    searched = {name: m for name, m in methods.items() if name != "plain"}
    return {
        "config": result["config"],
        "nfe_per_s": {name: round(m["nfe_per_s"]["median"], 2) for name, m in methods.items()},
        "over_plain": {name: round(m["nfe_per_s_over_plain"]["median"], 3) for name, m in searched.items()},
        "dts_share": {phase: round(share, 4) for phase, share in methods["dts"]["phase_share"].items()},
        "noise_old_over_new": {k: round(v["old_over_new_complete_ms"], 2) for k, v in noise.items() if "batch" in k},
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = report["configs"]
    fig, axes = plt.subplots(len(configs), 2, figsize=(11, 3.8 * len(configs)), squeeze=False)
    colors = ("tab:red", "tab:blue", "tab:cyan", "tab:green", "tab:orange")
    for (speed, shares), (name, result) in zip(axes, configs.items(), strict=True):
        methods = result["methods"]
        medians = [m["nfe_per_s"]["median"] for m in methods.values()]
        low = [m["nfe_per_s"]["median"] - m["nfe_per_s"]["min"] for m in methods.values()]
        high = [m["nfe_per_s"]["max"] - m["nfe_per_s"]["median"] for m in methods.values()]
        speed.bar(list(methods), medians, yerr=[low, high], color="gray", capsize=3)
        speed.set_ylabel("guided NFE / s (median, min-max)")
        speed.set_title(f"{name}: batch {result['batch']}, {result['steps']} steps", fontsize=9)
        searched = [m for m in methods if m != "plain"]
        for row, method in enumerate(searched):
            left = 0.0
            for (phase, share), color in zip(methods[method]["phase_share"].items(), colors, strict=True):
                label = phase if row == 0 else None
                shares.barh([row], [max(share, 0.0)], left=left, color=color, label=label)
                left += max(share, 0.0)
        shares.set_yticks(range(len(searched)), searched)
        shares.set_xlim(0, 1)
        shares.set_xlabel("share of the method's wall time (median)")
        shares.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=5, fontsize=7, frameon=False)
    label = "CPU, tiny models" if "note" in report else report["device"]
    fig.suptitle(f"DTS vs plain pipeline vs best-of-N / SMC at equal batch ({label}, {report['dtype']})")
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".png") as handle:
        fig.savefig(handle, format="png", dpi=110)
    os.replace(handle.name, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
