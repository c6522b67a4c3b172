"""DTSFluxPipeline on a tiny random-weight FLUX.1, saved and loaded like a hub model."""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from test_pipeline import RecordingReward, tiny_text_config, tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from dts_diffusers import METHODS, DTSFluxPipeline, DTSPipelineOutput
from dts_diffusers.schedulers import FlowTransition

STEPS = 4
SIZE = 32  # pixels: 4x4 latents with the VAE's factor 8, 2x2 = 4 packed tokens


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A character-level T5 tokenizer (unigram, one piece per printable character) built here: no hub download."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0), *((chr(c), -1.0) for c in range(33, 127))]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0)  # fmt: skip


def tiny_flux_transformer(guidance_embeds: bool = True) -> FluxTransformer2DModel:
    """16 latent channels packed 2x2 into 64; guidance_embeds: guidance-distilled (FLUX.1-dev) or not (schnell)."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds,
    )  # fmt: skip


def tiny_flux(vae_blocks: int = 4) -> FluxPipeline:
    """FLUX.1-dev's architecture at toy size: a guidance-distilled transformer, a VAE of factor 8 (2 ** (vae_blocks -
    1)) with FLUX's scaling and shift and no attention, and FLUX's dynamically shifted schedule."""
    torch.manual_seed(0)
    transformer = tiny_flux_transformer()
    vae = AutoencoderKL(
        block_out_channels=(4,) * vae_blocks, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks, up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        norm_num_groups=1, mid_block_add_attention=False,
        sample_size=SIZE, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=98, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=1,
                 relative_attention_num_buckets=8)
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(tiny_text_config()),
        tokenizer=tiny_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=tiny_t5_tokenizer(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-flux")
    tiny_flux().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(flux_path):
    pipe = DTSFluxPipeline.from_pretrained(flux_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs) -> DTSPipelineOutput:
    arguments = {
        "prompt": "a red square",
        "reward": RecordingReward(),
        "num_inference_steps": STEPS,
        "guidance_scale": 3.5,
        "nfe_budget": 16,
        "branch_every": 2,
        "rollout_batch_size": 4,
        "height": SIZE,
        "width": SIZE,
        "max_sequence_length": 16,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "np",
    }
    return pipe(**{**arguments, **kwargs})


TRUE_CFG = {"negative_prompt": "blurry", "true_cfg_scale": 2.0}
SHORT_NEGATIVE = {  # 8 tokens against the prompt's 16
    "negative_prompt_embeds": torch.randn(1, 8, 32),
    "negative_pooled_prompt_embeds": torch.randn(1, 32),
    "true_cfg_scale": 2.0,
}


@pytest.mark.parametrize("mode", ["sample", "search"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_in_both_modes_stays_within_the_budget(pipe, method, mode):
    out = run(pipe, method=method, mode=mode, num_images_per_prompt=2, output_type="latent")
    assert type(pipe) is DTSFluxPipeline and isinstance(out, DTSPipelineOutput)
    assert 0 < out.nfe <= 16 and out.unet_evals == out.nfe  # guidance is embedded: one transformer row per NFE
    assert out.images.shape == (2, 4, 4, 4) and torch.isfinite(out.images).all()  # unpacked, as the tree holds them
    assert out.rewards.shape == (2,) and out.rewards.dtype == torch.float32


def test_true_cfg_costs_two_transformer_rows_per_nfe_and_changes_the_images(pipe):
    guided = run(pipe, **TRUE_CFG, output_type="latent")
    assert 0 < guided.nfe <= 16 and guided.unet_evals == 2 * guided.nfe
    assert not torch.equal(guided.images, run(pipe, output_type="latent").images)
    unguided = run(pipe, negative_prompt="blurry", true_cfg_scale=1.0, output_type="latent")  # the parent's rule:
    assert unguided.unet_evals == unguided.nfe  # true CFG needs true_cfg_scale > 1 and a negative prompt


@pytest.mark.parametrize("guidance", [{}, TRUE_CFG], ids=["embedded-guidance", "true-cfg"])
def test_one_step_equals_flux_pipeline_from_the_same_noise(pipe, guidance):
    """With one step the tree's single transition is FluxPipeline's Euler step from σ = 1: the same x_T gives the
    same x_0, so packing, position ids, the timestep's scale, the guidance input and true CFG all agree. The image
    is not square, so that rows and columns cannot be swapped unseen."""
    size = {"height": SIZE, "width": 2 * SIZE}
    inputs = []
    hook = pipe.transformer.register_forward_pre_hook(lambda _, args, kwargs: inputs.append(kwargs), with_kwargs=True)
    try:
        out = run(pipe, num_inference_steps=1, nfe_budget=1, rollout_batch_size=1, output_type="latent", **size,
                  **guidance)  # fmt: skip
        noise = inputs[0]["hidden_states"][-1:]  # x_T, packed (the last row is the prompt's with true CFG)
        parent = FluxPipeline(**pipe.components)
        parent.set_progress_bar_config(disable=True)
        packed = parent(
            "a red square", latents=noise, num_inference_steps=1, guidance_scale=3.5, max_sequence_length=16,
            output_type="latent", **size, **guidance,
        ).images  # fmt: skip
    finally:
        hook.remove()
    assert out.nfe == 1 and len(inputs) == 1 + (2 if guidance else 1)  # one batched call; the parent makes two
    ours, parents = inputs[0], inputs[1]
    for name in ("timestep", "guidance"):  # one value per row
        torch.testing.assert_close(ours[name], parents[name].expand_as(ours[name]))
    for name in ("txt_ids", "img_ids"):
        torch.testing.assert_close(ours[name], parents[name])
    expected = parent._unpack_latents(packed, *size.values(), parent.vae_scale_factor)
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=1e-5)


def test_the_schedule_is_flux_pipelines_shifted_for_the_image_size(pipe):
    out = run(pipe, output_type="pil", num_images_per_prompt=3)
    assert len(out.images) == 3 and all(image.size == (SIZE, SIZE) for image in out.images)
    transition = out.trees[0].transition
    assert isinstance(transition, FlowTransition) and out.trees[0].built_for["latent_shape"] == (4, 4, 4)
    parent = FluxPipeline(**pipe.components)
    parent.set_progress_bar_config(disable=True)
    for size in (SIZE, 4 * SIZE):  # 4 and 64 packed tokens: mu grows with the sequence length
        sigmas = run(pipe, height=size, width=size, nfe_budget=STEPS, output_type="latent").trees[0].transition.sigmas
        parent("a red square", num_inference_steps=STEPS, height=size, width=size, max_sequence_length=16,
               output_type="latent")  # fmt: skip
        np.testing.assert_allclose(sigmas, parent.scheduler.sigmas.numpy(), rtol=1e-6)
    assert sigmas != transition.sigmas


def test_a_schnell_like_model_has_no_guidance_input_and_steps_on_the_unshifted_schedule(pipe):
    torch.manual_seed(0)
    components = {"transformer": tiny_flux_transformer(guidance_embeds=False),
                  "scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0)}  # fmt: skip
    schnell = DTSFluxPipeline(**{**pipe.components, **components})
    schnell.set_progress_bar_config(disable=True)
    first = run(schnell, output_type="latent")
    torch.testing.assert_close(run(schnell, guidance_scale=1.0, output_type="latent").images, first.images)
    assert first.trees[0].transition.sigmas == [1.0, 0.75, 0.5, 0.25, 0.0]  # FluxPipeline's linspace(1, 1/N, N)
    assert schnell._fill_run_defaults(None, None) == (4, 0.0)  # FLUX.1-schnell's 4 steps, not FLUX.1-dev's 28 / 3.5
    assert pipe._fill_run_defaults(None, None) == (28, 3.5)


def test_same_generator_same_images_other_seed_other_images(pipe):
    first, second = run(pipe), run(pipe)
    np.testing.assert_array_equal(first.images, second.images)
    other = run(pipe, generator=torch.Generator().manual_seed(1))
    assert not np.array_equal(first.images, other.images)


def test_the_prompt_and_the_guidance_reach_the_transformer_and_prompt_embeds_give_the_same_images(pipe):
    first = run(pipe, output_type="latent")
    assert not torch.equal(run(pipe, prompt="a blue circle", output_type="latent").images, first.images)
    assert not torch.equal(run(pipe, guidance_scale=1.0, output_type="latent").images, first.images)
    embeds, pooled, _ = pipe.encode_prompt("a red square", None, max_sequence_length=16)
    from_embeds = run(pipe, prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, output_type="latent")
    torch.testing.assert_close(from_embeds.images, first.images)
    negative, negative_pooled, _ = pipe.encode_prompt("blurry", None, max_sequence_length=16)
    guided = run(
        pipe, prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
        negative_pooled_prompt_embeds=negative_pooled, true_cfg_scale=2.0, output_type="latent",
    )  # fmt: skip
    torch.testing.assert_close(guided.images, run(pipe, **TRUE_CFG, output_type="latent").images)


def test_one_negative_prompt_serves_every_prompt(pipe):
    out = run(pipe, prompt=["a red square", "a blue circle"], output_type="latent", nfe_budget=8, **TRUE_CFG)
    assert out.images.shape == (2, 4, 4, 4) and out.unet_evals == 2 * out.nfe


def test_decoding_undoes_the_vae_scaling_and_shift_factor(pipe):
    latents = run(pipe, output_type="latent").images
    images = run(pipe, output_type="pt").images
    config = pipe.vae.config
    decoded = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor, return_dict=False)[0]
    torch.testing.assert_close(images, pipe.image_processor.postprocess(decoded.detach(), output_type="pt"))


def test_left_out_steps_and_guidance_are_fluxs_defaults(pipe):
    out = run(pipe, num_inference_steps=None, guidance_scale=None, nfe_budget=None, rollout_batch_size=1)
    built_for = out.trees[0].built_for
    assert (built_for["num_inference_steps"], built_for["guidance_scale"]) == (28, 3.5) and out.nfe == 28


@pytest.mark.parametrize(
    ("eta", "match"), [(0.0, "eta must be a finite number > 0"), (1.5, r"eta must lie in \(0, 1\]")]
)
def test_bad_eta_raises_before_any_model_runs(pipe, eta, match):
    with pytest.raises(ValueError, match=match):
        run(pipe, eta=eta)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latents": torch.zeros(1, 4, 64)}, "latents= is not supported"),
        ({"sigmas": [1.0, 0.5]}, "sigmas= is not supported"),
        ({"negative_ip_adapter_image_embeds": [torch.zeros(1, 1, 32)]}, "IP-Adapter is not supported"),
        ({"joint_attention_kwargs": 3}, "joint_attention_kwargs must be a dict"),
        ({"prompt": None, "prompt_embeds": torch.randn(1, 4, 16)}, r"joint_attention_dim"),
        ({"height": 40}, r"divisible by 16 .*e\.g\. 32x32"),
        ({"true_cfg_scale": float("nan")}, "true_cfg_scale must be a finite number"),
        (SHORT_NEGATIVE, "the negative embeddings must have the prompt embeddings' shapes"),
    ],
)
def test_unsupported_arguments_raise(pipe, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        run(pipe, **kwargs)


def test_a_scheduler_without_flow_sigmas_raises(flux_path):
    pipe = DTSFluxPipeline.from_pretrained(flux_path)
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
    with pytest.raises(ValueError, match=r"true_cfg_scale=1\.0 then, 2\.0 now"):
        run(pipe, tree=first.trees, **TRUE_CFG)


def test_callback_interrupts_and_return_dict_false_returns_what_the_parent_returns(pipe):
    seen = []

    def stop(pipeline, step, nfe, tensors):
        seen.append((step, nfe, tensors["latents"].shape))
        pipeline._interrupt = True

    out = run(pipe, nfe_budget=200, callback_on_step_end=stop, output_type="latent")
    assert seen == [(0, out.nfe, (1, 4, 4, 4))] and out.nfe < 200 and out.interrupted == [True]
    images = run(pipe, return_dict=False)
    assert isinstance(images, tuple) and len(images) == 1 and images[0].shape == (1, SIZE, SIZE, 3)
