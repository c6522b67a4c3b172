"""The ComfyUI nodes without ComfyUI: schemas ComfyUI can render, bad inputs rejected with clear messages, and every
method run through DTS Sampler (SAMPLER) on a tiny model."""

import itertools
import re
import sys
import types
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from dts_diffusers.comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, nodes, sampling
from packaging.requirements import Requirement

from dts_diffusers.k_sampling import method_label
from dts_diffusers.methods import METHODS
from dts_diffusers.options import TreeOptions

SOCKET_TYPES = {"MODEL", "CONDITIONING", "LATENT", "VAE", "SAMPLER", "SIGMAS", "DTS_REWARD", "DTS_TREE"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING"}


def all_inputs(node):
    spec = node.INPUT_TYPES()
    assert set(spec) <= {"required", "optional"}
    return {**spec["required"], **spec.get("optional", {})}


@pytest.mark.parametrize("node_id", list(NODE_CLASS_MAPPINGS))
def test_every_input_has_a_valid_type_and_default_within_bounds(node_id):
    node = NODE_CLASS_MAPPINGS[node_id]
    assert node_id in NODE_DISPLAY_NAME_MAPPINGS
    assert callable(getattr(node, node.FUNCTION))
    assert len(getattr(node, "RETURN_NAMES", node.RETURN_TYPES)) == len(node.RETURN_TYPES)
    assert set(node.RETURN_TYPES) <= SOCKET_TYPES | WIDGET_TYPES | {"FLOAT", "STRING"}
    for name, spec in all_inputs(node).items():
        kind, options = spec[0], spec[1] if len(spec) > 1 else {}
        if isinstance(kind, list):
            assert kind and all(isinstance(choice, str) for choice in kind), name
            assert options.get("default", kind[0]) in kind, name
        elif kind in ("INT", "FLOAT"):
            assert options["min"] <= options["default"] <= options["max"], name
            assert isinstance(options["default"], int if kind == "INT" else float), name
        elif kind == "STRING":
            assert isinstance(options["default"], str), name
        else:
            assert kind in SOCKET_TYPES, (name, kind)


def test_function_signatures_take_every_input():
    import inspect

    for node in NODE_CLASS_MAPPINGS.values():
        parameters = inspect.signature(getattr(node, node.FUNCTION)).parameters
        spec = node.INPUT_TYPES()
        takes_rest = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        for name in spec["required"]:
            assert name in parameters, (node.__name__, name)
        for name in spec.get("optional", {}):
            assert name in parameters or takes_rest, (node.__name__, name)


def test_scheduler_choices_fall_back_to_comfyui_0_8_names_without_comfyui():
    names = nodes.scheduler_names()
    assert "karras" in names and "normal" in names


def test_tree_options_map_node_inputs_to_sample_dts():
    options = nodes.tree_options("search", 2.0, 1.0, branch_every=5, rollout_batch=8, method="smc")
    assert options == {
        "tree_options": TreeOptions(lam=2.0, mode="search", method="smc", branch_every=5, rollout_batch_size=8),
        "eta": 1.0,
    }
    assert nodes.tree_options("sample", 1.0, 1.0, widening="paper")["tree_options"].widening == "paper"
    assert nodes.tree_options("sample", 1.0, 1.0)["tree_options"].branch_every is None  # 0 = the paper's schedule
    assert nodes.tree_options("sample", 1.0, 1.0)["tree_options"].method == "dts"
    with pytest.raises(ValueError, match="unknown method 'mcts'"):  # raised in the node's function: a node error
        nodes.tree_options("sample", 1.0, 1.0, method="mcts")


def test_display_names_differ_case_insensitively_and_node_ids_are_kept():
    """The node search matches names case-insensitively; saved workflows name the ids."""
    names = [name.casefold() for name in NODE_DISPLAY_NAME_MAPPINGS.values()]
    assert len(set(names)) == len(names) and set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    assert {"DTSRewardLoader", "DTSSampler", "DTSSamplerSelect"} <= set(NODE_CLASS_MAPPINGS)
    assert NODE_DISPLAY_NAME_MAPPINGS["DTSSamplerSelect"] == "DTS Sampler (SAMPLER)"


def widget_inputs(spec: dict) -> list[str]:
    return [name for name, s in spec.items() if isinstance(s[0], list) or s[0] in WIDGET_TYPES]


@pytest.mark.parametrize("node_id", ["DTSSampler", "DTSSamplerSelect"])
def test_method_lists_every_method_and_is_the_last_widget(node_id):
    """The frontend restores widget values by position, so a saved workflow without the newest widget keeps its
    other values and gets method = "dts"; optional sockets (tree, sigmas) hold no widget value."""
    spec = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    assert widget_inputs(spec["optional"])[-1] == "method"
    assert widget_inputs(spec["required"]) == [
        name for name in spec["required"] if name in widget_inputs(spec["required"])
    ]
    choices, options = spec["optional"]["method"]
    assert choices == list(METHODS) and options["default"] == "dts"


@pytest.mark.parametrize("node_id", ["DTSSampler", "DTSSamplerSelect"])
def test_widening_is_one_choice_of_the_presets_in_the_slot_after_branch_every(node_id):
    spec = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["optional"]
    assert list(spec)[:3] == ["branch_every", "widening", "c_uct"]
    choices, options = spec["widening"]
    assert choices == ["default", "paper"] and options["default"] == "default"


def test_summary_says_when_the_tree_has_fewer_leaves_than_outputs():
    info = {"method": "dts*", "rewards": torch.tensor([0.5, 0.5, 0.5]), "best_reward": 0.5, "nfe_budget": 8}
    short = sampling.summarize({**info, "stats": {"nfe": 8, "reward_evals": 2, "leaves": 2}})
    assert "the tree has only 2 leaves" in short
    enough = sampling.summarize({**info, "stats": {"nfe": 8, "reward_evals": 9, "leaves": 9}})
    assert "leaves" not in enough and enough.startswith("DTS*: rewards [0.5000, 0.5000, 0.5000]; best found")


def test_bad_inputs_raise_in_the_node_function_with_clear_messages():
    sampler = NODE_CLASS_MAPPINGS["DTSSamplerSelect"]()
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        sampler.get_sampler(None, None, "", "sample", -1.0, 100, 1.0)
    with pytest.raises(ValueError, match="eta must be > 0"):
        sampler.get_sampler(None, None, "", "sample", 1.0, 100, 0.0)
    with pytest.raises(ValueError, match=r"unknown method 'none'; choose one of dts, dts\*, "):
        sampler.get_sampler(None, None, "", "sample", 1.0, 100, 1.0, method="none")
    with pytest.raises(ValueError, match="nfe_budget=3 is below one rollout: one sample costs 4 NFE, one per step "
                       "of the connected sigmas; give at least 4"):  # fmt: skip
        sampler.get_sampler(None, None, "", "sample", 1.0, 3, 1.0, sigmas=torch.tensor([6.0, 2.0, 0.8, 0.3, 0.0]))
    ksampler = NODE_CLASS_MAPPINGS["DTSSampler"]()
    common = dict(model=None, positive=None, negative=None, latent_image=None, vae=None, reward=None, reward_prompt="",
                  seed=0, cfg=7.0, scheduler="karras", denoise=1.0, mode="sample", num_outputs=1)  # fmt: skip
    with pytest.raises(ValueError, match="below one rollout"):
        ksampler.sample(steps=20, lam=1.0, nfe_budget=10, eta=1.0, **common)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ksampler.sample(steps=20, lam=1.0, nfe_budget=100, eta=0.0, **common)


def test_reward_loader_builds_a_registered_reward_and_rejects_bad_choices(comfy_host):
    loader = NODE_CLASS_MAPPINGS["DTSRewardLoader"]()
    assert "jpeg-compressibility" in dict(all_inputs(loader))["reward_name"][0]
    (reward,) = loader.load("jpeg-compressibility", sampling.NO_WEIGHTS, "cpu", "auto", "")
    images = torch.rand(2, 3, 32, 32)
    images[1] = 0.5  # a flat image compresses better
    scores = reward(images, "a prompt")
    assert scores.shape == (2,) and scores[1] > scores[0]
    with pytest.raises(ValueError, match="takes no weights"):
        loader.load("jpeg-compressibility", "some-file.safetensors", "cpu", "auto", "")
    with pytest.raises(ValueError, match="JSON object"):
        loader.load("jpeg-compressibility", sampling.NO_WEIGHTS, "cpu", "auto", "[1, 2]")
    (reward,) = loader.load("jpeg-compressibility", sampling.NO_WEIGHTS, "cpu", "auto", '{"quality": 50}')
    assert reward(images, "").shape == (2,)
    with pytest.raises(ValueError, match="unknown reward"):
        loader.load("no-such-reward", sampling.NO_WEIGHTS, "cpu", "auto", "")


def test_options_errors_name_the_input_and_the_keys_the_reward_accepts():
    loader = NODE_CLASS_MAPPINGS["DTSRewardLoader"]()
    with pytest.raises(ValueError, match=r"^options: not valid JSON \(Expecting property name enclosed in double "
                       r"quotes at column 2\): \"\{'quality': 50\}\"; .* reward accepts: quality\)$"):  # fmt: skip
        loader.load("jpeg-compressibility", sampling.NO_WEIGHTS, "cpu", "auto", "{'quality': 50}")
    with pytest.raises(ValueError, match=r"^options: the 'digit-classifier' reward has no option 'digits'; it accepts: "
                       r"digit, which, output$"):  # fmt: skip
        loader.load("digit-classifier", sampling.NO_WEIGHTS, "cpu", "auto", '{"digits": 3}')
    with pytest.raises(ValueError, match=r"no option 'device' \(device: set by the loader's own inputs\)"):
        loader.load("jpeg-compressibility", sampling.NO_WEIGHTS, "cpu", "auto", '{"device": "cuda"}')


LATENT_STD = 0.5


class TinyUNet(torch.nn.Module):
    """The module a UNet's ModelPatcher holds (BaseModel), with SD1's latent format for the previewer."""

    latent_format = "SD15"

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(4))


class TinyComfyModel:
    """What ComfyUI's KSAMPLER hands a sampler function (KSamplerX0Inpaint): `model(x, sigma, denoise_mask, seed)`
    returns the denoised latent, here the exact denoiser of N(0, s²) latents. Its `inner_model` is the guider, with
    the UNet's `model_patcher`, the `loaded_models` ComfyUI's sampling loaded with it, and the base model (SD1's
    latent scaling) at `inner_model.inner_model`. `calls` counts the model calls (denoising step batches)."""

    latent_image = noise = None

    def __init__(self):
        import comfy.model_patcher

        base = types.SimpleNamespace(process_latent_out=lambda latent: latent / 0.18215)
        unet = comfy.model_patcher.ModelPatcher(TinyUNet(), torch.device("cpu"), torch.device("cpu"))
        self.inner_model = types.SimpleNamespace(inner_model=base, model_patcher=unet, loaded_models=[])
        self.calls = 0

    def __call__(self, x, sigma, denoise_mask=None, model_options=None, seed=None):
        self.calls += 1
        return x * LATENT_STD**2 / (LATENT_STD**2 + sigma.view(-1, 1, 1, 1) ** 2)


class TinyVAE:
    """ComfyUI's VAE.decode contract: latents → IMAGE [B, H, W, 3] in [0, 1]."""

    def decode(self, latents):
        return torch.sigmoid(latents[:, :3]).movedim(1, -1)


@pytest.fixture
def comfy_host(monkeypatch):
    """The ComfyUI 0.8.0 names the nodes use, doing what ComfyUI's do on a CPU-only machine: `comfy.samplers.KSAMPLER`
    (a sampler function and its extra options); `comfy.model_patcher.ModelPatcher(model, load_device,
    offload_device)`; `comfy.model_management` with `get_torch_device`, `unet_offload_device`, `load_models_gpu`
    (moves each patcher's module to its load device, writes the module's `device` as ModelPatcher.load does, and
    puts the patcher first in `loaded_models()`) and `throw_exception_if_processing_interrupted`;
    `comfy.utils.ProgressBar` (update_absolute clamps to the total, as ComfyUI's) and `latent_preview.get_previewer`
    (a previewer that returns the latent it was given). Returns the record: `loads` (the patchers of each
    load_models_gpu call), `loaded`, `bars` (each bar's (value, total, preview) updates)."""
    host = types.SimpleNamespace(loads=[], loaded=[], bars=[])
    comfy = types.ModuleType("comfy")
    for name in ("samplers", "model_patcher", "model_management", "utils"):
        setattr(comfy, name, types.ModuleType(f"comfy.{name}"))
    latent_preview = types.ModuleType("latent_preview")

    class KSAMPLER:
        def __init__(self, sampler_function, extra_options=None, inpaint_options=None):
            self.sampler_function, self.extra_options = sampler_function, extra_options or {}

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
            if getattr(model, "device", None) is None:
                model.device = offload_device

        def model_size(self):
            return self.size or sum(t.nbytes for t in self.model.state_dict().values())

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):  # fmt: skip
        host.loads.append(list(models))
        for patcher in models:
            patcher.model.to(patcher.load_device)
            patcher.model.device = patcher.load_device
            if patcher in host.loaded:
                host.loaded.remove(patcher)
            host.loaded.insert(0, patcher)

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current, self.updates = total, 0, []
            host.bars.append(self.updates)

        def update_absolute(self, value, total=None, preview=None):
            self.total = self.total if total is None else total
            self.current = min(value, self.total)
            self.updates.append((self.current, self.total, preview))

    class Previewer:
        def decode_latent_to_preview_image(self, preview_format, x0):
            return preview_format, x0.clone(), 512

    comfy.samplers.KSAMPLER = KSAMPLER
    comfy.model_patcher.ModelPatcher = ModelPatcher
    comfy.model_management.get_torch_device = lambda: torch.device("cpu")
    comfy.model_management.unet_offload_device = lambda: torch.device("cpu")
    comfy.model_management.load_models_gpu = load_models_gpu
    comfy.model_management.loaded_models = lambda only_currently_used=False: list(host.loaded)
    comfy.model_management.throw_exception_if_processing_interrupted = lambda: None
    comfy.utils.ProgressBar = ProgressBar
    latent_preview.get_previewer = lambda device, latent_format: Previewer()
    for module in (comfy, *(getattr(comfy, name) for name in ("samplers", "model_patcher", "model_management",
                                                                "utils")), latent_preview):  # fmt: skip
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return host


def run_sampler(sampler, latent: torch.Tensor, sigmas: torch.Tensor, seed: int, model=None) -> torch.Tensor:
    """What KSAMPLER.sample does for an SD1 model below σ_max: noise the latent for sigmas[0], call the function
    (with ComfyUI's step callback, which DTS's NFE progress bar replaces)."""
    model = model or TinyComfyModel()
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    model.latent_image, model.noise = latent, noise
    x = latent + sigmas[0] * noise

    def callback(step):
        raise AssertionError("ComfyUI's step callback is replaced by the NFE progress bar")

    extra_args = {"denoise_mask": None, "seed": seed}
    return sampler.sampler_function(
        model, x, sigmas, extra_args=extra_args, callback=callback, disable=True, **sampler.extra_options
    )


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_through_dts_sampler_within_budget(comfy_host, method):
    (reward,) = NODE_CLASS_MAPPINGS["DTSRewardLoader"]().load("jpeg-compressibility", sampling.NO_WEIGHTS, "cpu",
                                                              "auto", "")  # fmt: skip
    select = NODE_CLASS_MAPPINGS["DTSSamplerSelect"]()
    sigmas = torch.tensor([6.0, 2.0, 0.8, 0.3, 0.0])
    budget = 4 * 8
    latent = torch.zeros(2, 4, 8, 8)

    def score(latents):
        return reward(TinyVAE().decode(latents / 0.18215).movedim(-1, 1), "")

    for mode in ("sample", "search"):
        (sampler,) = select.get_sampler(TinyVAE(), reward, "", mode, 2.0, budget, 1.0, rollout_batch=4, method=method)
        out = run_sampler(sampler, latent, sigmas, seed=5)
        info = sampler.extra_options["info"]
        assert out.shape == latent.shape and torch.isfinite(out).all()
        (bar,) = comfy_host.bars[-1:]
        assert bar and bar[-1][:2] == (info["stats"]["nfe"], budget) and 0 < info["stats"]["nfe"] <= budget
        assert info["method"] == method_label(method, mode)
        if mode == "search":  # the best found, best first
            scores = score(out)
            assert torch.equal(scores, scores.sort(descending=True).values)
            assert scores[0].item() == pytest.approx(info["best_reward"])
        else:  # the same seed gives the same samples
            assert torch.equal(run_sampler(sampler, latent, sigmas, seed=5), out)


def dts_sampler(reward, **inputs):
    (sampler,) = NODE_CLASS_MAPPINGS["DTSSamplerSelect"]().get_sampler(
        TinyVAE(), reward, "", inputs.pop("mode", "sample"), 2.0, inputs.pop("nfe_budget", 32), 1.0, rollout_batch=4,
        **inputs,
    )  # fmt: skip
    return sampler


@pytest.fixture
def jpeg_reward(comfy_host):
    loader = NODE_CLASS_MAPPINGS["DTSRewardLoader"]()
    return loader.load("jpeg-compressibility", sampling.NO_WEIGHTS, "cpu", "auto", "")[0]


def test_run_report_gives_the_rewards_and_summary_of_the_samplers_last_run(comfy_host, jpeg_reward):
    report = NODE_CLASS_MAPPINGS["DTSRunReport"]()
    sampler = dts_sampler(jpeg_reward, mode="search")
    latent = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="has not run yet"):
        report.report(sampler, {"samples": latent})
    out = run_sampler(sampler, latent, torch.tensor([6.0, 2.0, 0.8, 0.3, 0.0]), seed=5)
    result = report.report(sampler, {"samples": out})
    rewards, summary = result["result"]
    assert len(rewards) == 2 and rewards == sorted(rewards, reverse=True)
    assert re.match(r"DTS\*: rewards \[.*\]; best found .*; NFE \d+/32;", summary) and result["ui"]["text"] == [summary]
    assert "tree" not in sampler.extra_options["info"]  # a SAMPLER's report keeps no tree latents
    with pytest.raises(ValueError, match="samples has 3 rows but the sampler's last run drew 2"):
        report.report(sampler, {"samples": torch.zeros(3, 4, 8, 8)})
    with pytest.raises(ValueError, match="another sampler"):
        report.report(types.SimpleNamespace(extra_options={}), {"samples": out})


def test_the_sampler_rejects_a_budget_below_one_rollout_of_its_sigmas_and_a_batch_of_different_latents(
    comfy_host, jpeg_reward
):
    sigmas = torch.tensor([6.0, 2.0, 0.8, 0.3, 0.0])
    with pytest.raises(ValueError, match=r"^DTS Sampler \(SAMPLER\): nfe_budget=3 is below one rollout: .* of the "
                       r"custom sampler's SIGMAS"):  # fmt: skip
        run_sampler(dts_sampler(jpeg_reward, nfe_budget=3), torch.zeros(1, 4, 8, 8), sigmas, seed=0)
    latents = torch.zeros(2, 4, 8, 8)
    latents[1] = 1.0
    with pytest.raises(ValueError, match=r"different latents.*the batch size sets the number of outputs"):
        run_sampler(dts_sampler(jpeg_reward), latents, sigmas, seed=0)


def test_a_kept_tree_continues_through_the_sampler_function(comfy_host, jpeg_reward):
    """DTS Sampler's path: keep_tree puts the tree in info, tree= continues it with more budget."""
    sigmas = torch.tensor([6.0, 2.0, 0.8, 0.3, 0.0])
    latent = torch.zeros(1, 4, 8, 8)
    options = nodes.tree_options("sample", 2.0, 1.0)

    def ksampler(nfe_budget, tree=None):
        return sampling.dts_ksampler(TinyVAE(), jpeg_reward, "", nfe_budget=nfe_budget, tree=tree, keep_tree=True,
                                     **options)  # fmt: skip

    first = ksampler(16)
    run_sampler(first, latent, sigmas, seed=1)
    tree = first.extra_options["info"]["tree"]
    second = ksampler(8, tree)
    run_sampler(second, latent, sigmas, seed=1)
    target = tree.sampler.nfe + 8
    assert f"/{target};" in sampling.summarize(second.extra_options["info"]) and target <= 24
    grown = second.extra_options["info"]["tree"].sampler.nfe
    assert grown > tree.sampler.nfe
    assert comfy_host.bars[-1][-1][:2] == (grown - tree.sampler.nfe, 8)  # the bar counts this run's NFE
    with pytest.raises(ValueError, match="cannot continue the given tree: steps=3"):
        run_sampler(ksampler(8, tree), latent, sigmas[1:], seed=1)


@pytest.fixture
def digit_reward(comfy_host):
    """A reward with weights (the bundled digit classifier), as the loader builds it."""
    loader = NODE_CLASS_MAPPINGS["DTSRewardLoader"]()
    return loader.load("digit-classifier", sampling.NO_WEIGHTS, "auto", "auto", '{"digit": 3}')[0]


def test_the_loader_hands_the_reward_to_comfyuis_model_management(comfy_host, digit_reward):
    """DTS_REWARD holds a ModelPatcher around the reward's module, so model management counts its weights, loads it
    for scoring and may offload it; calling the reward loads it first."""
    patcher = digit_reward.patcher
    assert patcher.model.reward is digit_reward.reward and digit_reward.name == "digit-classifier[3]"
    assert patcher.load_device == torch.device("cpu") and patcher.offload_device == torch.device("cpu")
    weights = sum(t.nbytes for t in digit_reward.reward.state_dict().values())
    assert weights > 0 and patcher.model_size() == weights
    assert comfy_host.loaded == []  # built on the offload device, loaded only to score
    scores = digit_reward(torch.rand(2, 3, 32, 32), None)
    assert scores.shape == (2,) and comfy_host.loads == [[patcher]] and comfy_host.loaded == [patcher]


def test_each_scoring_batch_loads_the_reward_then_the_sampling_models_back(comfy_host, digit_reward):
    """ComfyUI loads the UNet (and ControlNets, ...) once per sampling run; loading the reward may offload them, so
    after each scoring batch they are loaded back for the next denoising batch."""
    model = TinyComfyModel()
    import comfy.model_patcher

    control = comfy.model_patcher.ModelPatcher(TinyUNet(), torch.device("cpu"), torch.device("cpu"))
    model.inner_model.loaded_models = [control]
    unet = model.inner_model.model_patcher
    during = []
    digit_reward.reward.register_forward_hook(
        lambda module, args, out: during.append(comfy_host.loaded[0] is digit_reward.patcher)
    )
    run_sampler(dts_sampler(digit_reward, nfe_budget=24), torch.zeros(1, 4, 8, 8), TINY_SIGMAS, seed=0, model=model)
    assert len(during) >= 2 and all(during)  # scored several batches, each with the reward loaded
    assert comfy_host.loads == [[digit_reward.patcher], [unet, control]] * len(during)


TINY_SIGMAS = torch.tensor([6.0, 2.0, 0.8, 0.3, 0.0])


# NFE of one denoising step: the tree's rollout batch (4); SMC steps its one population of 32 / 4 particles together
@pytest.mark.parametrize(("method", "step_nfe"), [("dts", 4), ("smc", 8)])
def test_progress_counts_nfe_at_every_denoising_step_batch_and_previews_the_best_found(comfy_host, digit_reward,
                                                                                       method, step_nfe):  # fmt: skip
    model = TinyComfyModel()
    budget, rows = 32, 4
    sampler = dts_sampler(digit_reward, mode="search", nfe_budget=budget, method=method)
    out = run_sampler(sampler, torch.zeros(1, 4, 8, 8), TINY_SIGMAS, seed=0, model=model)
    (updates,) = comfy_host.bars
    values = [value for value, _, _ in updates]
    assert len(updates) >= model.calls >= budget // rows  # one update per denoising step batch at least
    assert all(total == budget for _, total, _ in updates)
    assert values == sorted(values) and values[-1] == sampler.extra_options["info"]["stats"]["nfe"]
    assert max(b - a for a, b in itertools.pairwise([0, *values])) == step_nfe  # not a rollout at once
    assert all(fmt == "JPEG" and x0.shape == (1, 4, 8, 8) for _, _, (fmt, x0, _) in updates)
    assert torch.equal(updates[-1][2][1], out[:1])  # search mode: the first output is the best found


ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return pytest.importorskip("tomllib").loads((ROOT / "pyproject.toml").read_text())  # Python >= 3.11


def test_the_registry_icon_is_a_raw_url_of_a_square_svg_in_this_repository():
    """The Comfy registry shows `Icon` (a URL; SVG/PNG, square, at most 400 px)."""
    project = pyproject()
    raw = project["project"]["urls"]["Repository"].replace("github.com", "raw.githubusercontent.com") + "/main/"
    icon = project["tool"]["comfy"]["Icon"]
    assert icon.startswith(raw)
    svg = ElementTree.parse(ROOT / icon.removeprefix(raw)).getroot()
    width, height = int(svg.get("width")), int(svg.get("height"))
    assert width == height <= 400 and svg.get("viewBox") == f"0 0 {width} {height}"


def test_requirements_txt_lists_the_packages_needs_with_the_packages_bounds():
    """ComfyUI-Manager installs requirements.txt for a cloned pack: huggingface_hub (the rewards' weights) is not in
    ComfyUI's list; the bounds are pyproject's."""
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = [Requirement(line) for line in lines if line and not line.startswith("#")]
    project = pyproject()["project"]["dependencies"]
    bounds = {Requirement(r).name: Requirement(r).specifier for r in project}
    assert [r.name for r in listed] == ["huggingface_hub"]
    assert all(r.specifier == bounds[r.name] for r in listed)


def test_the_hpsv2_install_hint_works_for_a_cloned_pack(monkeypatch):
    from dts_diffusers.rewards.hpsv2 import import_open_clip

    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match=r"cloned pack.*pip install open_clip_torch \(it needs torchvision"):
        import_open_clip()
