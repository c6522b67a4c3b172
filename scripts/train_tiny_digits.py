"""Train the bundled tiny digits model and its two classifiers, on CPU, deterministically from one seed.

Writes, under `dts_diffusers/assets/` (or --out):
- `tiny-sd-digits/`: a real `StableDiffusionPipeline` (CLIP text encoder + tokenizer with its own word vocabulary,
  AutoencoderKL with 4x8x8 latents for 32x32 images, UNet2DConditionModel, DDIM scheduler), trained on scikit-learn's
  handwritten digits with the prompts "a handwritten digit seven" / "a handwritten digit" / "" (for guidance);
- `digit-classifier-{reward,judge}.safetensors` (+ .json config): two CNNs trained on disjoint halves of the data;
- `TRAINING.json`: seeds, steps, losses, wall times, accuracies (each classifier on the other half, and the judge on
  samples drawn from the saved pipeline), file sizes and library versions.

    python scripts/train_tiny_digits.py            # the shipped run
    python scripts/train_tiny_digits.py --threads 1  # faster on an oversubscribed machine (same recipe)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dts_diffusers import digits
from dts_diffusers.defaults import DEFAULTS_FILE

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
VOCABULARY_WORDS = ("a", "handwritten", "digit", *digits.DIGIT_WORDS)
MAX_TOKENS = 16
TEXT_HIDDEN = 32
LATENT_SIDE = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=digits.ASSETS_DIR, help="assets folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--vae-steps", type=int, default=250)
    parser.add_argument("--unet-steps", type=int, default=1200)
    parser.add_argument("--classifier-epochs", type=int, default=20)
    parser.add_argument("--eval-per-digit", type=int, default=20, help="samples per digit for the judge check")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--eval-steps", type=int, default=50, help="DDIM steps for the judge check")
    return parser.parse_args()


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tokenizer(folder: Path) -> None:
    """A CLIP BPE vocabulary: every byte (so nothing is unknown) plus one merge chain per prompt word."""
    alphabet = byte_alphabet()
    vocab = {token: i for i, token in enumerate([*alphabet, *(c + "</w>" for c in alphabet)])}
    merges = []
    for word in VOCABULARY_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if f"{merged} {piece}" not in merges:
                merges.append(f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[1],
        "unk_token": SPECIAL_TOKENS[1],
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def cosine_lr(step: int, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def loss_record(losses: list[float], every: int = 50) -> dict:
    tail = losses[-every:]
    return {
        "first": losses[0],
        "last_mean": sum(tail) / len(tail),
        f"mean_every_{every}": [round(sum(chunk) / len(chunk), 5) for chunk in _chunks(losses, every)],
    }


def _chunks(values: list[float], size: int):
    for start in range(0, len(values), size):
        yield values[start : start + size]


def train_vae(images: torch.Tensor, steps: int, generator: torch.Generator, batch_size: int = 32):
    """A 3-level AutoencoderKL (factor 4: 32x32 -> 4x8x8) trained on reconstruction with a small KL term."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=digits.IMAGE_SIZE,
        mid_block_add_attention=False,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, steps, warmup=20))
    kl_weight = 1e-4
    losses = []
    for _ in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)] * 2.0 - 1.0
        posterior = vae.encode(batch).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator)
        latents = posterior.mean + posterior.std * noise
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean() / posterior.mean[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return vae.eval().requires_grad_(False), losses


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior means and stds of every image, and the SD-style scaling factor 1 / std(latents)."""
    posteriors = [vae.encode(chunk * 2.0 - 1.0).latent_dist for chunk in images.split(256)]
    means = torch.cat([p.mean for p in posteriors])
    stds = torch.cat([p.std for p in posteriors])
    reconstruction = torch.cat([vae.decode(chunk).sample for chunk in means.split(256)])
    reconstruction_mse = F.mse_loss((reconstruction + 1.0) / 2.0, images).item()
    return means, stds, reconstruction_mse


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        projection_dim=TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIDE,  # x vae scale factor 4 = the pipeline's default 32x32
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def sd_scheduler_config() -> dict:
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


def train_diffusion(latent_means, latent_stds, scaling_factor, labels, tokenizer, steps, generator, batch_size=64):
    """UNet + text encoder on epsilon prediction; 15% empty prompts (for guidance), 30% without the digit's name."""
    from diffusers import DDPMScheduler

    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet()
    noise_scheduler = DDPMScheduler(**{k: v for k, v in sd_scheduler_config().items() if k != "set_alpha_to_one"})
    prompts = [digits.digit_prompt(d) for d in range(digits.NUM_CLASSES)] + [digits.GENERIC_PROMPT, ""]
    generic_index, empty_index = digits.NUM_CLASSES, digits.NUM_CLASSES + 1
    tokens = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")

    trained = nn.ModuleList([unet, text_encoder])
    averaged = [p.detach().clone() for p in trained.parameters()]
    optimizer = torch.optim.AdamW(trained.parameters(), lr=2e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, steps))
    losses = []
    for step in range(steps):
        index = torch.randint(len(labels), (batch_size,), generator=generator)
        draw = torch.randn(latent_means[index].shape, generator=generator)
        latents = (latent_means[index] + latent_stds[index] * draw) * scaling_factor
        choice = torch.rand(batch_size, generator=generator)
        prompt_index = torch.where(choice < 0.15, empty_index, torch.where(choice < 0.45, generic_index, labels[index]))
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        embeddings = text_encoder(tokens.input_ids).last_hidden_state[prompt_index]
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=embeddings).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(averaged, [p.detach() for p in trained.parameters()], 1.0 - decay)
        losses.append(loss.item())
    with torch.no_grad():
        for parameter, average in zip(trained.parameters(), averaged, strict=True):
            parameter.copy_(average)
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False), losses


def prefix_text_encoder_keys(path: Path) -> None:
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix, which transformers 4 then silently skips
    (a random text encoder); the prefixed form, the hub's own, loads under both."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, path, metadata)


def save_pipeline(out_dir: Path, vae, text_encoder, unet, tokenizer_dir: Path) -> None:
    """Save a StableDiffusionPipeline (safetensors) with our own vocab.json/merges.txt tokenizer, then swap it in."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet,
        scheduler=DDIMScheduler(**sd_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        prefix_text_encoder_keys(staging / "text_encoder" / "model.safetensors")
        shutil.rmtree(staging / "tokenizer")
        shutil.copytree(tokenizer_dir, staging / "tokenizer")
        kept = out_dir / DEFAULTS_FILE  # the model's run defaults (dts_defaults.json) outlive a retraining
        if kept.is_file():
            shutil.copy2(kept, staging / DEFAULTS_FILE)
        staging.chmod(0o755)
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light random affine jitter: rotation +-10 degrees, scale 0.9-1.1, shift up to 2 pixels of 32."""
    n = len(images)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * 2 / digits.IMAGE_SIZE)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def train_classifier(images, labels, epochs, generator, batch_size=64):
    model = digits.DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3)
    steps = epochs * math.ceil(len(labels) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, steps, warmup=20))
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for index in order.split(batch_size):
            loss = F.cross_entropy(model(augment(images[index], generator)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    return model.eval(), losses


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    return (model(images).argmax(-1) == labels).float().mean().item()


@torch.no_grad()
def judge_samples(pipeline_dir: Path, judge, per_digit: int, guidance_scale: float, steps: int, seed: int) -> dict:
    """Draw from the saved pipeline as a user would (offline from_pretrained, DDIM, CFG) and let the judge read them."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def draw(prompts: list[str], offset: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed + offset)
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                    output_type="pt").images  # fmt: skip

    per_class = {}
    for digit in range(digits.NUM_CLASSES):
        predicted = judge(draw([digits.digit_prompt(digit)] * per_digit, digit)).argmax(-1)
        per_class[str(digit)] = (predicted == digit).float().mean().item()
    generic = judge(draw([digits.GENERIC_PROMPT] * (per_digit * digits.NUM_CLASSES), 100)).argmax(-1)
    histogram = torch.bincount(generic, minlength=digits.NUM_CLASSES).float()
    shares = histogram / histogram.sum()
    entropy = -(shares[shares > 0] * shares[shares > 0].log()).sum().item() / math.log(digits.NUM_CLASSES)
    return {
        "sampler": f"DDIM {steps} steps, guidance_scale {guidance_scale}, 32x32, seed {seed}",
        "samples_per_digit": per_digit,
        "judge_accuracy_per_digit": per_class,
        "judge_accuracy_mean": sum(per_class.values()) / len(per_class),
        "generic_prompt_judge_histogram": histogram.long().tolist(),
        "generic_prompt_normalized_entropy": entropy,
    }


def versions() -> dict:
    import diffusers
    import safetensors
    import sklearn
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "scikit-learn": sklearn.__version__,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    wall: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        wall[name] = round(time.perf_counter() - since, 1)
        print(f"[{wall[name]:7.1f}s] {name} done", flush=True)
        return time.perf_counter()

    images, labels = digits.load_digit_images("all")
    generator = torch.Generator().manual_seed(args.seed)
    tick = time.perf_counter()

    vae, vae_losses = train_vae(images, args.vae_steps, generator)
    latent_means, latent_stds, reconstruction_mse = encode_dataset(vae, images)
    scaling_factor = 1.0 / latent_means.std().item()
    vae.register_to_config(scaling_factor=scaling_factor)
    tick = phase("vae", tick)

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = Path(scratch) / "tokenizer"
        write_tokenizer(tokenizer_dir)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        unet, text_encoder, unet_losses = train_diffusion(
            latent_means, latent_stds, scaling_factor, labels, tokenizer, args.unet_steps, generator
        )
        tick = phase("unet", tick)
        save_pipeline(out / digits.BUNDLED_MODEL_DIR.name, vae, text_encoder, unet, tokenizer_dir)

    classifiers, classifier_record = {}, {}
    for role, other in (("reward", "judge"), ("judge", "reward")):
        train_images, train_labels = digits.load_digit_images(role)
        held_images, held_labels = digits.load_digit_images(other)
        model, losses = train_classifier(train_images, train_labels, args.classifier_epochs, generator)
        model.save(out / f"digit-classifier-{role}.safetensors")
        classifiers[role] = model
        classifier_record[role] = {
            "trained_on": f"{role} half ({len(train_labels)} images)",
            "held_out_on": f"{other} half ({len(held_labels)} images)",
            "epochs": args.classifier_epochs,
            "train_accuracy": accuracy(model, train_images, train_labels),
            "held_out_accuracy": accuracy(model, held_images, held_labels),
            "loss": loss_record(losses),
        }
    tick = phase("classifiers", tick)

    samples = judge_samples(
        out / digits.BUNDLED_MODEL_DIR.name,
        classifiers["judge"],
        args.eval_per_digit,
        args.guidance_scale,
        args.eval_steps,
        args.seed,
    )
    phase("sample check", tick)
    wall["total"] = round(time.perf_counter() - started, 1)

    shipped = [out / digits.BUNDLED_MODEL_DIR.name, *out.glob("digit-classifier-*")]
    sizes = {
        str(path.relative_to(out)): path.stat().st_size
        for root in shipped
        for path in ([root] if root.is_file() else sorted(root.rglob("*")))
        if path.is_file()
    }
    record = {
        "script": digits.TRAINING_SCRIPT,
        "command_args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "seed": args.seed,
        "data": {
            "source": "sklearn.datasets.load_digits (1797 8x8 images), bicubic to 32x32, dark ink on white, RGB",
            "split_seed": digits.SPLIT_SEED,
            "sizes": {split: len(digits.load_digit_images(split)[1]) for split in digits.SPLITS},
        },
        "vae": {
            "steps": args.vae_steps,
            "batch_size": 32,
            "loss": loss_record(vae_losses),
            "reconstruction_mse_01": reconstruction_mse,
            "scaling_factor": scaling_factor,
        },
        "diffusion": {
            "steps": args.unet_steps,
            "batch_size": 64,
            "prompt_mix": {"empty": 0.15, "generic": 0.30, "with_digit": 0.55},
            "ema": "0.995",
            "loss": loss_record(unet_losses),
        },
        "classifiers": classifier_record,
        "samples": samples,
        "wall_seconds": wall,
        "threads": args.threads,
        "shipped_bytes": sizes,
        "shipped_bytes_total": sum(sizes.values()),
        "versions": versions(),
    }
    digits._write_atomic(out / "TRAINING.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    print(json.dumps({k: record[k] for k in ("samples", "wall_seconds", "shipped_bytes_total")}, indent=2))
    for role in digits.CLASSIFIER_ROLES:
        print(f"{role}: held-out accuracy {classifier_record[role]['held_out_accuracy']:.3f}")


if __name__ == "__main__":
    main()
