"""The `dts` command: outputs, record consistency, errors, atomic writes, and sharding invariance.

Most tests run a tiny random-weight SD pipeline saved here with the weight-free `jpeg-compressibility` reward; the
default run (no --model) uses the bundled digits model, as a new user's first command does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dts_diffusers import cli

BIN = Path(sys.executable).parent
QUIET_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SMALL_RUN = ["--steps", "10", "--nfe-budget", "60", "--num-images", "3", "--device", "cpu"]
JPEG = ["--reward", "jpeg-compressibility", "--prompt", "a red square"]
RUN_FILE = "unrelated.txt"


def tiny_sd() -> StableDiffusionPipeline:
    """SD 1.x architecture at toy size: a character-level tokenizer, 2-layer CLIP text encoder, 8x8 latents."""
    torch.manual_seed(0)
    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [" "]
    tokens = ["<|startoftext|>", "<|endoftext|>", *characters, *(c + "</w>" for c in characters)]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=32)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokens), max_position_embeddings=32,
        )
    )  # fmt: skip
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd().save_pretrained(path)
    return str(path)


def run_dts(*arguments: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*launcher, "-m", "dts_diffusers.cli"] if launcher else [str(BIN / "dts")]
    return subprocess.run([*command, *arguments], capture_output=True, text=True, env=QUIET_ENV, timeout=300)


def check_record(out: Path, budget: int, num_images: int) -> dict:
    record = json.loads((out / "record.json").read_text())
    assert record["nfe"] <= budget and record["nfe"] == record["tree"]["nfe"]
    if record["arguments"]["method"] in cli.ANYTIME_METHODS:
        assert record["nfe_this_run"] == record["nfe"]  # the curve grew the same tree, at no extra cost
    else:
        assert record["nfe_this_run"] >= record["nfe"]  # a fresh population per point of the curve
    assert record["unet_evals"] >= record["nfe"]  # one UNet row per NFE, two with classifier-free guidance
    assert len(record["rewards"]) == len(record["images"]) == num_images
    assert all(value <= record["tree"]["best_reward"] + 1e-6 for value in record["rewards"])
    assert set(cli.VERSIONED_PACKAGES) <= set(record["versions"])
    curve = record["curve"]
    assert [point["nfe"] for point in curve] == sorted(point["nfe"] for point in curve)
    assert curve[-1]["nfe"] == record["nfe"]
    first = Image.open(out / record["images"][0])
    assert all(Image.open(out / name).size == first.size for name in record["images"])
    assert Image.open(out / "grid.png").size == (num_images * first.width, first.height)
    assert Image.open(out / "reward_vs_nfe.png").size[0] > 100
    assert not list(out.parent.glob(".*partial"))
    return record


def test_default_generate_runs_the_bundled_digits_model(tmp_path):
    out = tmp_path / "run"
    result = run_dts("generate", "--out", str(out), "--checkpoints", "3", *SMALL_RUN)
    assert result.returncode == 0, result.stderr
    assert "NFE" in result.stderr  # the progress bar goes to stderr
    record = check_record(out, budget=60, num_images=3)
    assert record["reward"] == "digit-classifier" and record["digit"] == cli.DEFAULT_DIGIT
    best = [point["best_reward"] for point in record["curve"]]
    assert best == sorted(best)  # one tree keeps growing, so its best reward never drops


@pytest.mark.parametrize("method", ["dts", "dts-paper", "smc"])
def test_generate_on_a_model_folder(tmp_path, model, method):
    out = tmp_path / method
    assert cli.main(["generate", "--out", str(out), "--model", model, "--method", method, *JPEG, *SMALL_RUN]) == 0
    record = check_record(out, budget=60, num_images=3)
    assert record["model"] == model and record["settings"]["guidance_scale"] > 1
    assert record["unet_evals"] == 2 * record["nfe_this_run"]  # classifier-free guidance: 2 UNet rows per NFE
    assert [point["nfe"] for point in record["curve"]] == [10, 30, 60]  # 60, 30 and 15 NFE, whole rollouts only


def test_search_mode_draws_the_best_leaves(tmp_path, model):
    out = tmp_path / "search"
    arguments = ["generate", "--out", str(out), "--model", model, "--mode", "search", "--checkpoints", "1"]
    assert cli.main([*arguments, *JPEG, *SMALL_RUN]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["rewards"][0] == pytest.approx(record["tree"]["best_reward"], abs=1e-5)
    assert record["rewards"] == sorted(record["rewards"], reverse=True)


def test_search_mode_default_budget_gives_four_leaves_per_image(tmp_path, model, recwarn):
    out = tmp_path / "search"
    arguments = ["generate", "--out", str(out), "--model", model, "--mode", "search", "--steps", "5"]
    assert cli.main([*arguments, "--num-images", "6", "--checkpoints", "5", "--device", "cpu", *JPEG]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["settings"]["nfe_budget"] == 4 * 6 * 5  # above the 16 rollouts of sample mode
    assert record["tree"]["leaves"] >= 4 * 6 and record["tree"]["last_draw_distinct"] == 6
    pixels = {Image.open(out / name).tobytes() for name in record["images"]}
    assert len(pixels) == 6
    assert not [w for w in recwarn if "search asked for" in str(w.message)]  # early curve points stay quiet


def test_widening_flag_reaches_the_tree(tmp_path, model):
    out = tmp_path / "paper"
    arguments = ["generate", "--out", str(out), "--model", model, "--widening", "paper", "--checkpoints", "1"]
    assert cli.main([*arguments, *JPEG, *SMALL_RUN]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["arguments"]["widening"] == "paper" and record["settings"]["nfe_budget"] == 60


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "MODEL", "--reward", "no-such-reward", "--prompt", "x"], "unknown reward"),
        (["--model", "./missing/sd-model", "--prompt", "a cat", "--reward", "clip"], "huggingface-cli download"),
        (["--nfe-budget", "5"], "below one rollout"),
        (["--lam", "-1"], "--lam 0 samples the base model"),
        (["--digit", "12"], "--digit must be 0..9"),
        (["--model", "owner/model", "--prompt", "a cat"], "--reward is required with --model"),
    ],
)
def test_bad_arguments_fail_with_a_message_and_write_nothing(tmp_path, capsys, model, arguments, message):
    arguments = [model if argument == "MODEL" else argument for argument in arguments]
    assert cli.main(["generate", "--out", str(tmp_path / "run"), "--steps", "10", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_model_folder_without_model_index_is_explained(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    arguments = ["generate", "--out", str(tmp_path / "run"), "--model", str(tmp_path / "weights"), *JPEG]
    assert cli.main(arguments) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys, model):
    out = tmp_path / "run"
    arguments = ["generate", "--out", str(out), "--model", model, "--checkpoints", "1", *JPEG, *SMALL_RUN]
    assert cli.main(arguments) == 0
    assert (out / cli.RUN_MARKER).is_file()  # every folder dts writes is marked as its own
    (out / "image-00.png").write_bytes(b"stale")
    assert cli.main(arguments) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "image-00.png").read_bytes() == b"stale"
    assert cli.main([*arguments, "--overwrite"]) == 0  # a folder an earlier `dts generate` wrote is replaced
    assert (out / "image-00.png").read_bytes() != b"stale" and (out / cli.RUN_MARKER).is_file()
    check_record(out, budget=60, num_images=3)


def test_overwrite_refuses_a_folder_dts_did_not_write(tmp_path, capsys, model):
    out = tmp_path / "mine"
    (out / "notes").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (out / "notes" / "a.txt").write_text("also mine")
    arguments = ["generate", "--out", str(out), "--model", model, "--checkpoints", "1", *JPEG, *SMALL_RUN]
    assert cli.main([*arguments, "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert str(out) in error and cli.RUN_MARKER in error and "delete it yourself" in error
    assert (out / "keep.txt").read_text() == "mine" and (out / "notes" / "a.txt").read_text() == "also mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine"]  # no staging folder left either


@pytest.mark.parametrize("where", [".", "..", "../.."])
def test_overwrite_refuses_the_working_directory_and_its_parents(tmp_path, capsys, monkeypatch, where):
    cwd = tmp_path / "a" / "b" / "work"
    cwd.mkdir(parents=True)
    (cwd / RUN_FILE).write_text("unrelated")
    (cwd / cli.RUN_MARKER).write_text("even a marker does not make the working directory replaceable")
    monkeypatch.chdir(cwd)
    assert cli.main(["generate", "--out", where, "--overwrite", "--steps", "10", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "current directory" in error and "delete it yourself" in error
    assert (cwd / RUN_FILE).read_text() == "unrelated"
    assert sorted(path.name for path in tmp_path.rglob("*")) == sorted(["a", "b", "work", RUN_FILE, cli.RUN_MARKER])


def test_overwrite_refuses_the_filesystem_root_and_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "documents").mkdir(parents=True)
    (home / cli.RUN_MARKER).write_text("")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(cli.CLIError, match=r"home folder; choose an empty or new folder, or delete it yourself"):
        cli.check_out_folder(home, overwrite=True)
    with pytest.raises(cli.CLIError, match=r"delete it yourself"):  # the root is also a parent of the cwd
        cli.check_out_folder(Path(tmp_path.anchor), overwrite=True)
    assert (home / "documents").is_dir()


def test_a_failure_mid_run_leaves_nothing_half_written(tmp_path, monkeypatch, model):
    def broken_plot(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cli, "save_curve_plot", broken_plot)
    arguments = ["generate", "--out", str(tmp_path / "run"), "--model", model, "--checkpoints", "1", *JPEG]
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main([*arguments, *SMALL_RUN])
    assert list(tmp_path.iterdir()) == []


def test_prompt_files_take_lines_and_json_lines(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a cat\n\n{"prompt": "a handwritten digit", "digit": 3}\n')
    assert cli.read_prompts(prompts) == [{"prompt": "a cat"}, {"prompt": "a handwritten digit", "digit": 3}]
    prompts.write_text('{"digit": 3}\n')
    with pytest.raises(cli.CLIError, match='needs a "prompt"'):
        cli.read_prompts(prompts)


def test_two_process_batch_matches_one_process(tmp_path, model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green line\n")
    common = ["batch", "--prompts", str(prompts), "--model", model, "--reward", "jpeg-compressibility"]
    common += ["--steps", "8", "--nfe-budget", "32", "--num-images", "2", "--device", "cpu", "--seed", "5"]
    single = run_dts(*common, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29517"]
    sharded = run_dts(*common, "--out", str(tmp_path / "two"), launcher=launcher)
    assert sharded.returncode == 0, sharded.stderr

    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert all((tmp_path / name / cli.RUN_MARKER).is_file() for name in ("one", "two"))
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert one["records"] == two["records"]
    assert [r["seed"] for r in one["records"]] == [5, 6, 7]
    assert len({tuple(r["rewards"]) for r in one["records"]}) == 3  # prompts and seeds differ, so results do
    for index in range(3):
        a, b = (json.loads((tmp_path / n / "records" / f"prompt-{index:05d}.json").read_text()) for n in ("one", "two"))
        assert {**a["tree"], "timings": None} == {**b["tree"], "timings": None}
        for image in a["images"]:
            assert (tmp_path / "one" / image).read_bytes() == (tmp_path / "two" / image).read_bytes()


def test_sdxl_model_index_selects_the_xl_pipeline(tmp_path, model):
    from dts_diffusers import DTSPipeline, DTSXLPipeline

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert cli.pipeline_class_for(str(tmp_path)) is DTSXLPipeline
    assert cli.pipeline_class_for(model) is DTSPipeline
