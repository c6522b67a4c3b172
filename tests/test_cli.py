"""The `dts` command: outputs, record consistency, errors, atomic writes, batch resume and locking, and sharding
invariance.

Most tests run a tiny random-weight SD pipeline saved here with the weight-free `jpeg-compressibility` reward; the
default run (no --model) uses the bundled digits model, as a new user's first command does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from test_pipeline import tiny_tokenizer
from test_pipeline_flux import tiny_flux
from test_pipeline_sd3 import tiny_sd3
from transformers import CLIPTextConfig, CLIPTextModel

from dts_diffusers import cli

BIN = Path(sys.executable).parent
QUIET_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SMALL_RUN = ["--steps", "10", "--nfe-budget", "60", "--num-images", "3", "--device", "cpu"]
JPEG = ["--reward", "jpeg-compressibility", "--prompt", "a red square"]
RUN_FILE = "unrelated.txt"
BUNDLED_BUDGET = cli.BUNDLED.rollouts * cli.BUNDLED.steps


def tiny_sd() -> StableDiffusionPipeline:
    """SD 1.x architecture at toy size: a byte-level character tokenizer, 2-layer CLIP text encoder, 8x8 latents."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(max_length=32)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=32,
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
    columns = min(num_images, 8)
    assert Image.open(out / "grid.png").size == (columns * first.width, -(-num_images // columns) * first.height)
    assert Image.open(out / "reward_vs_nfe.png").size[0] > 100
    assert not list(out.parent.glob(".*partial"))
    base = record["base"]  # the λ = 0 reference: best-of-N at the same budget and seed
    assert base["method"] == "best-of-n" and base["nfe"] <= budget and len(base["rewards"]) == num_images
    steps = record["settings"]["steps"]  # each spends the budget to within one rollout (rollouts of unequal cost)
    assert base["nfe"] > budget - steps and record["nfe"] > budget - steps
    assert Image.open(out / "comparison.png").size[0] >= 512
    return record


def test_default_generate_runs_the_bundled_digits_model(tmp_path):
    out = tmp_path / "run"
    result = run_dts("generate", "--out", str(out), "--checkpoints", "3", *SMALL_RUN)
    assert result.returncode == 0, result.stderr
    assert "NFE" in result.stderr  # the progress bar goes to stderr
    record = check_record(out, budget=60, num_images=3)
    assert record["reward"] == "digit-classifier" and record["digit"] == cli.BUNDLED.digit
    best = [point["best_reward"] for point in record["curve"]]
    assert best == sorted(best)  # one tree keeps growing, so its best reward never drops
    assert "held-out judge reads a 3" in result.stdout


def test_the_first_command_shows_steering_beat_the_base_model(tmp_path, capsys):
    """`dts generate --out DIR` alone: the bundled task where the base model fails often enough to see DTS help."""
    out = tmp_path / "first"
    assert cli.main(["generate", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = check_record(out, budget=BUNDLED_BUDGET, num_images=cli.BUNDLED.num_images)
    assert record["settings"]["nfe_budget"] == BUNDLED_BUDGET and record["settings"]["guidance_scale"] == 1.0
    assert record["digit"] == cli.BUNDLED.digit and record["prompt"] == "a handwritten digit three"
    judge = record["judge_accuracy"]
    assert judge["base"] <= 0.6 and judge["steered"] >= judge["base"] + 0.25  # measured: 0.38 -> 0.75
    assert f"base {judge['base']:.0%} -> steered {judge['steered']:.0%}" in printed
    assert record["tree"]["best_reward"] >= record["base"]["best_reward"] - 1e-3
    assert sum(record["rewards"]) > sum(record["base"]["rewards"])
    comparison = Image.open(out / "comparison.png")
    first = Image.open(out / record["images"][0])
    rows = 2 * -(-cli.BUNDLED.num_images // 8)  # base above steered, 8 a row
    assert comparison.width >= 8 * cli.COMPARISON_CELL and comparison.height >= rows * cli.COMPARISON_CELL
    assert first.width * (cli.COMPARISON_CELL // first.width) >= cli.COMPARISON_CELL
    assert len(record["base"]["curve"]) == len(record["curve"])  # best-of-N's curve: the plot's reference
    assert record["timings"]["wall"] < 60


def test_the_plot_is_skipped_with_a_warning_when_matplotlib_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "run"
    assert cli.main(["generate", "--out", str(out), "--checkpoints", "2", *SMALL_RUN]) == 0
    error = capsys.readouterr().err
    assert "dts: warning: skipped reward_vs_nfe.png (matplotlib is not installed" in error
    record = json.loads((out / "record.json").read_text())
    assert record["plot"] is None and not (out / "reward_vs_nfe.png").exists()
    assert all((out / name).is_file() for name in [*record["images"], "grid.png", "comparison.png"])


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
        (["--model", "./missing/sd-model", "--prompt", "a cat", "--reward", "clip"], "--model ./missing/sd-model: no "),
        (["--nfe-budget", "5"], "below one rollout"),
        (["--nfe-budget", "0"], "--nfe-budget must be a whole number >= 1 (got 0)"),
        (["--nfe-budget", "-20"], "--nfe-budget must be a whole number >= 1 (got -20)"),
        (["--steps", "0"], "--steps must be a whole number >= 1 (got 0)"),
        (["--num-images", "0"], "--num-images must be a whole number >= 1 (got 0)"),
        (["--rollout-batch-size", "0"], "--rollout-batch-size must be a whole number >= 1 (got 0)"),
        (["--branch-every", "0"], "--branch-every must be a whole number >= 1 (got 0)"),
        (["--checkpoints", "0"], "--checkpoints must be a whole number >= 1"),
        (["--lam", "-1"], "--lam 0 samples the base model"),
        (["--lam", "nan"], "--lam must be a finite number >= 0 (got nan)"),
        (["--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
        (["--digit", "12"], "--digit must be 0..9"),
        (["--model", "owner/model", "--prompt", "a cat"], "--reward is required with --model"),
        (["--reward-option", "no_such=1"], "the digit-classifier reward takes no option no_such"),
        (["--reward", "jpeg-compressibility", "--reward-model", "x"], "--reward-model: the jpeg-compressibility"),
    ],
)
def test_bad_arguments_fail_with_a_message_and_write_nothing(tmp_path, capsys, monkeypatch, model, arguments, message):
    monkeypatch.setattr(cli, "load_pipeline", never_called)  # every check comes before any model loads
    arguments = [model if argument == "MODEL" else argument for argument in arguments]
    assert cli.main(["generate", "--out", str(tmp_path / "run"), "--steps", "10", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def never_called(*args, **kwargs):
    raise AssertionError("called although the arguments were already known to be wrong")


def test_out_naming_an_existing_file_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_pipeline", never_called)
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["generate", "--out", str(tmp_path / "notes.txt")]) == 2
    assert "--out" in (error := capsys.readouterr().err) and "exists and is not a folder; choose" in error
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_help_shows_every_default(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    options = re.split(r"\n  (?=-)", text.split("options:")[1])[1:]  # one block per option
    assert len(options) > 20
    for block in options:
        if not block.startswith("-h"):
            assert "(default" in block or "(required)" in block, block
    assert "(default: 20 with the bundled model; with --model the model family's, e.g. 50 for Stable Diffusion" in (
        " ".join(text.split())
    )


@pytest.mark.parametrize(
    ("alias", "method"), [("dts-star", "dts*"), ("dts-star-paper", "dts*-paper"), ("dts*", "dts*")]
)
def test_dts_star_needs_no_shell_quoting(alias, method):
    assert cli.build_parser().parse_args(["generate", "--out", "x", "--method", alias]).method == method


def test_generate_warns_when_the_prompt_and_the_digit_disagree(capsys):
    def target(*arguments: str) -> tuple[str, int | None]:
        args = cli.build_parser().parse_args(["generate", "--out", "x", *arguments])
        return cli.generate_target(args, cli.reward_name(args))

    assert target() == ("a handwritten digit three", 3) and capsys.readouterr().err == ""
    assert target("--prompt", "a handwritten digit five") == ("a handwritten digit five", 5)
    assert capsys.readouterr().err == ""
    assert target("--prompt", "a handwritten digit 5", "--digit", "3") == ("a handwritten digit 5", 3)
    assert "names digit 5 but --digit is 3; the reward steers toward 3" in capsys.readouterr().err
    assert target("--prompt", "a cat") == ("a cat", cli.BUNDLED.digit)
    assert "names no digit" in capsys.readouterr().err
    with pytest.raises(cli.CLIError, match="names digits 3, 5; pass --digit"):
        target("--prompt", "a 3 or a 5")


def test_batch_maps_each_prompt_to_the_digit_reward_or_refuses_it(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a handwritten digit 3\n{"prompt": "a handwritten digit", "digit": 7}\nthe number nine\n')
    args = cli.build_parser().parse_args(["batch", "--prompts", str(prompts), "--out", "x"])
    targets = cli.batch_targets(cli.read_prompts(prompts), args, "digit-classifier")
    assert [target["digit"] for target in targets] == [3, 7, 9]

    monkeypatch.setattr(cli, "load_pipeline", never_called)
    for text, message in [
        ("a handwritten digit 3\na cat\n", ":2: the prompt 'a cat' names no digit"),
        ('{"prompt": "a handwritten digit 5", "digit": 3}\n', 'names digit 5 but its "digit" is 3'),
        ('{"prompt": "a digit", "digit": 12}\n', '"digit" must be a whole number 0..9'),
    ]:
        prompts.write_text(text)
        assert cli.main(["batch", "--prompts", str(prompts), "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "run").exists()
    prompts.write_text("a cat\n")
    arguments = ["batch", "--prompts", str(prompts), "--out", "x", "--digit", "4"]
    assert (
        cli.batch_targets(cli.read_prompts(prompts), cli.build_parser().parse_args(arguments), "digit-classifier")[0][
            "digit"
        ]
        == 4
    )  # --digit serves the prompts that name none


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
    def broken_grid(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cli, "save_grid", broken_grid)
    arguments = ["generate", "--out", str(tmp_path / "run"), "--model", model, "--checkpoints", "1", *JPEG]
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main([*arguments, *SMALL_RUN])
    assert list(tmp_path.iterdir()) == []


def test_prompt_files_take_lines_and_json_lines(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a cat\n\n{"prompt": "a handwritten digit", "digit": 3}\n')
    expected = [{"prompt": "a cat", "line": 1}, {"prompt": "a handwritten digit", "digit": 3, "line": 3}]
    assert cli.read_prompts(prompts) == expected
    prompts.write_text('{"digit": 3}\n')
    with pytest.raises(cli.CLIError, match='needs a "prompt"'):
        cli.read_prompts(prompts)


def test_two_process_batch_matches_one_process(tmp_path, model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green line\n")
    common = ["batch", "--prompts", str(prompts), "--model", model, "--reward", "jpeg-compressibility"]
    common += ["--steps", "8", "--nfe-budget", "32", "--num-images", "2", "--seed", "5"]
    single = run_dts(*common, "--device", "cpu", "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29517"]
    sharded = run_dts(
        *common, "--out", str(tmp_path / "two"), launcher=launcher
    )  # as the README writes it: no --device
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stdout.count("wrote ") == 1  # the main process, once summary.json is there

    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert all((tmp_path / name / cli.RUN_MARKER).is_file() for name in ("one", "two"))
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert one["records"] == two["records"]
    assert [r["seed"] for r in one["records"]] == [5, 6, 7]
    assert len({tuple(r["rewards"]) for r in one["records"]}) == 3  # prompts and seeds differ, so results do
    for index in range(3):
        a, b = (json.loads((tmp_path / n / f"prompt-{index:05d}" / "record.json").read_text()) for n in ("one", "two"))
        assert {**a["tree"], "timings": None} == {**b["tree"], "timings": None}
        for image in a["images"]:
            assert (tmp_path / "one" / image).read_bytes() == (tmp_path / "two" / image).read_bytes()


def test_sdxl_model_index_selects_the_xl_pipeline(tmp_path, model):
    from dts_diffusers import DTSPipeline, DTSXLPipeline

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert cli.pipeline_class_for(str(tmp_path)) is DTSXLPipeline
    assert cli.pipeline_class_for(model) is DTSPipeline


FAMILIES = [
    ("StableDiffusionPipeline", "DTSPipeline", "STABLE_DIFFUSION"),
    ("StableDiffusionXLPipeline", "DTSXLPipeline", "STABLE_DIFFUSION_XL"),
    ("StableDiffusion3Pipeline", "DTSSD3Pipeline", "STABLE_DIFFUSION_3"),
    ("FluxPipeline", "DTSFluxPipeline", "FLUX"),
]


@pytest.mark.parametrize(("class_name", "pipeline", "family"), FAMILIES)
def test_model_index_picks_the_pipeline_and_its_run_defaults(tmp_path, class_name, pipeline, family):
    import dts_diffusers
    from dts_diffusers import defaults

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    assert cli.pipeline_class_for(str(tmp_path)) is getattr(dts_diffusers, pipeline)
    args = cli.build_parser().parse_args(["generate", "--out", "x", "--model", str(tmp_path)])
    assert cli.defaults_for(args) == getattr(defaults, family)
    (tmp_path / defaults.DEFAULTS_FILE).write_text(json.dumps({"steps": 3, "why": "a test"}))
    assert cli.defaults_for(args) == dataclasses.replace(getattr(defaults, family), steps=3)  # the folder's own


def test_a_flux_folder_without_guidance_input_gets_schnells_defaults(tmp_path):
    from dts_diffusers import defaults

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": False}))
    args = cli.build_parser().parse_args(["generate", "--out", "x", "--model", str(tmp_path)])
    assert cli.defaults_for(args) == defaults.FLUX_SCHNELL  # 4 steps, not FLUX.1-dev's 28
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": True}))
    assert cli.defaults_for(args) == defaults.FLUX


def test_an_unknown_pipeline_class_names_the_supported_ones_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_pipeline", never_called)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(cli.CLIError, match="names KandinskyPipeline, which no DTS pipeline loads"):
        cli.pipeline_class_for(str(tmp_path))
    arguments = ["generate", "--out", str(tmp_path / "run"), "--model", str(tmp_path), *JPEG]
    assert cli.main(arguments) == 2
    error = capsys.readouterr().err
    assert all(f"{name} ({pipeline})" in error for name, pipeline, _ in FAMILIES)


def test_a_hub_id_not_downloaded_yet_gets_its_familys_defaults_from_its_model_index(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import HfApi, constants

    from dts_diffusers import defaults

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, **kwargs: asked.append((repo_id, "model_info")))

    def fetch(repo_id, filename, **options):  # the Hub's answer: FLUX.1-schnell's model_index.json and transformer
        asked.append((repo_id, filename))
        path = tmp_path / "snapshot" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        content = {"_class_name": "FluxPipeline"} if filename == "model_index.json" else {"guidance_embeds": False}
        path.write_text(json.dumps(content))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetch)
    args = cli.build_parser().parse_args(["generate", "--out", "x", "--model", "owner/flux-model"])
    assert cli.defaults_for(args) == defaults.FLUX_SCHNELL  # 4 steps, guidance 0: not Stable Diffusion's 50 and 7.5
    assert cli.run_settings(args)["steps"] == 4
    assert asked[:3] == [("owner/flux-model", f) for f in ("model_info", "model_index.json", "transformer/config.json")]


def test_a_hub_id_whose_model_index_cannot_be_had_gets_stable_diffusions_defaults(no_hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi

    args = cli.build_parser().parse_args(["generate", "--out", "x", "--model", "owner/flux-model"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.defaults_for(args) == cli.ANY_MODEL  # offline: nothing asked of the Hub (no_hub fails any request)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, **kwargs: None)  # the Hub knows the id
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)  # but the file does not come
    assert cli.defaults_for(args) == cli.ANY_MODEL


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3().save_pretrained(path)  # without its T5 encoder: model_index.json says [null, null]
    return str(path)


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-flux")
    tiny_flux(vae_blocks=2).save_pretrained(path)  # FLUX's default 128x128 latents decode to 256x256, not 1024x1024
    (path / "dts_defaults.json").write_text(json.dumps({"steps": 4, "why": "a tiny model: short rollouts"}))
    return str(path)


def test_generate_on_a_tiny_sd3_folder_uses_sd3s_defaults(tmp_path, sd3_model):
    out = tmp_path / "sd3"
    arguments = ["--nfe-budget", "56", "--num-images", "2", "--checkpoints", "1", "--device", "cpu", *JPEG]
    assert cli.main(["generate", "--out", str(out), "--model", sd3_model, *arguments]) == 0
    record = check_record(out, budget=56, num_images=2)
    assert (record["settings"]["steps"], record["settings"]["guidance_scale"]) == (28, 7.0)  # SD 3's, not SD's
    assert record["unet_evals"] == 2 * record["nfe_this_run"]  # classifier-free guidance: 2 transformer rows per NFE
    assert Image.open(out / record["images"][0]).size == (16, 16)


def test_generate_on_a_tiny_flux_folder_uses_fluxs_and_the_folders_defaults(tmp_path, flux_model):
    out = tmp_path / "flux"
    arguments = ["--nfe-budget", "8", "--num-images", "2", "--checkpoints", "1", "--device", "cpu", *JPEG]
    assert cli.main(["generate", "--out", str(out), "--model", flux_model, *arguments]) == 0
    record = check_record(out, budget=8, num_images=2)
    assert (record["settings"]["steps"], record["settings"]["guidance_scale"]) == (4, 3.5)  # the folder's, FLUX's
    assert record["unet_evals"] == record["nfe_this_run"]  # guidance is the transformer's input: 1 row per NFE
    assert Image.open(out / record["images"][0]).size == (256, 256)


# -------------------------------------------------------------------------------------------------------------------
# where weights come from: errors at once, naming the CLI's flags
# -------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache, and every way to the Hub failing the test if taken."""
    import huggingface_hub
    from huggingface_hub import constants

    from dts_diffusers.rewards import hub

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for module, name in [
        (huggingface_hub, "hf_hub_download"),
        (huggingface_hub, "snapshot_download"),
        (hub, "hf_hub_download"),
    ]:
        monkeypatch.setattr(module, name, never_called)
    monkeypatch.setattr(cli, "load_pipeline", never_called)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "owner/not-cached", "--reward", "jpeg-compressibility"], "--model owner/not-cached: not in the"),
        (["--model", "MODEL", "--reward", "clip"], "--reward-model openai/clip-vit-large-patch14: not in the Hugging"),
        (["--model", "MODEL", "--reward", "clip", "--reward-model", "~/no/such/clip"], "no such folder: "),
        (["--model", "./no/such/model", "--reward", "clip"], "--model ./no/such/model: no such folder: "),
    ],
)
def test_offline_sources_fail_at_once_naming_the_flag(tmp_path, capsys, monkeypatch, model, no_hub, arguments, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arguments = [model if argument == "MODEL" else argument for argument in arguments]
    assert cli.main(["generate", "--out", str(tmp_path / "run"), "--prompt", "a cat", *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and "pretrained_model_name_or_path" not in error
    if "not in the" in message:
        assert "HF_HUB_OFFLINE is set" in error and ("hf download" in error or "pass them with --reward-model" in error)


def test_a_partly_cached_hub_model_offline_names_the_download(tmp_path, capsys, monkeypatch, model):
    """HF_HUB_OFFLINE with a snapshot that holds model_index.json but no weights (an interrupted download): the error
    says that part is missing and how to get the rest, not only diffusers' file-not-found."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--owner--partial-sd" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    shutil.copy(Path(model) / "model_index.json", snapshot)
    (cache / "models--owner--partial-sd" / "refs").mkdir()
    (cache / "models--owner--partial-sd" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arguments = ["--nfe-budget", "8", "--steps", "4", "--device", "cpu", *JPEG]
    assert cli.main(["generate", "--out", str(tmp_path / "run"), "--model", "owner/partial-sd", *arguments]) == 2
    error = capsys.readouterr().err
    assert "--model owner/partial-sd: the Hugging Face cache holds only part of it and HF_HUB_OFFLINE is set" in error
    assert "hf download owner/partial-sd" in error
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


def test_an_unreachable_hub_fails_in_one_request(tmp_path, capsys, monkeypatch, model, no_hub):
    from huggingface_hub import HfApi

    requests = []

    def unreachable(self, repo_id, **kwargs):
        requests.append(repo_id)
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "model_info", unreachable)
    arguments = ["generate", "--out", str(tmp_path / "run"), "--prompt", "a cat", "--reward", "clip"]
    assert cli.main([*arguments, "--model", model]) == 2
    error = capsys.readouterr().err
    assert (
        "--reward-model openai/clip-vit-large-patch14: it is not in the Hugging Face cache and the Hub cannot" in error
    )
    assert requests == ["openai/clip-vit-large-patch14"]  # one request, no retries
    requests.clear()
    assert cli.main([*arguments, "--model", "owner/sd"]) == 2
    assert "--model owner/sd: it is not in the Hugging Face cache" in capsys.readouterr().err
    assert requests == ["owner/sd"]  # the model is checked first


# -------------------------------------------------------------------------------------------------------------------
# dts batch: every prompt whole or absent, resume, lock
# -------------------------------------------------------------------------------------------------------------------
def batch_arguments(tmp_path: Path, model: str, *extra: str) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green line\n")
    return [
        "batch", "--prompts", str(prompts), "--out", str(tmp_path / "batch"), "--model", model,
        "--reward", "jpeg-compressibility", "--steps", "4", "--nfe-budget", "8", "--num-images", "2",
        "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.fixture
def pipeline_calls(monkeypatch) -> list[str]:
    """The prompts the batch really ran, in order."""
    calls: list[str] = []
    load = cli.load_pipeline

    def counting(*args, **kwargs):
        pipe = load(*args, **kwargs)

        def call(prompt, **options):
            calls.append(prompt)
            return pipe(prompt, **options)

        return call

    monkeypatch.setattr(cli, "load_pipeline", counting)
    return calls


def test_a_failed_batch_keeps_finished_prompts_whole_and_resumes(tmp_path, monkeypatch, model, pipeline_calls):
    out = tmp_path / "batch"
    write = cli.write_json

    def fail_on_the_second_prompt(path: Path, record: dict) -> None:
        if record.get("index") == 1:
            raise RuntimeError("disk full")
        write(path, record)

    monkeypatch.setattr(cli, "write_json", fail_on_the_second_prompt)
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main(batch_arguments(tmp_path, model))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [cli.RUN_MARKER, cli.LOCK_FILE, cli.BATCH_SETTINGS, "prompt-00000"]
    )
    first = json.loads((out / "prompt-00000" / "record.json").read_text())
    assert all((out / image).is_file() for image in first["images"]) and len(first["images"]) == 2
    assert pipeline_calls == ["a red square", "a blue circle"]

    monkeypatch.setattr(cli, "write_json", write)
    pipeline_calls.clear()
    assert cli.main(batch_arguments(tmp_path, model)) == 0
    assert pipeline_calls == ["a blue circle", "a green line"]  # the finished prompt is not run again
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_prompts"] == 1 and [r["index"] for r in summary["records"]] == [0, 1, 2]
    assert json.loads((out / "prompt-00000" / "record.json").read_text()) == first

    pipeline_calls.clear()
    assert cli.main(batch_arguments(tmp_path, model)) == 0 and pipeline_calls == []  # all done: nothing to run
    assert not [p for p in out.iterdir() if p.name.endswith(cli.PARTIAL)]


def test_resuming_with_other_settings_is_refused(tmp_path, capsys, model, pipeline_calls):
    assert cli.main(batch_arguments(tmp_path, model)) == 0
    pipeline_calls.clear()
    assert cli.main(batch_arguments(tmp_path, model, "--seed", "1")) == 2
    assert "other settings (they differ in: seed)" in capsys.readouterr().err
    assert cli.main(batch_arguments(tmp_path, model, "--seed", "1", "--overwrite")) == 0  # starts afresh
    assert len(pipeline_calls) == 3
    assert json.loads((tmp_path / "batch" / "summary.json").read_text())["resumed_prompts"] == 0


def test_a_batch_folder_is_locked_against_a_second_run(tmp_path, capsys, model, pipeline_calls):
    out = tmp_path / "batch"
    assert cli.main(batch_arguments(tmp_path, model)) == 0
    lock = cli.FolderLock(out)  # a live run holds the folder
    try:
        assert cli.main(batch_arguments(tmp_path, model)) == 2
        assert f"is being written by another dts batch (pid {os.getpid()} on" in capsys.readouterr().err
    finally:
        lock.release()
    (out / cli.LOCK_FILE).write_text("pid 999999999 on a-dead-host\n")  # a run that died: its lock is taken over
    assert cli.main(batch_arguments(tmp_path, model)) == 0
    assert (out / cli.LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")


def test_load_pipeline_casts_to_the_dtype_without_a_deprecation_warning():
    """diffusers renamed from_pretrained's torch_dtype to dtype; the CLI passes whichever the installed one takes."""
    import warnings

    from dts_diffusers import digits

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype.*")
        pipe = cli.load_pipeline(str(digits.bundled_model_path()), "cpu", torch.float64)
    assert pipe.unet.dtype == torch.float64 and pipe.vae.dtype == torch.float64


class WindowsLocks:
    """msvcrt's non-blocking byte-range lock, as Windows applies it: a range held by one open file is refused to
    every other until that file is closed."""

    LK_NBLCK = 2

    def __init__(self):
        self.held: dict[tuple[int, int], tuple[int, int]] = {}  # (inode, offset) -> (fd, inode) of the holder

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        assert mode == self.LK_NBLCK and nbytes == 1
        inode = os.fstat(fd).st_ino
        key = (inode, os.lseek(fd, 0, os.SEEK_CUR))
        holder = self.held.get(key)
        if holder is not None and holder[0] != fd:
            try:
                alive = os.fstat(holder[0]).st_ino == holder[1]
            except OSError:
                alive = False
            if alive:
                raise PermissionError(13, "Permission denied")
        self.held[key] = (fd, inode)


def test_a_batch_folder_lock_works_without_fcntl(tmp_path, monkeypatch):
    """On Windows (no fcntl) the folder is locked with msvcrt on a byte past the owner line, which stays readable."""
    import functools

    windows = WindowsLocks()
    monkeypatch.setitem(sys.modules, "msvcrt", windows)
    monkeypatch.setitem(sys.modules, "fcntl", None)  # importing it now fails, as on Windows
    monkeypatch.setattr(cli, "lock_exclusively", functools.partial(cli.lock_exclusively, windows=True))
    lock = cli.FolderLock(tmp_path)
    ((_, offset),) = windows.held
    assert offset == cli.LOCK_BYTE > (tmp_path / cli.LOCK_FILE).stat().st_size
    with pytest.raises(cli.CLIError, match=f"being written by another dts batch \\(pid {os.getpid()} on"):
        cli.FolderLock(tmp_path)
    lock.release()
    cli.FolderLock(tmp_path).release()  # a closed holder's lock is free again
