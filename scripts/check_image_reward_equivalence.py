"""Check that dts_diffusers' ImageReward port scores exactly like the reference `image-reward` code.

The reference cannot be imported next to transformers 5, so the check runs in two processes:

1. `--stage reference`, under a throwaway Python that has transformers 4.40 (which still exports
   `apply_chunking_to_forward`), timm 0.6.13 and torchvision, with the reference package's source on `sys.path`:
   builds the reference `ImageReward` with shrunken but randomised weights (ViT 2 x 128, BERT 2 x 64, seeded), saves its
   `state_dict` as `ImageReward.pt` with `med_config.json` and a small BERT vocabulary, and scores images through the
   reference's public `ImageReward.score(prompt, PIL image)`.
2. the default stage, under this repository's Python: loads those files with
   `dts_diffusers.rewards.image_reward.load_image_reward` (the same loader as the hub path), scores the same images
   and prompts as one batch, and writes the maximum absolute difference to
   `benchmarks/results/image_reward_equivalence.json`.

Reproduce (paths are examples; nothing from the reference goes into this repository):

    python3.11 -m venv /work/ir-ref-venv
    echo /work/main/.venv/lib/python3.11/site-packages > /work/ir-ref-venv/lib/python3.11/site-packages/main.pth
    /work/ir-ref-venv/bin/pip install --no-deps transformers==4.40.2 tokenizers==0.19.1 huggingface_hub==0.23.4 \
        torchvision==0.28.0 timm==0.6.13
    git clone https://github.com/THUDM/ImageReward /work/ir-ref-src   # or `git archive` of a fetched snapshot
    .venv/bin/python scripts/check_image_reward_equivalence.py --reference-python /work/ir-ref-venv/bin/python \
        --reference-src /work/ir-ref-src --reference-commit c1392c6dd0fd6ecd6d416c96959ab744a6d0a8fb

Shims used by the reference stage only: the `ImageReward` package is entered without running its `__init__` (which
imports the ReFL training code), an empty `clip` module and a `fairscale` `checkpoint_wrapper` (both imported
but unused by the scoring path), and a no-op `torchvision._meta_registrations` (the PyPI torchvision wheel is a CUDA
build whose compiled ops do not load next to a CPU torch; the PIL transforms the reference uses are pure Python).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types

import numpy as np
import torch

WORDS = (
    "a photo of an the cat dog sitting on red blue green sofa painting astronaut riding horse in space "
    "mountain lake at sunset city night oil watercolor portrait old man woman with hat , . ! and"
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split(" ")]
PROMPTS = [
    "a photo of a cat sitting on a red sofa",
    "an astronaut riding a horse in space",
    "oil painting of a mountain lake at sunset",
    "a photo of a cat sitting on a red sofa",
    "portrait of an old man with a blue hat , watercolor",
    "zebra unicorn quokka",  # out-of-vocabulary words -> [UNK]
    " ".join(["a green city at night"] * 10),  # longer than 35 tokens: truncated
    "a dog",
]
MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 40,
    "model_type": "bert",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": len(VOCAB) + 2,  # + BLIP's [DEC] and [ENC]
    "encoder_width": 128,
    "add_cross_attention": True,
}
VIT = {"img_size": 224, "patch_size": 16, "embed_dim": 128, "depth": 2, "num_heads": 2}
SEED = 0


def make_images() -> np.ndarray:
    """uint8 images: 224 x 224 (resize/crop are identities, so only the model is compared) plus a 256 x 320 one."""
    rng = np.random.default_rng(SEED)
    images = [rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8) for _ in range(len(PROMPTS) - 1)]
    ramp = np.linspace(0, 255, 320)[None, :, None] * np.linspace(0.2, 1.0, 256)[:, None, None]
    images.append(np.broadcast_to(ramp, (256, 320, 3)).astype(np.uint8))
    return images


def reference_stage(reference_src: str, workdir: str) -> None:
    """Runs under the reference Python: build, randomise, save and score with the reference code."""
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    sys.modules["clip"] = types.ModuleType("clip")
    for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"):
        sys.modules[name] = types.ModuleType(name)
    checkpointing = types.ModuleType("fairscale.nn.checkpoint.checkpoint_activations")
    checkpointing.checkpoint_wrapper = lambda module: module
    sys.modules[checkpointing.__name__] = checkpointing
    # the package's __init__ also imports its training code (datasets, diffusers ReFL); load the modules without it
    package = types.ModuleType("ImageReward")
    package.__path__ = [os.path.join(reference_src, "ImageReward")]
    sys.modules["ImageReward"] = package

    import ImageReward.ImageReward as reference
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    from PIL import Image
    from transformers import BertTokenizer

    tokenizer_dir = os.path.join(workdir, "tokenizer")
    os.makedirs(tokenizer_dir, exist_ok=True)
    with open(os.path.join(tokenizer_dir, "vocab.txt"), "w") as handle:
        handle.write("\n".join(VOCAB) + "\n")
    with open(os.path.join(workdir, "med_config.json"), "w") as handle:
        json.dump(MED_CONFIG, handle, indent=2)

    def tiny_tokenizer():
        tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer

    def tiny_vit(*args, **kwargs):
        return VisionTransformer(**VIT), VIT["embed_dim"]

    original_mlp = reference.MLP
    blip_pretrain.create_vit = tiny_vit
    blip_pretrain.init_tokenizer = tiny_tokenizer
    reference.MLP = lambda input_size: original_mlp(MED_CONFIG["hidden_size"])

    torch.manual_seed(SEED)
    model = reference.ImageReward(med_config=os.path.join(workdir, "med_config.json"), device="cpu").eval()
    with torch.no_grad():  # every weight random and non-trivial (the reference init zeroes biases, fixes LayerNorms)
        for name, parameter in model.named_parameters():
            if "LayerNorm.weight" in name or (".norm" in name and name.endswith("weight")):
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
            elif name.startswith("mlp."):
                parameter.copy_(torch.randn_like(parameter) / parameter.shape[-1] ** 0.5)
            else:
                parameter.copy_(0.05 * torch.randn_like(parameter))
    torch.save(model.state_dict(), os.path.join(workdir, "ImageReward.pt"))

    images = make_images()
    with torch.no_grad():
        scores = [float(model.score(p, Image.fromarray(img))) for p, img in zip(PROMPTS, images, strict=True)]
    import transformers

    with open(os.path.join(workdir, "reference.json"), "w") as handle:
        json.dump({"scores": scores, "transformers": transformers.__version__}, handle)


def port_stage(args: argparse.Namespace, workdir: str) -> dict:
    """Runs under this repository's Python: load the saved weights through the project's loader and compare."""
    import transformers

    from dts_diffusers.rewards.image_reward import SAFETENSORS_FILE, convert_to_safetensors, load_image_reward

    reward = load_image_reward(pretrained_model_name_or_path=workdir, tokenizer_name_or_path=f"{workdir}/tokenizer")
    with open(os.path.join(workdir, "reference.json")) as handle:
        reference = json.load(handle)
    images = make_images()
    square = torch.stack([torch.from_numpy(img).permute(2, 0, 1).float() / 255 for img in images[:-1]])
    batch_scores = reward(square, PROMPTS[:-1]).tolist()
    resized = torch.from_numpy(np.ascontiguousarray(images[-1])).permute(2, 0, 1)[None].float() / 255
    resized_score = reward(resized, PROMPTS[-1:]).item()

    convert_to_safetensors(os.path.join(workdir, "ImageReward.pt"), os.path.join(workdir, SAFETENSORS_FILE))
    from_safetensors = load_image_reward(
        pretrained_model_name_or_path=workdir, tokenizer_name_or_path=f"{workdir}/tokenizer"
    )
    safetensors_scores = from_safetensors(square, PROMPTS[:-1]).tolist()

    ref_square, ref_resized = reference["scores"][:-1], reference["scores"][-1]
    diff = max(abs(a - b) for a, b in zip(batch_scores, ref_square, strict=True))
    return {
        "max_abs_diff": diff,
        "passed": diff < 1e-4,
        "tolerance": 1e-4,
        "what": "224x224 images (reference resize/crop are identities): the port's batched score vs the reference "
        "ImageReward.score(prompt, PIL image), same random weights, CPU float32",
        "num_images": len(ref_square),
        "scores_port": batch_scores,
        "scores_reference": ref_square,
        "safetensors_max_abs_diff_vs_pt": max(
            abs(a - b) for a, b in zip(safetensors_scores, batch_scores, strict=True)
        ),
        "resized_image": {
            "what": "256x320 image: tensor bicubic-antialias resize + crop vs the reference's PIL resize (uint8)",
            "abs_diff": abs(resized_score - ref_resized),
            "score_port": resized_score,
            "score_reference": ref_resized,
        },
        "model": {"vit": VIT, "bert": {k: MED_CONFIG[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}},
        "seed": SEED,
        "reference_commit": args.reference_commit,
        "reference_transformers": reference["transformers"],
        "port_transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["port", "reference"], default="port")
    parser.add_argument("--reference-src", required=True, help="directory holding the reference `ImageReward/` package")
    parser.add_argument("--reference-python", help="Python of the throwaway environment (port stage)")
    parser.add_argument("--reference-commit", default=None, help="commit of the reference source, recorded as is")
    parser.add_argument("--workdir", help="where the reference stage writes its files (temporary by default)")
    parser.add_argument("--output", default="benchmarks/results/image_reward_equivalence.json")
    args = parser.parse_args()

    if args.stage == "reference":
        reference_stage(args.reference_src, args.workdir)
        return
    if not args.reference_python:
        parser.error("--reference-python is required (the throwaway environment with transformers 4.40)")
    with tempfile.TemporaryDirectory() as workdir:
        command = [args.reference_python, "-W", "ignore", os.path.abspath(__file__), "--stage", "reference"]
        subprocess.run([*command, "--reference-src", args.reference_src, "--workdir", workdir], check=True)
        result = port_stage(args, workdir)
    print(json.dumps({k: result[k] for k in ("max_abs_diff", "passed", "safetensors_max_abs_diff_vs_pt")}, indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    temp_path = args.output + ".tmp"
    with open(temp_path, "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(temp_path, args.output)
    if not result["passed"]:
        sys.exit(f"ImageReward port differs from the reference by {result['max_abs_diff']:.3g} (> 1e-4)")


if __name__ == "__main__":
    main()
