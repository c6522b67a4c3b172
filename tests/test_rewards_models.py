"""Model-backed rewards on tiny random weights saved to disk, loaded through the same code as the hub path."""

import ast
import importlib.util
import json
import pathlib
import shutil

import pytest
import torch
from transformers import BertTokenizer, CLIPConfig, CLIPModel, CLIPTokenizer

from dts_diffusers.rewards import load_reward
from dts_diffusers.rewards.clip import AESTHETIC_FILE
from dts_diffusers.rewards.heads import preference_mlp
from dts_diffusers.rewards.hub import WeightsFileError
from dts_diffusers.rewards.image_reward import (
    KEY_PREFIXES,
    MED_CONFIG_FILE,
    UNUSED_KEYS,
    ImageRewardModel,
    convert_to_safetensors,
)
from dts_diffusers.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PROMPTS = ["a cat", "a dog", "a red cat", "dog and cat", "a cat"]
HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
needs_open_clip = pytest.mark.skipif(not HAS_OPEN_CLIP, reason="open_clip not installed (extra 'hpsv2')")
TINY_OPEN_CLIP = "dts-test-tiny-ViT"  # registered with open_clip by save_tiny_hpsv2


def save_tiny_clip(directory, seed: int, image_size: int = 32, resize: int = 32) -> None:
    """A 2-layer CLIP with a letter-level BPE tokenizer and a CLIP-style preprocessor config (resize, then crop)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["<|startoftext|>", "<|endoftext|>", "<unk>", *LETTERS, *(c + "</w>" for c in LETTERS), "ca", "cat</w>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tokenizer.save_pretrained(directory)
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1}
    text |= {"pad_token_id": 1}
    vision = {"image_size": image_size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64}
    vision |= {"num_hidden_layers": 2, "num_attention_heads": 2}
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(directory)
    processor = {
        "size": {"shortest_edge": resize},
        "crop_size": {"height": image_size, "width": image_size},
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "image_processor_type": "CLIPImageProcessor",
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))


def save_tiny_image_reward(directory, seed: int = 0) -> None:
    """An ImageReward.pt in the reference checkpoint's key layout (incl. the keys the score ignores)."""
    directory.mkdir(parents=True, exist_ok=True)
    words = ["a", "cat", "dog", "red", "and", "on", "the", "photo"]
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    med_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40,
        "pad_token_id": 0,
        "vocab_size": 5 + len(words) + 2,
        "hidden_act": "gelu",
        "encoder_width": 768,
        "add_cross_attention": True,
    }
    (directory / MED_CONFIG_FILE).write_text(json.dumps(med_config))
    vision = {"image_size": 32, "patch_size": 16, "width": 64, "depth": 2, "num_heads": 1, "mlp_hidden": 128}
    torch.manual_seed(seed)
    model = ImageRewardModel(med_config, vision)
    to_reference = {ours: theirs for theirs, ours in KEY_PREFIXES.items()}
    state = {}
    for key, value in model.state_dict().items():
        prefix = next(p for p in to_reference if key.startswith(p))
        state[to_reference[prefix] + key[len(prefix) :]] = value + 0.2 * torch.randn_like(value)
    state |= {key: torch.zeros(3) for key in UNUSED_KEYS}
    torch.save(state, directory / "ImageReward.pt")


def save_tiny_hpsv2(directory, seed: int = 5) -> None:
    """A 2-layer open_clip ViT registered as TINY_OPEN_CLIP, saved as HPSv2 publishes it: {"state_dict": ...}."""
    import open_clip

    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (directory / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(directory / f"{TINY_OPEN_CLIP}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, directory / "HPS_v2.1_compressed.pt")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-weights")
    save_tiny_clip(root / "clip", seed=0)
    save_tiny_clip(root / "pickscore", seed=1)
    save_tiny_clip(root / "pickscore-processor", seed=2, resize=36)  # resize to 36 px, then crop 32
    (root / "pickscore-processor" / "model.safetensors").unlink()
    aesthetic = root / "aesthetic"
    aesthetic.mkdir()
    torch.manual_seed(3)
    head = preference_mlp(16)
    torch.save(
        {"layers." + k: torch.randn_like(v) * 0.3 for k, v in head.state_dict().items()}, aesthetic / AESTHETIC_FILE
    )
    save_tiny_image_reward(root / "image-reward")
    if HAS_OPEN_CLIP:
        save_tiny_hpsv2(root / "hpsv2")
    return root


def build(name: str, root, **kwargs):
    paths = {
        "clip": {"pretrained_model_name_or_path": root / "clip"},
        "pickscore": {
            "pretrained_model_name_or_path": root / "pickscore",
            "processor_name_or_path": root / "pickscore-processor",
        },
        "aesthetic": {"pretrained_model_name_or_path": root / "aesthetic", "clip_model_name_or_path": root / "clip"},
        "image-reward": {
            "pretrained_model_name_or_path": root / "image-reward",
            "tokenizer_name_or_path": root / "image-reward",
        },
        "hpsv2": {"pretrained_model_name_or_path": root / "hpsv2", "model_name": TINY_OPEN_CLIP},
    }
    return load_reward(name, **paths[name], **kwargs)


def images_for(count: int, seed: int = 0, size: int = 40) -> torch.Tensor:
    return torch.rand(count, 3, size, size + 8, generator=torch.Generator().manual_seed(seed))


MODEL_REWARDS = ["clip", "pickscore", "aesthetic", "image-reward", pytest.param("hpsv2", marks=needs_open_clip)]


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_scores_follow_their_images_and_batches_equal_single_calls(weights, name):
    reward = build(name, weights)
    images = images_for(len(PROMPTS))
    scores = reward(images, PROMPTS)
    assert scores.shape == (len(PROMPTS),) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert scores.std() > 0  # different images get different scores: the weights are not degenerate

    order = torch.randperm(len(PROMPTS), generator=torch.Generator().manual_seed(1))
    shuffled = reward(images[order], [PROMPTS[i] for i in order])
    torch.testing.assert_close(shuffled, scores[order], atol=1e-5, rtol=1e-5)

    singles = torch.cat([reward(images[i : i + 1], [PROMPTS[i]]) for i in range(len(PROMPTS))])
    torch.testing.assert_close(singles, scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["clip", "pickscore", "image-reward", pytest.param("hpsv2", marks=needs_open_clip)])
def test_prompt_changes_the_score_and_text_work_is_cached(weights, name):
    reward = build(name, weights)
    image = images_for(1).expand(2, -1, -1, -1)
    scores = reward(image, ["a cat", "dog on the red"])
    assert not torch.allclose(scores[0], scores[1])
    cache = reward._token_cache if name == "image-reward" else reward._text_cache
    assert set(cache) == {"a cat", "dog on the red"}
    torch.testing.assert_close(reward(image, ["a cat", "dog on the red"]), scores)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_bfloat16_model_gives_float32_scores_close_to_float32(weights, name):
    images = images_for(3, seed=2)
    reference = build(name, weights)(images, PROMPTS[:3])
    reward = build(name, weights, dtype=torch.bfloat16, device="cpu")
    assert reward.dtype == torch.bfloat16 and reward.device.type == "cpu"
    scores = reward(images, PROMPTS[:3])
    assert scores.dtype == torch.float32 and scores.device == images.device
    scale = reference.abs().max().clamp(min=1.0)
    torch.testing.assert_close(scores, reference, atol=0.05 * scale.item(), rtol=0.05)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_differentiable_path_gives_image_gradients(weights, name):
    images = images_for(2, seed=3).requires_grad_(True)
    plain = build(name, weights)
    assert not plain(images, PROMPTS[:2]).requires_grad
    reward = build(name, weights, differentiable=True)
    reward(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.parameters())


def test_weighted_sum_of_model_rewards(weights):
    images = images_for(3, seed=4)
    paths = {
        "image-reward": {
            "pretrained_model_name_or_path": weights / "image-reward",
            "tokenizer_name_or_path": weights / "image-reward",
        },
        "aesthetic": {
            "pretrained_model_name_or_path": weights / "aesthetic",
            "clip_model_name_or_path": weights / "clip",
        },
    }
    combined = load_reward({"image-reward": 1.0, "aesthetic": 0.1}, reward_kwargs=paths)
    expected = build("image-reward", weights)(images, PROMPTS[:3]) + 0.1 * build("aesthetic", weights)(images)
    torch.testing.assert_close(combined(images, PROMPTS[:3]), expected)


def test_aesthetic_needs_no_prompt(weights):
    reward = build("aesthetic", weights)
    images = images_for(2)
    torch.testing.assert_close(reward(images), reward(images, ["ignored", "too"]))


def test_image_reward_loads_from_safetensors_and_files(weights, tmp_path):
    images = images_for(3, seed=5)
    expected = build("image-reward", weights)(images, PROMPTS[:3])
    converted = tmp_path / "converted"
    converted.mkdir()
    convert_to_safetensors(weights / "image-reward" / "ImageReward.pt", converted / "ImageReward.safetensors")
    (converted / MED_CONFIG_FILE).write_text((weights / "image-reward" / MED_CONFIG_FILE).read_text())
    reward = load_reward(
        "image-reward", pretrained_model_name_or_path=converted, tokenizer_name_or_path=weights / "image-reward"
    )
    torch.testing.assert_close(reward(images, PROMPTS[:3]), expected)
    from_file = load_reward(
        "image-reward",
        pretrained_model_name_or_path=weights / "image-reward" / "ImageReward.pt",
        tokenizer_name_or_path=weights / "image-reward",
    )
    torch.testing.assert_close(from_file(images, PROMPTS[:3]), expected)


def test_image_reward_tokenizer_matches_the_reference_setup(weights):
    tokenizer = build("image-reward", weights).tokenizer
    assert isinstance(tokenizer, BertTokenizer)
    vocab_size = json.loads((weights / "image-reward" / MED_CONFIG_FILE).read_text())["vocab_size"]
    assert tokenizer.bos_token == "[DEC]" and tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [
        vocab_size - 2,
        vocab_size - 1,
    ]
    assert len(tokenizer) == vocab_size
    encoded = tokenizer(["a cat", "the red dog"], padding="max_length", truncation=True, max_length=35)
    assert [ids[:4] for ids in encoded.input_ids] == [[2, 5, 6, 3], [2, 11, 8, 7]]  # [CLS] ... [SEP], then [PAD]
    assert len(encoded.input_ids[0]) == 35 and encoded.input_ids[0][4:] == [0] * 31


def test_image_reward_rejects_unknown_and_missing_keys(weights, tmp_path):
    state = torch.load(weights / "image-reward" / "ImageReward.pt", weights_only=True)
    for name, broken in {
        "extra": state | {"blip.decoder.weight": torch.zeros(1)},
        "missing": {k: v for k, v in state.items() if k != "mlp.layers.0.bias"},
    }.items():
        directory = tmp_path / name
        directory.mkdir()
        torch.save(broken, directory / "ImageReward.pt")
        (directory / MED_CONFIG_FILE).write_text((weights / "image-reward" / MED_CONFIG_FILE).read_text())
        match = "unexpected keys.*blip.decoder.weight" if name == "extra" else r"missing \['head.0.bias'\]"
        with pytest.raises(ValueError, match=match):
            load_reward(
                "image-reward", pretrained_model_name_or_path=directory, tokenizer_name_or_path=weights / "image-reward"
            )


@pytest.mark.parametrize(
    ("name", "repo", "filename"),
    [
        ("image-reward", "THUDM/ImageReward", "ImageReward.pt"),
        ("aesthetic", "camenduru/improved-aesthetic-predictor", AESTHETIC_FILE),
        ("clip", "openai/clip-vit-large-patch14", "model.safetensors"),
        ("pickscore", "yuvalkirstain/PickScore_v1", "model.safetensors"),
        pytest.param("hpsv2", "xswu/HPSv2", "HPS_v2.1_compressed.pt", marks=needs_open_clip),
    ],
)
def test_offline_missing_weights_error_names_repo_file_and_local_option(name, repo, filename, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError) as error:
        load_reward(name, local_files_only=True)
    message = str(error.value)
    assert repo in message and filename in message and "pretrained_model_name_or_path=" in message


def test_local_directory_without_the_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'ImageReward.pt' is not in the directory"):
        load_reward("image-reward", pretrained_model_name_or_path=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip is installed")
def test_hpsv2_without_open_clip_says_how_to_install():
    with pytest.raises(ImportError, match=r"dts-diffusers\[hpsv2\]"):
        load_reward("hpsv2")


def reference_hpsv2_scores(model, tokenizer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """hpsv2/img_score.py's score with HPSv2's eval transform (PIL -> ToTensor -> ResizeMaxSize -> Normalize)."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    size = model.visual.image_size[0]
    pixels = []
    for image in images:
        tensor = TF.to_tensor(Image.fromarray(image.permute(1, 2, 0).numpy()).convert("RGB"))
        height, width = tensor.shape[1:]
        scale = size / max(height, width)
        new_size = [round(height * scale), round(width * scale)]
        tensor = TF.resize(tensor, new_size, InterpolationMode.BICUBIC)
        pad_h, pad_w = size - new_size[0], size - new_size[1]
        tensor = TF.pad(tensor, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        pixels.append(TF.normalize(tensor, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    image_features, text_features, _ = model(torch.stack(pixels), tokenizer(prompts))
    return torch.diagonal(image_features @ text_features.T)


@needs_open_clip
@pytest.mark.parametrize(("height", "width"), [(40, 56), (56, 40), (64, 64)])
def test_hpsv2_matches_the_reference_preprocessing_and_score(weights, height, width):
    """Non-square images are fitted and zero-padded as HPSv2 does, not resized and cropped as CLIP is."""
    import open_clip

    images = torch.randint(0, 256, (3, 3, height, width), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    model.load_state_dict(torch.load(weights / "hpsv2" / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        expected = reference_hpsv2_scores(model.eval(), open_clip.get_tokenizer(TINY_OPEN_CLIP), images, PROMPTS[:3])
    scores = build("hpsv2", weights)(images / 255.0, PROMPTS[:3])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


class WritesAFileWhenUnpickled:
    """A pickle payload: unpickling it creates `path`, which is how a test sees that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def pickle_payload(path):
    torch.save({"0.weight": torch.zeros(2, 2), "payload": WritesAFileWhenUnpickled(path.parent / "code-ran")}, path)


CORRUPTIONS = {
    "truncated": truncate,
    "garbage": lambda path: path.write_bytes(b"this is not a weight file " * 8),
    "pickled code": pickle_payload,
    "not a state dict": lambda path: torch.save([torch.zeros(2)], path),
}
DAMAGED_FILES = [  # (reward, file under its directory, official repository named in the error)
    ("image-reward", "image-reward/ImageReward.pt", "THUDM/ImageReward"),
    ("aesthetic", f"aesthetic/{AESTHETIC_FILE}", "camenduru/improved-aesthetic-predictor"),
    pytest.param("hpsv2", "hpsv2/HPS_v2.1_compressed.pt", "xswu/HPSv2", marks=needs_open_clip),
]


def copy_weights(weights, tmp_path):
    root = tmp_path / "weights"
    shutil.copytree(weights, root)
    return root


def assert_names_the_file_and_a_good_source(error, path, repo):
    message = str(error.value)
    assert isinstance(error.value, OSError) and isinstance(error.value, ValueError)
    assert str(path) in message and f"https://huggingface.co/{repo}" in message and "hf download" in message
    assert "weights_only" not in message  # never advise weights_only=False, which would run code from the file
    cause = error.value.__cause__ or (None if error.value.__suppress_context__ else error.value.__context__)
    assert cause is None  # nor pass torch's error, which advises it, on as the cause


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize(("name", "file", "repo"), DAMAGED_FILES)
def test_damaged_torch_weights_name_the_file_and_never_run_code(weights, tmp_path, name, file, repo, corruption):
    root = copy_weights(weights, tmp_path)
    CORRUPTIONS[corruption](root / file)
    with pytest.raises(WeightsFileError) as error:
        build(name, root)
    assert_names_the_file_and_a_good_source(error, root / file, repo)
    expected = {
        "truncated": "truncated or not a PyTorch checkpoint",
        "garbage": "truncated or not a PyTorch checkpoint",
        "pickled code": "pickled objects other than tensors",
        "not a state dict": "holds a list, not a state dict",
    }[corruption]
    assert expected in str(error.value)
    assert not (root / file).with_name("code-ran").exists()


@pytest.mark.parametrize("corruption", ["truncated", "garbage"])
def test_damaged_safetensors_name_the_file(weights, tmp_path, corruption):
    root = copy_weights(weights, tmp_path)
    converted = root / "converted"
    converted.mkdir()
    convert_to_safetensors(root / "image-reward" / "ImageReward.pt", converted / "ImageReward.safetensors")
    shutil.copy(root / "image-reward" / MED_CONFIG_FILE, converted / MED_CONFIG_FILE)
    CORRUPTIONS[corruption](converted / "ImageReward.safetensors")
    CORRUPTIONS[corruption](root / "clip" / "model.safetensors")
    with pytest.raises(WeightsFileError, match="truncated or not a safetensors file") as error:
        load_reward(
            "image-reward", pretrained_model_name_or_path=converted, tokenizer_name_or_path=root / "image-reward"
        )
    assert_names_the_file_and_a_good_source(error, converted / "ImageReward.safetensors", "THUDM/ImageReward")
    with pytest.raises(WeightsFileError, match="truncated or not a safetensors file") as error:
        build("clip", root)
    assert_names_the_file_and_a_good_source(error, root / "clip" / "model.safetensors", "openai/clip-vit-large-patch14")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"hidden_size": 32,', "not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"hidden_size": 32}', "intermediate_size, num_attention_heads"),
        ("\udcff", "not valid JSON"),
    ],
)
def test_damaged_med_config_names_the_file(weights, tmp_path, content, problem):
    root = copy_weights(weights, tmp_path)
    config = root / "image-reward" / MED_CONFIG_FILE
    config.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(WeightsFileError, match=problem) as error:
        build("image-reward", root)
    assert_names_the_file_and_a_good_source(error, config, "THUDM/ImageReward")
    assert "med_config=" in str(error.value)


def test_damaged_preprocessor_config_names_the_file(weights, tmp_path):
    root = copy_weights(weights, tmp_path)
    config = root / "clip" / "preprocessor_config.json"
    config.write_text('{"size": {"width": 32}, "crop_size": 32}')
    with pytest.raises(WeightsFileError, match="size / crop_size must be pixel counts") as error:
        build("clip", root)
    assert_names_the_file_and_a_good_source(error, config, "openai/clip-vit-large-patch14")
    config.write_text("{")
    with pytest.raises(WeightsFileError, match="not valid JSON"):
        build("clip", root)


def test_weights_that_do_not_fit_the_model_name_the_file(weights, tmp_path):
    root = copy_weights(weights, tmp_path)
    head = root / "aesthetic" / AESTHETIC_FILE
    torch.save({"layers.0.weight": torch.zeros(1024, 16)}, head)
    with pytest.raises(WeightsFileError, match=r"not the aesthetic MLP's.*Missing key") as error:
        build("aesthetic", root)
    assert_names_the_file_and_a_good_source(error, head, "camenduru/improved-aesthetic-predictor")
    checkpoint = root / "image-reward" / "ImageReward.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({k: v for k, v in state.items() if "patch_embed" not in k}, checkpoint)
    with pytest.raises(WeightsFileError, match="do not fit ImageReward") as error:
        build("image-reward", root)
    assert_names_the_file_and_a_good_source(error, checkpoint, "THUDM/ImageReward")


def test_every_reward_loader_reads_weights_without_running_code():
    """Audit: every torch.load call under dts_diffusers/rewards passes weights_only=True, and only two files load."""
    calls = []
    for path in pathlib.Path(load_reward.__code__.co_filename).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "torch.export.load"):
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((path.name, ast.unparse(node.func), keywords.get("weights_only")))
    assert ("hub.py", "torch.load", "True") in calls and ("classifier.py", "torch.export.load", None) in calls
    # every other weight file goes through hub.read_state_dict; classifier.py checks a .pt2 before torch.export.load
    assert all(weights_only == "True" for _, function, weights_only in calls if function == "torch.load"), calls
    assert {name for name, _, _ in calls} == {"hub.py", "classifier.py"}, calls
