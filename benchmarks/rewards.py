"""Reward throughput: images per second at batch 1 and 16, with random weights in the real architectures' shapes.

Speed depends on shapes, not weight values, so each reward is built in memory with the published architecture
(OpenAI CLIP ViT-L/14 for `clip` and `aesthetic`, BLIP ViT-L/16 + BERT-base for `image-reward`, CLIP ViT-H/14 for
`pickscore`, open_clip ViT-H-14 for `hpsv2`) and scores 512 x 512 images (SD v1.5 output size, so the resize is
included). Text embeddings are cached after the warm-up call, as they are during a DTS run where the prompt is fixed.
`hpsv2` is timed only when open_clip is installed (extra `hpsv2`), and is skipped (recorded under "skipped") otherwise.

    python benchmarks/rewards.py                      # every reward, CPU (~5 min on 2 idle cores)
    python benchmarks/rewards.py --rewards hpsv2 --output benchmarks/results/rewards_hpsv2
    python benchmarks/rewards.py --device cuda        # GPU: writes rewards_cuda.json / .png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version

import torch
from transformers import BertTokenizer, CLIPConfig, CLIPModel, CLIPTokenizer

from dts_diffusers.rewards import Reward, load_reward
from dts_diffusers.rewards.clip import AestheticScore, ClipScore
from dts_diffusers.rewards.heads import preference_mlp
from dts_diffusers.rewards.image_reward import ImageReward, ImageRewardModel
from dts_diffusers.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

PROMPT = "a photo of an astronaut riding a horse on the moon"
CLIP_L14 = {
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 224,
    },
    "projection_dim": 768,
}
CLIP_H14 = {
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 224,
    },
    "projection_dim": 1024,
}
BERT_BASE = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "vocab_size": 30524,
}
VIT_L16 = {"image_size": 224, "patch_size": 16, "width": 1024, "depth": 24, "num_heads": 16, "mlp_hidden": 4096}
PROCESSING = {"size": 224, "crop": 224, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD}
ALL = ["jpeg-compressibility", "aesthetic", "clip", "image-reward", "pickscore", "hpsv2"]


def small_tokenizers(directory: str) -> tuple[CLIPTokenizer, BertTokenizer]:
    """Tokenizers over the prompt's words: speed does not depend on the vocabulary, and nothing is downloaded."""
    words = PROMPT.split()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>", "<unk>", *letters, *(c + "</w>" for c in letters)]
    with open(os.path.join(directory, "vocab.json"), "w") as handle:
        json.dump({token: i for i, token in enumerate(vocab)}, handle)
    with open(os.path.join(directory, "merges.txt"), "w") as handle:
        handle.write("#version: 0.2\n")
    with open(os.path.join(directory, "vocab.txt"), "w") as handle:
        handle.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    clip_tokenizer = CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
    return clip_tokenizer, BertTokenizer(os.path.join(directory, "vocab.txt"))


def clip_model(shapes: dict, tokenizer: CLIPTokenizer) -> CLIPModel:
    text = shapes["text_config"] | {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    config = CLIPConfig(
        text_config=text, vision_config=shapes["vision_config"], projection_dim=shapes["projection_dim"]
    )
    return CLIPModel(config).eval().requires_grad_(False)


def build(name: str, device: str, dtype: torch.dtype, tokenizers) -> Reward:
    clip_tokenizer, bert_tokenizer = tokenizers
    if name.startswith("jpeg"):
        return load_reward(name)
    if name == "clip":
        return ClipScore(clip_model(CLIP_L14, clip_tokenizer), clip_tokenizer, PROCESSING, "clip").to(device, dtype)
    if name == "pickscore":
        return ClipScore(clip_model(CLIP_H14, clip_tokenizer), clip_tokenizer, PROCESSING, "pickscore").to(
            device, dtype
        )
    if name == "aesthetic":
        model = clip_model(CLIP_L14, clip_tokenizer)
        return AestheticScore(model, clip_tokenizer, PROCESSING, preference_mlp(768).eval()).to(device, dtype)
    if name == "image-reward":
        return ImageReward(ImageRewardModel(BERT_BASE, VIT_L16).eval(), bert_tokenizer).to(device, dtype)
    if name == "hpsv2":
        import open_clip

        from dts_diffusers.rewards.hpsv2 import hpsv2_from_open_clip

        model = open_clip.create_model("ViT-H-14", pretrained=None).eval().requires_grad_(False)
        return hpsv2_from_open_clip(model, "ViT-H-14").to(device, dtype)
    raise ValueError(f"no benchmark for {name!r}; choose from {ALL}")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_reward(reward: Reward, batch: int, repeats: int, device: str, warm_up: bool = True) -> float:
    """Seconds per call, median over `repeats` calls after one warm-up call (which also fills the text cache)."""
    images = torch.rand(batch, 3, 512, 512, generator=torch.Generator().manual_seed(batch)).to(device)
    prompts = [PROMPT] * batch
    if warm_up:
        reward(images, prompts)
        synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        reward(images, prompts)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def package_versions(names: list[str]) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", *(["open_clip_torch"] if "hpsv2" in names else [])):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def plot(report: dict, path: str) -> None:
    """Bars per reward and batch size; a log axis only when the rates span more than 10x (JPEG vs the ViTs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = list(dict.fromkeys(r["reward"] for r in results))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.38
    for offset, batch in ((-width / 2, 1), (width / 2, 16)):
        values = [
            next((r["images_per_second"] for r in results if r["reward"] == n and r["batch"] == batch), 0)
            for n in names
        ]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=f"batch {batch}")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    rates = [r["images_per_second"] for r in results]
    if max(rates) > 10 * min(rates):
        ax.set_yscale("log")
    ax.set_ylabel("images / second")
    ax.set_title(
        f"Reward throughput ({report['device']}, {results[0]['dtype']}, torch {report['torch']}, "
        f"{report['torch_threads']} threads)\n512 px inputs, random weights in the real shapes",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rewards", nargs="+", default=["all"], help=f"subset of {ALL}, or 'all' (default)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per batch size (default 2 CPU, 10 GPU)")
    parser.add_argument(
        "--output", default="benchmarks/results/rewards", help="path without extension; GPU runs add '_cuda'"
    )
    args = parser.parse_args()

    on_gpu = args.device.startswith("cuda")
    names = ALL if args.rewards == ["all"] else args.rewards
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        parser.error(f"unknown rewards {unknown}; choose from {ALL} or 'all'")
    repeats = args.repeats or (10 if on_gpu else 2)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    results, skipped = [], {}
    with tempfile.TemporaryDirectory() as directory:
        tokenizers = small_tokenizers(directory)
        for name in names:
            if name == "hpsv2" and importlib.util.find_spec("open_clip") is None:
                skipped[name] = "open_clip not installed (pip install 'dts-diffusers[hpsv2]')"
                continue
            reward = build(name, args.device, dtype, tokenizers)
            for batch in (1, 16):
                # on the CPU a ViT-L call at batch 16 takes minutes on 2 cores: time one call, warmed up by batch 1
                full = batch == 1 or on_gpu or name.startswith("jpeg")
                timed_calls = repeats if full else 1
                seconds = time_reward(reward, batch, timed_calls, args.device, warm_up=full)
                row = {
                    "reward": name,
                    "batch": batch,
                    "seconds_per_call": seconds,
                    "images_per_second": batch / seconds,
                    "timed_calls": timed_calls,
                    "own_warm_up_call": full,
                    "load_average_1min": os.getloadavg()[0],
                }
                results.append(row | {"device": args.device, "dtype": args.dtype})
                print(
                    f"{name:24s} batch {batch:2d}: {batch / seconds:9.3f} images/s ({seconds:.3f} s/call)", flush=True
                )
            del reward

    device_name = torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine()
    report = {
        "what": "reward images/second at batch 1 and 16; random weights in the real architectures' shapes; "
        "512x512 inputs; text embeddings cached after warm-up; median of timed calls (CPU, ViT models, batch 16: "
        "one call, warmed up by the batch-1 calls); load_average_1min is the machine's load after the row (other "
        "processes share the CPU)",
        "command": " ".join(["python", *sys.argv]),
        "device": args.device,
        "device_name": device_name,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "packages": package_versions(names),
        "results": results,
        "skipped": skipped,
    }
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(f"{args.output}{suffix}.json.tmp", "w") as handle:
        json.dump(report, handle, indent=2)
    os.replace(f"{args.output}{suffix}.json.tmp", f"{args.output}{suffix}.json")
    if results:
        plot(report, f"{args.output}{suffix}.png")


if __name__ == "__main__":
    main()
