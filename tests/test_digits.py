"""The bundled tiny digits model: it loads offline as a plain StableDiffusionPipeline, draws digits the judge reads,
and the shipped classifiers reproduce the accuracies recorded in TRAINING.json."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from dts_diffusers import digits

RECORD = json.loads(digits.TRAINING_RECORD.read_text())


@pytest.fixture(scope="module")
def pipe():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        pipe = StableDiffusionPipeline.from_pretrained(digits.bundled_model_path(), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, prompts: list[str], steps: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=4.0, generator=generator, output_type="pt").images


def test_bundled_pipeline_loads_offline_and_draws_32x32_by_default(pipe):
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == digits.IMAGE_SIZE

    images = draw(pipe, [digits.digit_prompt(3), ""], steps=3)
    assert images.shape == (2, 3, digits.IMAGE_SIZE, digits.IMAGE_SIZE)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(draw(pipe, [digits.digit_prompt(3), ""], steps=3), images)


def test_samples_per_digit_are_read_correctly_by_the_judge(pipe):
    judge = digits.load_digit_classifier("judge")
    wanted = torch.arange(digits.NUM_CLASSES).repeat(2)
    images = draw(pipe, [digits.digit_prompt(int(d)) for d in wanted], steps=25)
    with torch.no_grad():
        accuracy = (judge(images).argmax(-1) == wanted).float().mean().item()
    assert accuracy >= 0.5, f"judge accuracy on bundled-model samples fell to {accuracy:.2f}"


def test_tokenizer_round_trips_the_training_prompts_word_by_word(pipe):
    tokenizer = pipe.tokenizer
    folder = digits.bundled_model_path() / "tokenizer"
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    prompts = [digits.digit_prompt(d) for d in (None, *range(digits.NUM_CLASSES))]
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        words = [f"{word}</w>" for word in prompt.split()]
        assert tokenizer.convert_ids_to_tokens(ids) == [tokenizer.bos_token, *words, tokenizer.eos_token]
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    any_text = tokenizer("Zebra 42?").input_ids  # byte fallback: no word is unknown, only spelled out
    assert tokenizer.eos_token_id not in any_text[1:-1]
    assert tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings


def test_splits_are_disjoint_balanced_halves():
    pytest.importorskip("sklearn")
    _, labels = digits.load_digit_images("all")
    split = digits.split_indices(labels)
    reward, judge = set(split["reward"].tolist()), set(split["judge"].tolist())
    assert not reward & judge and reward | judge == set(range(len(labels)))
    counts = torch.stack([torch.bincount(labels[split[name]], minlength=10) for name in ("reward", "judge")])
    assert (counts[1] - counts[0]).abs().max() <= 1
    assert RECORD["data"]["sizes"] == {name: len(split[name]) for name in digits.SPLITS}


@pytest.mark.parametrize(("which", "other"), [("reward", "judge"), ("judge", "reward")])
def test_classifiers_reproduce_their_recorded_held_out_accuracy(which, other):
    pytest.importorskip("sklearn")
    classifier = digits.load_digit_classifier(which)
    images, labels = digits.load_digit_images(other)
    with torch.no_grad():
        accuracy = (classifier(images).argmax(-1) == labels).float().mean().item()
    assert accuracy == pytest.approx(RECORD["classifiers"][which]["held_out_accuracy"], abs=0.005)
    assert accuracy > 0.9


def test_classifier_reads_gray_and_other_sizes_and_rejects_bad_shapes():
    pytest.importorskip("sklearn")
    classifier = digits.load_digit_classifier("reward")
    images = digits.real_digit_images(5, split="judge")[:8]
    with torch.no_grad():
        logits = classifier(images)
        torch.testing.assert_close(classifier(images[:, :1]), logits)
        larger = torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
        assert classifier(larger).shape == (8, digits.NUM_CLASSES)
    assert (logits.argmax(-1) == 5).float().mean() >= 0.75
    with pytest.raises(ValueError, match="expected images"):
        classifier(images[:, :2])


def test_judge_features_are_the_penultimate_layer():
    pytest.importorskip("sklearn")
    images = digits.real_digit_images(0)[:5]
    features = digits.judge_features(images)
    feature_dim = json.loads(digits.classifier_path("judge").with_suffix(".json").read_text())["feature_dim"]
    assert features.shape == (5, feature_dim) and features.dtype == torch.float32
    judge = digits.load_digit_classifier("judge")
    with torch.no_grad():
        torch.testing.assert_close(judge.head(features), judge(images))


def test_prompts_and_missing_files_explain_themselves(tmp_path):
    assert digits.digit_prompt(7) == "a handwritten digit seven"
    assert digits.digit_prompt(None) == "a handwritten digit"
    with pytest.raises(ValueError, match=r"0\.\.9"):
        digits.digit_prompt(10)
    with pytest.raises(ValueError, match="which must be one of"):
        digits.load_digit_classifier("teacher")
    with pytest.raises(FileNotFoundError, match=r"train_tiny_digits\.py"):
        digits.DigitClassifier.from_file(tmp_path / "absent.safetensors")


def test_shipped_weights_stay_under_20_megabytes():
    total = sum(path.stat().st_size for path in digits.ASSETS_DIR.rglob("*") if path.is_file())
    assert total < 20 * 2**20
    assert RECORD["shipped_bytes_total"] < 20 * 2**20


def test_every_bundled_weight_loads_into_its_module():
    """A checkpoint key the loader does not expect is skipped with only a log line, leaving a random module: the text
    encoder saved by transformers 5 without its `text_model.` prefix loaded that way under transformers 4."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = digits.bundled_model_path()
    _, info = CLIPTextModel.from_pretrained(folder / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _, info = UNet2DConditionModel.from_pretrained(folder / "unet", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
