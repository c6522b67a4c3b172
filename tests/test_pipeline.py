"""DTSPipeline / DTSXLPipeline on tiny random-weight SD 1.x and SDXL pipelines, saved and loaded like hub models."""

import io
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback
from dts_diffusers.pipelines.timing import PhaseTimer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dts_diffusers import DTS, DTSPipeline, DTSPipelineOutput, DTSXLPipeline
from dts_diffusers.dfs import DepthFirstSearch
from dts_diffusers.engine import WIDENINGS
from dts_diffusers.noise import row_generators
from dts_diffusers.rewards import CallableReward
from dts_diffusers.schedulers import SchedulerTransition
from dts_diffusers.tree import PAPER_WIDENING, Widening

STEPS = 4
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def byte_level_characters() -> list[str]:
    """GPT-2's byte-to-unicode table: every byte is one printable character of the BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + i for i in range(256 - len(printable))]
    rest = iter(shifted)
    return [chr(b) if b in printable else chr(next(rest)) for b in range(256)]


def tiny_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (514 tokens, no merges) from files written here: no hub download, and the
    file constructor is the one transformers 4 and 5 both take (the lower-bounds job runs these tests on 4.46)."""
    chars = byte_level_characters()
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    folder = Path(tempfile.mkdtemp(prefix="dts-test-tokenizer-"))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def tiny_text_config(**extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=514, max_position_embeddings=16, **extra,
    )  # fmt: skip


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )  # fmt: skip


def tiny_sd() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )  # fmt: skip
    return StableDiffusionPipeline(
        unet=unet, scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1), vae=tiny_vae(),
        text_encoder=CLIPTextModel(tiny_text_config()), tokenizer=tiny_tokenizer(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def tiny_sdxl() -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    )  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(tiny_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(projection_dim=32)), tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULE, clip_sample=False),
        add_watermarker=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def xl_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl().save_pretrained(path)
    return path


@pytest.fixture
def pipe(sd_path):
    pipe = DTSPipeline.from_pretrained(sd_path)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_model_calls(pipe) -> dict[str, int]:
    """Forward calls of the text encoder(s), UNet and VAE decoder, counted by hooks ("before any model call")."""
    calls = {}
    modules = {"unet": pipe.unet, "vae": pipe.vae.decoder, "text_encoder": pipe.text_encoder}
    modules |= {"text_encoder_2": pipe.text_encoder_2} if getattr(pipe, "text_encoder_2", None) is not None else {}
    for name, module in modules.items():
        calls[name] = 0
        module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


class RecordingReward:
    """Mean brightness of the image, recording what it was given."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, list[str]]] = []
        self.vae_dtypes: list[torch.dtype] = []
        self.scores: list[float] = []
        self.pipe = None

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.calls.append((images.clone(), list(prompts)))
        if self.pipe is not None:
            self.vae_dtypes.append(self.pipe.vae.dtype)
        scores = images.mean(dim=(1, 2, 3))
        self.scores += scores.tolist()
        return scores


def run(pipe, **kwargs) -> DTSPipelineOutput:
    arguments = {
        "prompt": "a red square",
        "reward": RecordingReward(),
        "num_inference_steps": STEPS,
        "nfe_budget": 24,
        "branch_every": 2,
        "rollout_batch_size": 3,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "np",
    }
    return pipe(**{**arguments, **kwargs})


def test_from_pretrained_call_honours_budget_and_counts(pipe):
    assert type(pipe) is DTSPipeline
    out = run(pipe, output_type="pil", nfe_budget=30)
    assert isinstance(out, DTSPipelineOutput)
    assert len(out.images) == 1 and isinstance(out.images[0], PIL.Image.Image) and out.images[0].size == (16, 16)
    assert 0 < out.nfe <= 30
    assert out.unet_evals == 2 * out.nfe  # classifier-free guidance: two UNet rows per guided step
    stats = out.trees[0].stats()
    assert out.reward_calls == stats["reward_evals"] + stats["guide_evals"]  # the leaves, and x̂_0 of new nodes
    assert stats["reward_evals"] == stats["leaves"] >= out.nfe // STEPS  # every rollout reaches x_0, most from below
    assert out.rewards.dtype == torch.float32 and out.rewards.shape == (1,)
    assert set(out.timings) >= {"engine", "denoise", "unet", "vae_decode", "reward", "total"}
    assert out.timings["unet"] <= out.timings["denoise"] <= out.timings["total"]


def test_arguments_after_the_prompt_are_keyword_only(pipe):
    with pytest.raises(TypeError, match="positional"):
        pipe("a red square", 16)  # StableDiffusionPipeline's `height`: never mistaken for the reward


def test_without_guidance_one_unet_row_per_nfe(pipe):
    out = run(pipe, guidance_scale=1.0)
    assert out.unet_evals == out.nfe > 0


@pytest.mark.parametrize(
    "argument",
    [
        {"negative_prompt": "blurry"},
        {"guidance_rescale": 0.7},
        {"guidance_scale": 3.0},
        {
            "prompt": None,
            "prompt_embeds": torch.randn(1, 16, 32),
            "negative_prompt_embeds": torch.randn(1, 16, 32),
            "reward_prompt": "a blue circle",
        },
    ],
)
def test_stable_diffusion_arguments_take_effect(pipe, argument):
    baseline = run(pipe, output_type="latent")
    reward = RecordingReward()
    changed = run(pipe, output_type="latent", reward=reward, **argument)
    assert changed.images.shape == baseline.images.shape
    assert not torch.allclose(changed.images, baseline.images)
    scored_against = argument.get("reward_prompt", "a red square")
    assert reward.calls and {p for _, prompts in reward.calls for p in prompts} == {scored_against}


def test_progress_bar_counts_nfe_and_follows_its_config(pipe):
    log = io.StringIO()
    pipe.set_progress_bar_config(file=log, ascii=True)
    out = run(pipe, prompt=["a", "b"], nfe_budget=12)
    assert out.nfe == 24 and "24/24" in log.getvalue()


def test_budget_not_a_multiple_of_the_rollout_cost_reports_what_was_spent(pipe):
    """A best-of-N sample costs STEPS = 4 NFE, so a budget of 14 buys 3 (12 NFE): the output and the bar say so."""
    log = io.StringIO()
    pipe.set_progress_bar_config(file=log, ascii=True)
    out = run(pipe, prompt=["a", "b"], nfe_budget=14, method="best-of-n")
    spent = [tree.nfe for tree in out.trees]
    assert out.nfe == sum(spent) == sum(tree.stats()["nfe"] for tree in out.trees) == 24 and spent == [12, 12]
    final = log.getvalue().split("\r")[-1]
    assert f"{out.nfe}/{out.nfe}" in final and "100%" in final


def test_bounded_latent_cache_replays_evicted_latents(pipe):
    bound = 4 * 8 * 8 * 4 * 3  # three float32 latents
    unbounded = run(pipe, nfe_budget=40, num_images_per_prompt=3, output_type="latent")
    out = run(pipe, latent_cache_bytes=bound, nfe_budget=40, num_images_per_prompt=3, output_type="latent")
    stats = out.trees[0].stats()
    assert stats["stored_latent_bytes"] <= bound < unbounded.trees[0].stats()["stored_latent_bytes"]
    assert stats["replayed_nfe"] > 0 and out.unet_evals == 2 * (out.nfe + stats["replayed_nfe"])  # evicted, replayed
    assert unbounded.trees[0].stats()["replayed_nfe"] == 0 and unbounded.unet_evals == 2 * unbounded.nfe
    assert out.nfe == unbounded.nfe and stats["nodes"] == unbounded.trees[0].stats()["nodes"]
    # replays run the evicted rows in other batches: the same images to float rounding
    torch.testing.assert_close(out.images, unbounded.images, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.rewards, unbounded.rewards)


def test_reward_gets_unit_float_images_and_the_prompts(pipe):
    reward = RecordingReward()
    out = run(pipe, prompt=["a cat", "a dog"], reward=reward, num_images_per_prompt=2, height=16, width=24)
    assert out.images.shape == (4, 16, 24, 3) and len(out.trees) == 2
    for images, prompts in reward.calls:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 24)
        assert images.min() >= 0 and images.max() <= 1
        assert prompts in ([prompts[0]] * len(prompts),) and prompts[0] in ("a cat", "a dog")
    assert {prompts[0] for _, prompts in reward.calls} == {"a cat", "a dog"}
    assert sum(len(prompts) for _, prompts in reward.calls) == out.reward_calls


def test_registered_reward_by_name(pipe):
    out = run(pipe, reward="jpeg-compressibility", mode="search", output_type="latent")
    assert out.rewards.dtype == torch.float32 and out.rewards[0] == out.trees[0].best()[1]


def test_same_generator_same_images(pipe):
    first, second = run(pipe), run(pipe)
    np.testing.assert_array_equal(first.images, second.images)
    other = run(pipe, generator=torch.Generator().manual_seed(1))
    assert not np.array_equal(first.images, other.images)


@pytest.mark.parametrize(
    ("output_type", "check"),
    [
        ("np", lambda x: isinstance(x, np.ndarray) and x.shape == (2, 16, 16, 3)),
        ("pt", lambda x: isinstance(x, torch.Tensor) and x.shape == (2, 3, 16, 16) and 0 <= x.min() <= x.max() <= 1),
        ("latent", lambda x: isinstance(x, torch.Tensor) and x.shape == (2, 4, 8, 8)),
        ("pil", lambda x: len(x) == 2 and all(isinstance(i, PIL.Image.Image) for i in x)),
    ],
)
def test_output_types(pipe, output_type, check):
    assert check(run(pipe, output_type=output_type, num_images_per_prompt=2).images)


@pytest.mark.parametrize(
    ("scheduler", "options"),
    [
        (DDPMScheduler, {}),
        (EulerAncestralDiscreteScheduler, {}),
        (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    ],
)
def test_each_stochastic_scheduler_is_used_as_is(pipe, scheduler, options, caplog):
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, **options)
    out = run(pipe, output_type="latent")
    assert torch.isfinite(out.images).all() and 0 < out.nfe <= 24
    assert "has no stochastic step" not in caplog.text


def test_deterministic_scheduler_switches_to_ddim_with_a_warning(sd_path, caplog):
    pipe = DTSPipeline.from_pretrained(sd_path)  # ships PNDM, which has no stochastic step
    pipe.set_progress_bar_config(disable=True)
    switched = run(pipe, output_type="latent")
    assert "PNDMScheduler has no stochastic step" in caplog.text
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    torch.testing.assert_close(run(pipe, output_type="latent").images, switched.images)


def test_ddim_eta_zero_raises(pipe):
    with pytest.raises(ValueError, match="eta > 0"):
        run(pipe, eta=0.0)


def test_continuing_a_tree_equals_one_call_with_the_whole_budget(pipe):
    first = run(pipe, nfe_budget=16, output_type="latent")
    continued = run(pipe, nfe_budget=16, tree=first.trees, output_type="latent")
    assert continued.trees[0] is first.trees[0]
    assert continued.trees[0].nfe == first.nfe + continued.nfe <= 32
    whole = run(pipe, nfe_budget=32, output_type="latent")
    assert continued.trees[0].stats()["nodes"] == whole.trees[0].stats()["nodes"]
    assert continued.trees[0].nfe == whole.trees[0].nfe
    # the same tree; its UNet batches may be composed differently, so the values agree to float rounding only
    assert continued.trees[0].best()[1] == pytest.approx(whole.trees[0].best()[1], abs=1e-5)


def test_search_mode_returns_the_best_leaf(pipe):
    reward = RecordingReward()
    out = run(pipe, mode="search", reward=reward, output_type="latent", nfe_budget=40)
    tree = out.trees[0]
    best_latent, best_reward = tree.best()
    torch.testing.assert_close(out.images, best_latent)
    # the reward also scores every new node's x̂_0 (its guide); the best leaf is the best of the rollouts' x_0 scores
    leaves = tree.tree.value_np[: tree.tree.size][
        (tree.tree.level_np[: tree.tree.size] == 0) & tree.tree.done_np[: tree.tree.size]
    ]
    assert len(reward.scores) == tree.reward_evals + tree.guide_evals
    assert out.rewards[0].item() == pytest.approx(leaves.max()) == pytest.approx(best_reward)


def test_search_mode_counts_distinct_images_and_warns_when_the_tree_is_short(pipe):
    out = run(pipe, mode="search", output_type="latent", nfe_budget=40, num_images_per_prompt=3)
    assert out.distinct_samples == [3] and len({tuple(x.flatten().tolist()) for x in out.images}) == 3
    with pytest.warns(UserWarning, match="search asked for 3 samples but the tree has only 1 leaves"):
        short = run(pipe, mode="search", output_type="latent", nfe_budget=STEPS, num_images_per_prompt=3)
    assert short.distinct_samples == [1] and short.images.shape[0] == 3
    assert run(pipe, method="smc", num_images_per_prompt=2).distinct_samples is None


@pytest.mark.parametrize(
    ("method", "widening", "expected"),
    [("dts", "default", WIDENINGS["default"]), ("dts", "paper", PAPER_WIDENING),
     ("dts-paper", "default", PAPER_WIDENING), ("dts*-paper", Widening.uniform(1.0, 0.5), Widening.uniform(1.0, 0.5))],
)  # fmt: skip
def test_widening_default_keeps_the_method_own(pipe, method, widening, expected):
    out = run(pipe, method=method, widening=widening, output_type="latent")
    assert out.trees[0].widening == expected


def test_baseline_method_under_the_same_budget(pipe):
    out = run(pipe, method="smc", nfe_budget=24, num_images_per_prompt=2)
    assert out.nfe == 24 and out.images.shape[0] == 2 and out.unet_evals == 2 * 24


def test_best_of_n_scores_only_final_images(pipe):
    out = run(pipe, method="best-of-n", nfe_budget=24)
    assert out.reward_calls == 24 // STEPS


def test_bf16_on_cpu(pipe):
    pipe.to(torch.bfloat16)
    out = run(pipe, output_type="latent")
    assert out.images.dtype == torch.bfloat16 and torch.isfinite(out.images.float()).all()
    assert out.rewards.dtype == torch.float32


def test_callback_interrupts_with_the_best_so_far(pipe):
    seen = []

    def stop_after_first_batch(pipeline, step, nfe, tensors):
        seen.append((step, nfe, tensors["latents"].shape))
        pipeline._interrupt = True
        return {}

    out = run(pipe, nfe_budget=200, callback_on_step_end=stop_after_first_batch, output_type="latent")
    assert seen == [(0, out.nfe, (1, 4, 8, 8))]
    assert out.nfe < 200 and out.images.shape == (1, 4, 8, 8)


def test_from_pipe_to_and_scheduler_swap(sd_path):
    plain = StableDiffusionPipeline.from_pretrained(sd_path)
    pipe = DTSPipeline.from_pipe(plain).to("cpu")
    assert type(pipe) is DTSPipeline and pipe.unet is plain.unet
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert run(pipe).images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"nfe_budget": STEPS - 1}, ValueError, "below one rollout"),
        ({"lam": -1.0}, ValueError, "lam must be a finite number >= 0"),
        ({"lam": float("nan")}, ValueError, r"lam must be a finite number >= 0 \(got nan\)"),
        ({"lam": float("inf")}, ValueError, r"greedy limit \(lam=inf\) use mode='search'"),
        ({"num_images_per_prompt": 0}, ValueError, "num_images_per_prompt must be >= 1"),
        ({"num_images_per_prompt": 1.0}, TypeError, "num_images_per_prompt must be an integer"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be >= 1"),
        ({"eta": -0.5}, ValueError, "eta must be a finite number > 0"),
        ({"eta": float("nan")}, ValueError, "eta must be a finite number > 0"),
        ({"nfe_budget": True}, TypeError, "nfe_budget must be an integer .got bool"),
        ({"nfe_budget": 16.0}, TypeError, "nfe_budget must be an integer"),
        ({"rollout_batch_size": np.int64(0)}, ValueError, "rollout_batch_size must be >= 1"),
        ({"guidance_scale": float("inf")}, ValueError, "guidance_scale must be a finite number"),
        ({"output_type": "jpg"}, ValueError, "output_type must be one of pil, np, pt, latent"),
        ({"height": -16}, ValueError, "height must be >= 1"),
        ({"prompt": None, "prompt_embeds": torch.randn(16, 32)}, ValueError, r"prompt_embeds must be shaped \[prompts"),
        ({"prompt": []}, ValueError, "non-empty list of strings"),
        ({"generator": [torch.Generator()] * 3, "num_images_per_prompt": 3}, ValueError, "not one per image"),
        ({"generator": [torch.Generator(), torch.Generator()]}, ValueError, "one per prompt"),
        ({"generator": 0}, TypeError, "generator must be a torch.Generator"),
        ({"callback_on_step_end": SDCFGCutoffCallback(cutoff_step_ratio=0.5)}, ValueError, "PipelineCallback classes"),
        ({"callback_on_step_end": MultiPipelineCallbacks([])}, ValueError, "fn.pipe, step, nfe, callback_kwargs"),
        ({"callback_on_step_end": "stop"}, TypeError, "callback_on_step_end must be callable"),
        ({"branch_levels": [STEPS + 1]}, ValueError, "branch levels must lie in 1..num_steps"),
        ({"height": 15}, ValueError, r"divisible by 2 \(the VAE scale factor 2"),
        ({"latents": torch.zeros(1, 4, 8, 8)}, ValueError, "latents= is not supported"),
        ({"ip_adapter_image": PIL.Image.new("RGB", (8, 8))}, ValueError, "IP-Adapter"),
        ({"timesteps": [999, 500]}, ValueError, "custom schedules"),
        ({"no_such_argument": 1}, TypeError, "unexpected keyword argument 'no_such_argument'"),
        ({"mode": "best"}, ValueError, "mode must be"),
        ({"widening": "wide"}, ValueError, "widening must be a Widening or one of default, paper"),
        ({"method_options": {"widening": "paper"}}, ValueError, "set outside method_options: use widening="),
        ({"reward": None}, ValueError, "reward is required"),
        ({"reward": "no-such-reward"}, ValueError, "unknown reward 'no-such-reward'"),
        ({"callback_on_step_end_tensor_inputs": ["prompt_embeds"]}, ValueError, "only 'latents'"),
        ({"method": "dfs", "method_options": {"no_such": 1}}, ValueError, "has no option no_such; it takes"),
        ({"method": "dfs", "method_options": {"seed": 1}}, ValueError, "set outside method_options: use generator="),
        ({"method": "dfs", "method_options": {"local_search_steps": 1}}, ValueError, "differentiable=True"),
    ],
)
def test_bad_input_raises_a_clear_error(pipe, kwargs, error, match):
    calls = count_model_calls(pipe)
    with pytest.raises(error, match=match):
        run(pipe, **kwargs)
    assert calls == dict.fromkeys(calls, 0)  # every argument is checked before the first model call


def test_numpy_integer_budget_is_an_integer(pipe):
    as_numpy = run(pipe, nfe_budget=np.int64(16), rollout_batch_size=np.int32(3), num_images_per_prompt=np.int16(2))
    np.testing.assert_array_equal(as_numpy.images, run(pipe, nfe_budget=16, num_images_per_prompt=2).images)
    assert 16 - STEPS < as_numpy.nfe <= 16  # the budget, to within one rollout


def test_sdxl_from_pretrained_decodes_in_float32_when_the_vae_is_fp16(xl_path):
    pipe = DTSXLPipeline.from_pretrained(xl_path)
    pipe.set_progress_bar_config(disable=True)
    reward = RecordingReward()
    out = run(pipe, reward=reward, num_images_per_prompt=2)
    assert out.images.shape == (2, 16, 16, 3) and out.unet_evals == 2 * out.nfe
    assert {p for _, prompts in reward.calls for p in prompts} == {"a red square"}
    pipe.vae.to(torch.float16)
    reward.pipe = pipe
    run(pipe, reward=reward, output_type="latent")
    assert set(reward.vae_dtypes) == {torch.float32}
    assert pipe.vae.dtype == torch.float16


def test_sdxl_same_generator_same_images(xl_path):
    pipe = DTSXLPipeline.from_pretrained(xl_path)
    pipe.set_progress_bar_config(disable=True)
    first = run(pipe, output_type="latent")
    torch.testing.assert_close(first.images, run(pipe, output_type="latent").images, atol=0, rtol=0)
    other = run(pipe, output_type="latent", generator=torch.Generator().manual_seed(1))
    assert (first.images - other.images).abs().max() > 0.1  # the generator seeds the tree: another seed, other images


def test_dfs_backtracks_within_the_budget(pipe):
    out = run(pipe, method="dfs", nfe_budget=40, num_images_per_prompt=2, output_type="latent")
    search = out.trees[0]
    assert isinstance(search, DepthFirstSearch) and search.eval_levels == [4, 2]
    assert 0 < out.nfe == search.nfe <= 40 and out.unet_evals == 2 * out.nfe
    assert search.backtracks > 0 and search.stats()["running"] == 0
    assert out.images.shape == (2, 4, 8, 8) and torch.isfinite(out.images).all()


def test_local_search_differentiates_the_reward_through_the_vae(pipe):
    with_gradient = []

    def brightness(images, prompts):
        with_gradient.append(images.requires_grad)
        return images.mean(dim=(1, 2, 3))

    reward = CallableReward(brightness)
    reward.differentiable = True
    options = {"local_search_steps": 1, "local_search_step_size": 0.5}
    out = run(pipe, method="bfs", reward=reward, nfe_budget=24, method_options=options, output_type="latent")
    assert out.nfe == 24 and out.trees[0].stats()["particles"] == 24 // (STEPS + 2)  # one more NFE per evaluation
    assert with_gradient.count(True) == 2  # one ascent per evaluation level, through the VAE decoder
    assert torch.isfinite(out.images).all()


def tiny_clip_reward(directory) -> CallableReward:
    """The CLIP score (a prompt-conditioned reward) on a tiny random CLIP saved to `directory`."""
    from test_rewards_models import save_tiny_clip

    from dts_diffusers.rewards import load_reward

    save_tiny_clip(directory, seed=0)
    return load_reward("clip", pretrained_model_name_or_path=directory)


def prompts_seen(reward) -> list[str]:
    return [prompt for _, prompts in reward.calls for prompt in prompts]


@pytest.mark.parametrize("kind", ["clip", "callable"])
def test_prompt_conditioned_reward_with_prompt_embeds_needs_the_prompt_text(pipe, tmp_path, kind):
    reward = tiny_clip_reward(tmp_path) if kind == "clip" else CallableReward(RecordingReward(), needs_prompts=True)
    assert reward.needs_prompts
    embeds = {"prompt": None, "prompt_embeds": torch.randn(1, 16, 32), "negative_prompt_embeds": torch.randn(1, 16, 32)}
    calls = count_model_calls(pipe)
    with pytest.raises(ValueError, match=r"scores images against their prompt.*pass reward_prompt="):
        run(pipe, reward=reward, **embeds)
    assert calls == dict.fromkeys(calls, 0)
    out = run(pipe, reward=reward, reward_prompt="a cat", output_type="pt", **embeds)
    if kind == "callable":
        assert set(prompts_seen(reward.fn)) == {"a cat"}
    else:  # the returned rewards are the CLIP scores of the images for "a cat", not for ""
        torch.testing.assert_close(reward(out.images, ["a cat"]), out.rewards, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(reward(out.images, [""]), out.rewards, atol=1e-3)
    assert out.trees[0].built_for["prompt"] == "a cat"


def test_reward_prompt_overrides_the_prompt_and_must_match_the_batch(pipe):
    reward = RecordingReward()
    run(pipe, prompt=["a", "b"], reward=reward, reward_prompt=["a cat", "a dog"], nfe_budget=8)
    assert set(prompts_seen(reward)) == {"a cat", "a dog"}
    with pytest.raises(ValueError, match="reward_prompt has 1 prompts for 2"):
        run(pipe, prompt=["a", "b"], reward_prompt=["a cat"])
    with pytest.raises(TypeError, match="reward_prompt must be a string or a list of strings"):
        run(pipe, reward_prompt=3)


def use_ddpm(pipe):
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return {}


TREE_MISMATCHES = [
    ("prompt", {"prompt": "a blue circle"}, "'a red square' then, 'a blue circle' now"),
    ("mode", {"mode": "search"}, "'sample' then, 'search' now"),
    ("method", {"method": "dts-paper"}, "'dts' then, 'dts-paper' now"),
    ("guidance_scale", {"guidance_scale": 3.0}, "7.5 then, 3.0 now"),
    ("height", {"height": 24}, "16 then, 24 now"),
    ("width", {"width": 8}, "16 then, 8 now"),
    ("scheduler", use_ddpm, "'DDIMScheduler' then, 'DDPMScheduler' now"),
    ("num_inference_steps", {"num_inference_steps": STEPS + 2}, f"{STEPS} then, {STEPS + 2} now"),
    ("eta", {"eta": 0.5}, "1.0 then, 0.5 now"),
    ("lam", {"lam": 2.0}, "1.0 then, 2.0 now"),
    ("rollout_batch_size", {"rollout_batch_size": 2}, "3 then, 2 now"),
]


@pytest.mark.parametrize(("field", "change", "values"), TREE_MISMATCHES, ids=[m[0] for m in TREE_MISMATCHES])
def test_continuing_a_tree_with_other_arguments_names_the_field(pipe, field, change, values):
    first = run(pipe, nfe_budget=8, output_type="latent")
    before = first.trees[0].stats()
    change = change(pipe) if callable(change) else change
    calls = count_model_calls(pipe)
    with pytest.raises(ValueError, match=rf"tree\[0\] was built with other arguments: .*{field}={re.escape(values)}"):
        run(pipe, nfe_budget=8, tree=first.trees, output_type="latent", **change)
    assert calls == dict.fromkeys(calls, 0) and first.trees[0].stats()["nodes"] == before["nodes"]


def test_tree_not_built_by_a_pipeline_call_is_refused(pipe):
    engine_tree = DTS(lambda n, g: torch.zeros(n, 1), lambda x, level, g, return_x0=False: x, lambda x: x[:, 0], STEPS)
    with pytest.raises(ValueError, match=r"tree\[0\] \(DTS\) was not built by a DTS pipeline call"):
        run(pipe, tree=[engine_tree])


def test_interrupt_keeps_every_prompt_and_says_which_were_cut_short(pipe):
    prompts = ["a cat", "a dog", "a cow"]
    nfe_seen = []

    def stop_in_the_second_prompt(pipeline, step, nfe, tensors):
        if nfe_seen and nfe < nfe_seen[-1]:  # the second tree's first batch
            pipeline._interrupt = True
        nfe_seen.append(nfe)
        return tensors

    kwargs = {"prompt": prompts, "num_images_per_prompt": 2, "output_type": "latent"}
    out = run(pipe, callback_on_step_end=stop_in_the_second_prompt, **kwargs)
    assert out.interrupted == [False, True, True]
    full, cut, empty = (tree.nfe for tree in out.trees)
    assert 24 - STEPS < full <= 24 and 0 < cut == nfe_seen[-1] < 24 and empty == 0
    assert out.nfe == full + cut and out.images.shape == (4, 4, 8, 8)  # the trees that hold samples, in prompt order
    assert out.distinct_samples[2] == 0 and [t.built_for["prompt"] for t in out.trees] == prompts

    continued = run(pipe, tree=out.trees, **kwargs)
    assert continued.interrupted == [False] * 3 and continued.images.shape == (6, 4, 8, 8)
    assert all(new is old for new, old in zip(continued.trees, out.trees, strict=True))
    whole = run(pipe, **kwargs)  # the empty tree was seeded like an uninterrupted call's third tree
    assert continued.trees[2].nfe == whole.trees[2].nfe
    assert continued.trees[2].stats()["nodes"] == whole.trees[2].stats()["nodes"]
    assert continued.trees[2].best()[1] == pytest.approx(whole.trees[2].best()[1], abs=1e-5)


def test_callback_returning_new_latents_is_refused(pipe):
    def replace_latents(pipeline, step, nfe, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])}

    with pytest.raises(ValueError, match="returned new 'latents': the DTS pipelines cannot apply returned tensors"):
        run(pipe, callback_on_step_end=replace_latents)
    with pytest.raises(TypeError, match="callback_on_step_end returned list"):
        run(pipe, callback_on_step_end=lambda *args: [])
    assert run(pipe, callback_on_step_end=lambda pipeline, step, nfe, tensors: tensors).nfe > 0
    assert run(pipe, callback_on_step_end=lambda *args: None).nfe > 0


def test_return_dict_false_returns_what_the_parent_pipeline_returns(pipe, xl_path):
    images, nsfw = run(pipe, return_dict=False)
    np.testing.assert_array_equal(images, run(pipe).images)
    assert nsfw is None  # no safety checker in the tiny pipeline, as StableDiffusionPipeline would return
    xl = DTSXLPipeline.from_pretrained(xl_path)
    xl.set_progress_bar_config(disable=True)
    returned = run(xl, return_dict=False, output_type="latent")
    assert isinstance(returned, tuple) and len(returned) == 1  # StableDiffusionXLPipeline returns (images,)
    torch.testing.assert_close(returned[0], run(xl, output_type="latent").images, atol=0, rtol=0)


def test_one_generator_per_prompt_seeds_each_tree(pipe):
    seeds = [torch.Generator().manual_seed(s) for s in (0, 7)]
    pair = run(pipe, prompt=["a cat", "a dog"], generator=seeds, output_type="latent")
    alone = run(pipe, prompt="a cat", output_type="latent")  # the same generator (seed 0) for the first prompt
    torch.testing.assert_close(pair.images[:1], alone.images, atol=1e-4, rtol=1e-4)
    dog = run(pipe, prompt="a dog", generator=torch.Generator().manual_seed(7), output_type="latent")
    torch.testing.assert_close(pair.images[1:], dog.images, atol=1e-4, rtol=1e-4)


def test_rows_do_not_depend_on_batch_composition_through_the_unet(pipe):
    """A row's step through the real UNet, CFG and scheduler is the same alone or in a batch (to float rounding of
    differently sized batches), and its noise comes from its own generator only."""
    negative, positive = pipe.encode_prompt("a red square", "cpu", 1, True)[::-1]
    conditioning = {"encoder_hidden_states": torch.cat([negative, positive])}
    pipe._guidance_scale, pipe._guidance_rescale, pipe._cross_attention_kwargs = 7.5, 0.0, None
    denoise = pipe._denoiser(conditioning, PhaseTimer(pipe.device), {"unet_evals": 0})
    transition = SchedulerTransition(pipe.scheduler, denoise, STEPS)
    x = transition.prior((4, 8, 8))(3, row_generators([1, 2, 3]))
    together, x0_together = transition(x, STEPS, row_generators([4, 5, 6]), return_x0=True)
    alone, x0_alone = transition(x[1:2], STEPS, row_generators([5]), return_x0=True)
    torch.testing.assert_close(together[1:2], alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0_together[1:2], x0_alone, atol=1e-4, rtol=1e-4)
    other_noise = transition(x[1:2], STEPS, row_generators([4]))
    assert (other_noise - alone).abs().max() > 1e-2  # the tolerance is far below what another row's noise changes


def test_clip_skip_takes_effect_or_says_why_not(pipe, xl_path):
    xl = DTSXLPipeline.from_pretrained(xl_path)
    xl.set_progress_bar_config(disable=True)
    assert not torch.allclose(run(xl, output_type="latent").images, run(xl, output_type="latent", clip_skip=1).images)
    with pytest.raises(ValueError, match="clip_skip must be below the text encoder's 2 layers"):
        run(xl, clip_skip=2)
    if hasattr(pipe.text_encoder, "text_model"):
        assert not torch.allclose(
            run(pipe, output_type="latent").images, run(pipe, output_type="latent", clip_skip=1).images
        )
    else:  # transformers 5's CLIPTextModel has no text_model, which StableDiffusionPipeline.encode_prompt reads
        with pytest.raises(ValueError, match=r"clip_skip= needs CLIPTextModel\.text_model"):
            run(pipe, clip_skip=1)


def test_left_out_steps_and_guidance_come_from_the_model_folder_as_for_the_cli(tmp_path):
    """One set of defaults per model: the bundled model's dts_defaults.json is what `dts generate` reads too."""
    from dts_diffusers import cli, digits
    from dts_diffusers.defaults import STABLE_DIFFUSION, model_defaults

    bundled = DTSPipeline.from_pretrained(digits.bundled_model_path())
    bundled.set_progress_bar_config(disable=True)
    out = bundled(digits.digit_prompt(3), reward=lambda images, prompts: images.mean((1, 2, 3)), nfe_budget=40)
    built = out.trees[0].built_for
    assert (built["num_inference_steps"], built["guidance_scale"]) == (cli.BUNDLED.steps, cli.BUNDLED.guidance_scale)
    assert (cli.BUNDLED.steps, cli.BUNDLED.guidance_scale) == (20, 1.0)
    assert out.nfe == 40  # two whole rollouts of 20 steps, not a part of a 50-step one
    assert model_defaults("stable-diffusion-v1-5/stable-diffusion-v1-5") == STABLE_DIFFUSION == cli.ANY_MODEL
    (tmp_path / "dts_defaults.json").write_text('{"steps": 30, "colour": "red"}')
    with pytest.raises(ValueError, match="unknown run defaults \\['colour'\\]"):
        model_defaults(tmp_path)
