"""DTSSD3Pipeline on a tiny random-weight Stable Diffusion 3, saved and loaded like a hub model."""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from test_pipeline import RecordingReward, tiny_text_config, tiny_tokenizer
from transformers import CLIPTextModelWithProjection

from dts_diffusers import METHODS, DTSPipelineOutput, DTSSD3Pipeline
from dts_diffusers.schedulers import FlowTransition

STEPS = 4


def tiny_sd3() -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=1,
        sample_size=16, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection(tiny_text_config(projection_dim=32)), tokenizer=tiny_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(projection_dim=32)), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3().save_pretrained(path)
    return path


def load(path) -> DTSSD3Pipeline:
    return DTSSD3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)  # SD3 without its T5 encoder


@pytest.fixture(scope="module")
def pipe(sd3_path):
    pipe = load(sd3_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs) -> DTSPipelineOutput:
    arguments = {
        "prompt": "a red square",
        "reward": RecordingReward(),
        "num_inference_steps": STEPS,
        "guidance_scale": 4.0,
        "nfe_budget": 16,
        "branch_every": 2,
        "rollout_batch_size": 4,
        "max_sequence_length": 8,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "np",
    }
    return pipe(**{**arguments, **kwargs})


@pytest.mark.parametrize("mode", ["sample", "search"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_in_both_modes_stays_within_the_budget(pipe, method, mode):
    out = run(pipe, method=method, mode=mode, num_images_per_prompt=2, output_type="latent")
    assert type(pipe) is DTSSD3Pipeline and isinstance(out, DTSPipelineOutput)
    assert 0 < out.nfe <= 16 and out.unet_evals == 2 * out.nfe  # CFG: two transformer rows per guided step
    assert out.images.shape == (2, 4, 8, 8) and torch.isfinite(out.images).all()
    assert out.rewards.shape == (2,) and out.rewards.dtype == torch.float32


def test_transitions_are_flow_steps_and_images_decode_at_full_size(pipe):
    out = run(pipe, output_type="pil", num_images_per_prompt=3)
    assert len(out.images) == 3 and all(image.size == (16, 16) for image in out.images)
    assert isinstance(out.trees[0].transition, FlowTransition)
    assert out.trees[0].built_for["scheduler"] == "FlowMatchEulerDiscreteScheduler"


def test_same_generator_same_images_other_seed_other_images(pipe):
    first, second = run(pipe), run(pipe)
    np.testing.assert_array_equal(first.images, second.images)
    other = run(pipe, generator=torch.Generator().manual_seed(1))
    assert not np.array_equal(first.images, other.images)


def test_the_prompt_reaches_the_transformer_and_prompt_embeds_give_the_same_images(pipe):
    first = run(pipe, output_type="latent")
    assert not torch.equal(run(pipe, prompt="a blue circle", output_type="latent").images, first.images)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a red square", None, None, max_sequence_length=8, negative_prompt=""
    )
    from_embeds = run(
        pipe, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled, output_type="latent",
    )  # fmt: skip
    torch.testing.assert_close(from_embeds.images, first.images)


def test_decoding_undoes_the_vae_scaling_and_shift_factor(pipe):
    latents = run(pipe, output_type="latent").images
    images = run(pipe, output_type="pt").images
    config = pipe.vae.config
    decoded = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor, return_dict=False)[0]
    torch.testing.assert_close(images, pipe.image_processor.postprocess(decoded.detach(), output_type="pt"))


def test_without_guidance_one_transformer_row_per_nfe(pipe):
    out = run(pipe, guidance_scale=1.0)
    assert out.unet_evals == out.nfe > 0


@pytest.mark.parametrize(
    ("eta", "match"), [(0.0, "eta must be a finite number > 0"), (1.5, r"eta must lie in \(0, 1\]")]
)
def test_bad_eta_raises_before_any_model_runs(pipe, eta, match):
    with pytest.raises(ValueError, match=match):
        run(pipe, eta=eta)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"skip_guidance_layers": [0]}, "skip-layer guidance"),
        ({"latents": torch.zeros(1, 4, 8, 8)}, "latents= is not supported"),
        ({"mu": 1.0}, "mu= is not supported"),
        ({"joint_attention_kwargs": 3}, "joint_attention_kwargs must be a dict"),
        ({"prompt": None, "prompt_embeds": torch.randn(1, 4, 16)}, r"joint_attention_dim"),
    ],
)
def test_unsupported_arguments_raise(pipe, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        run(pipe, **kwargs)


def test_a_scheduler_without_flow_sigmas_raises(sd3_path):
    pipe = load(sd3_path)
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match=r"FlowMatchEulerDiscreteScheduler\.from_config"):
        run(pipe)


def test_continuing_a_tree_equals_one_call_with_the_whole_budget(pipe):
    first = run(pipe, output_type="latent")
    continued = run(pipe, tree=first.trees, output_type="latent")
    assert continued.trees[0] is first.trees[0]
    whole = run(pipe, nfe_budget=32, output_type="latent")
    assert continued.trees[0].nfe == first.nfe + continued.nfe == whole.trees[0].nfe <= 32
    assert continued.trees[0].stats()["nodes"] == whole.trees[0].stats()["nodes"]
    assert continued.trees[0].best()[1] == pytest.approx(whole.trees[0].best()[1], abs=1e-5)
    with pytest.raises(ValueError, match=r"eta=1\.0 then, 0\.5 now"):
        run(pipe, tree=first.trees, eta=0.5)


def test_callback_interrupts_and_return_dict_false_returns_what_the_parent_returns(pipe):
    seen = []

    def stop(pipeline, step, nfe, tensors):
        seen.append((step, nfe, tensors["latents"].shape))
        pipeline._interrupt = True

    out = run(pipe, nfe_budget=200, callback_on_step_end=stop, output_type="latent")
    assert seen == [(0, out.nfe, (1, 4, 8, 8))] and out.nfe < 200 and out.interrupted == [True]
    images = run(pipe, return_dict=False)
    assert isinstance(images, tuple) and len(images) == 1 and images[0].shape == (1, 16, 16, 3)
