"""Reward contract, registry, wrappers, JPEG and classifier rewards (no model weights needed)."""

import contextlib
import importlib.util
import io
import json
import pathlib
import pickle
import zipfile

import pytest
import torch
from torch import nn

import dts_diffusers.rewards as rewards
from dts_diffusers.rewards import CallableReward, Reward, WeightedSum, as_reward, load_reward, register_reward
from dts_diffusers.rewards.jpeg import jpeg_size_kb
from dts_diffusers.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, center_crop, clip_preprocess


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_callable_reward_scores_each_image():
    images = torch.rand(5, 3, 8, 8)
    reward = as_reward(brightness)
    assert isinstance(reward, CallableReward) and reward.name == "brightness"
    scores = reward(images)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    torch.testing.assert_close(scores, images.mean(dim=(1, 2, 3)))


def test_callable_with_wrong_output_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"returned shape \(3, 2\) for 3 images.*Tensor\[3\]"):
        as_reward(lambda images, prompts: torch.zeros(3, 2))(torch.rand(3, 3, 4, 4))
    with pytest.raises(TypeError, match="returned list"):
        as_reward(lambda images, prompts: [0.0, 1.0])(torch.rand(2, 3, 4, 4))


def test_callable_column_output_is_flattened():
    scores = as_reward(lambda images, prompts: torch.ones(4, 1, dtype=torch.float64))(torch.rand(4, 3, 4, 4))
    assert scores.shape == (4,) and scores.dtype == torch.float32


def test_bad_images_and_prompts_are_clear_errors():
    reward = as_reward(brightness, needs_prompts=True)
    with pytest.raises(ValueError, match=r"Tensor\[B, 3, H, W\] in \[0, 1\]"):
        reward(torch.rand(3, 8, 8), ["a"])
    with pytest.raises(ValueError, match="needs one prompt per image"):
        reward(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="got 3 prompts for 2 images"):
        reward(torch.rand(2, 3, 8, 8), ["a", "b", "c"])


def test_prompts_are_broadcast_from_one():
    seen = []
    reward = as_reward(lambda images, prompts: seen.append(prompts) or images.mean((1, 2, 3)), needs_prompts=True)
    reward(torch.rand(3, 3, 4, 4), "a cat")
    reward(torch.rand(2, 3, 4, 4), ["a dog"])
    assert seen == [["a cat"] * 3, ["a dog"] * 2]


def test_no_grad_by_default_and_differentiable_on_request():
    images = torch.rand(2, 3, 4, 4, requires_grad=True)
    assert not as_reward(brightness)(images).requires_grad
    reward = as_reward(brightness)
    reward.differentiable = True
    scores = reward(images)
    scores.sum().backward()
    torch.testing.assert_close(images.grad, torch.full_like(images, 1 / 48))


def test_unknown_name_lists_known_rewards():
    with pytest.raises(ValueError, match=r"unknown reward 'imagereward'; known rewards: .*image-reward.*jpeg-"):
        load_reward("imagereward")
    with pytest.raises(TypeError, match="cannot use int as a reward"):
        as_reward(3)


def test_every_documented_name_is_registered():
    expected = {
        "image-reward",
        "clip",
        "pickscore",
        "hpsv2",
        "aesthetic",
        "jpeg-compressibility",
        "jpeg-incompressibility",
        "classifier",
        "digit-classifier",
    }
    assert expected <= set(rewards.reward_names())


def test_register_reward_and_lazy_package_export():
    register_reward(
        "test-brightness",
        lambda device=None, dtype=None, scale=1.0: CallableReward(
            lambda images, prompts: scale * brightness(images, prompts), name="test-brightness"
        ),
    )
    images = torch.rand(3, 3, 4, 4)
    import dts_diffusers

    reward = dts_diffusers.load_reward("test-brightness", scale=2.0)
    torch.testing.assert_close(reward(images), 2 * brightness(images, None))
    assert dts_diffusers.as_reward is as_reward
    with pytest.raises(TypeError, match="must be callable"):
        register_reward("broken", 3)


def test_weighted_sum_of_named_rewards():
    images = torch.rand(4, 3, 16, 16)
    combined = load_reward({"jpeg-compressibility": 1.0, "jpeg-incompressibility": 0.25})
    assert isinstance(combined, WeightedSum) and not combined.needs_prompts
    size = jpeg_size_kb(images)
    torch.testing.assert_close(combined(images), -size + 0.25 * size)
    assert "0.25*jpeg-incompressibility" in combined.name


def test_weighted_sum_passes_prompts_only_to_rewards_that_need_them():
    text_reward = as_reward(lambda images, prompts: torch.tensor([float(len(p)) for p in prompts]), needs_prompts=True)
    combined = WeightedSum([(text_reward, 2.0), (as_reward(brightness), -1.0)])
    images = torch.rand(2, 3, 4, 4)
    expected = 2.0 * torch.tensor([3.0, 5.0]) - brightness(images, None)
    torch.testing.assert_close(combined(images, ["abc", "abcde"]), expected)
    assert not combined(images.requires_grad_(True), ["abc", "abcde"]).requires_grad
    combined.differentiable = True
    assert all(term.differentiable for term in combined.terms)
    combined(images, ["abc", "abcde"]).sum().backward()
    torch.testing.assert_close(images.grad, torch.full_like(images, -1 / 48))
    with pytest.raises(ValueError, match="no gradient"):
        load_reward({"jpeg-compressibility": 1.0}, differentiable=True)


def test_jpeg_rewards_on_known_images():
    generator = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=generator)
    images = torch.cat([flat, noise, flat])
    compressibility = load_reward("jpeg-compressibility")(images)
    incompressibility = load_reward("jpeg-incompressibility")(images)
    assert compressibility[0] > compressibility[1]  # flat gray compresses better than noise
    assert compressibility[0] == compressibility[2]
    torch.testing.assert_close(incompressibility, -compressibility)
    assert 0 < -compressibility[0] < 2 < -compressibility[1]  # a flat 64x64 JPEG is tiny; q95 noise is ~10 kB
    assert compressibility.dtype == torch.float32


def test_jpeg_reward_has_no_gradient_and_checks_quality():
    with pytest.raises(ValueError, match="has no gradient"):
        load_reward("jpeg-compressibility", differentiable=True)
    with pytest.raises(ValueError, match="quality must be in"):
        load_reward("jpeg-compressibility", quality=0)


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 10))

    def forward(self, images):
        return self.net(images)


def test_classifier_reward_is_log_probability_of_target(tmp_path):
    torch.manual_seed(0)
    module = TinyClassifier()
    images = torch.rand(6, 3, 16, 16)
    reward = load_reward("classifier", classifier=module, target=3)
    expected = module(images).log_softmax(1)[:, 3]
    torch.testing.assert_close(reward(images), expected)
    probability = load_reward("classifier", classifier=module, target=3, output="prob")(images)
    torch.testing.assert_close(probability, expected.exp())

    path = tmp_path / "classifier.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(module.eval(), (images[:2],), dynamic_shapes=({0: batch},)), str(path))
    torch.testing.assert_close(load_reward("classifier", classifier=str(path), target=3)(images), expected)
    with pytest.raises(ValueError, match=r"torch.export.save"):
        load_reward("classifier", classifier=__file__, target=3)


class WritesAFile:
    """A pickle payload: unpickling it writes `target` (what an attacker's os.system would do)."""

    def __init__(self, target):
        self.target = pathlib.Path(target)

    def __reduce__(self):
        return pathlib.Path.write_text, (self.target, "the payload ran")


def export_tiny_classifier(path):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    batch = torch.export.Dim("batch")
    program = torch.export.export(TinyClassifier().eval(), (images,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def rewrite_archive(source, destination, edit):
    """Copy a .pt2 zip entry by entry; `edit(entries)` changes the {name-under-root: bytes} mapping."""
    with zipfile.ZipFile(source) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        entries = {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}
    edit(entries)
    with zipfile.ZipFile(destination, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(f"{root}/{name}", data)


def add_config_entry(entries, config_file, fqn, path_name, payload_bytes, directory):
    config = json.loads(entries[config_file])
    config["config"][fqn] = {"path_name": path_name, "is_param": False, "use_pickle": True, "tensor_meta": None}
    entries[config_file] = json.dumps(config).encode()
    entries[directory + path_name] = payload_bytes


def torch_save_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


PICKLED_ARCHIVES = {
    # an opaque constant: torch.export.load calls pickle.loads on it
    "opaque-constant": lambda target: lambda entries: add_config_entry(
        entries, "data/constants/model_constants_config.json", "evil", "opaque_obj_0",
        pickle.dumps(WritesAFile(target)), "data/constants/",
    ),
    # a weight marked use_pickle: torch.load(weights_only=False)
    "use-pickle-weight": lambda target: lambda entries: add_config_entry(
        entries, "data/weights/model_weights_config.json", "evil", "weight_9",
        torch_save_bytes(WritesAFile(target)), "data/weights/",
    ),
    # sample inputs that fail the weights_only load: torch retries them with weights_only=False
    "sample-inputs": lambda target: lambda entries: entries.update(
        {"data/sample_inputs/model.pt": torch_save_bytes(((WritesAFile(target),), {}))}
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(PICKLED_ARCHIVES))
def test_classifier_archive_with_a_pickled_entry_is_refused_before_unpickling(tmp_path, kind):
    clean, evil, target = tmp_path / "clean.pt2", tmp_path / f"{kind}.pt2", tmp_path / "pwned.txt"
    export_tiny_classifier(clean)
    rewrite_archive(clean, evil, PICKLED_ARCHIVES[kind](target))

    # the crafted archive is a real attack on plain torch.export.load: the payload runs (torch before 2.13 does not
    # unpickle opaque constants while loading, so there that one is only refused on principle)
    with contextlib.suppress(Exception):
        torch.export.load(str(evil))
    old_torch = tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 13)
    if not (kind == "opaque-constant" and old_torch):
        assert target.read_text() == "the payload ran"
    target.unlink(missing_ok=True)

    with pytest.raises(ValueError, match=r"refusing to load the classifier .*" + kind + r".*pt2.*(pickled|not plain)"):
        load_reward("classifier", classifier=str(evil), target=3)
    assert not target.exists()
    with pytest.raises(ValueError, match=r"without pickled constants.*safetensors"):
        load_reward("classifier", classifier=str(evil), target=3)
    assert not target.exists()
    assert load_reward("classifier", classifier=str(clean), target=3)(torch.rand(3, 3, 16, 16)).shape == (3,)


def test_classifier_archive_with_code_or_an_evaluated_shape_expression_is_refused(tmp_path):
    from dts_diffusers.rewards.classifier import is_plain_sympy

    clean = tmp_path / "clean.pt2"
    export_tiny_classifier(clean)
    compiled, expression = tmp_path / "compiled.pt2", tmp_path / "expression.pt2"
    rewrite_archive(clean, compiled, lambda entries: entries.update({"data/aotinductor/model/model.so": b"ELF"}))
    with pytest.raises(ValueError, match="compiled code"):
        load_reward("classifier", classifier=str(compiled), target=3)

    def edit(entries):
        graph = entries["models/model.json"].decode()
        assert "Symbol(" in graph  # the dynamic batch dimension
        entries["models/model.json"] = graph.replace("Symbol(", "__import__('os').getcwd() or Symbol(", 1).encode()

    rewrite_archive(clean, expression, edit)
    with pytest.raises(ValueError, match="shape expression"):
        load_reward("classifier", classifier=str(expression), target=3)
    assert is_plain_sympy("Mul(Integer(2), Symbol('s77', positive=True, integer=True)) + 1")
    assert not is_plain_sympy("Symbol('s0').__class__") and not is_plain_sympy("exec('x')")


def test_classifier_reward_errors():
    with pytest.raises(ValueError, match=r"needs classifier=.* and target="):
        load_reward("classifier", target=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reward("classifier", classifier="/nonexistent/classifier.pt", target=1)
    reward = load_reward("classifier", classifier=TinyClassifier(), target=12)
    with pytest.raises(ValueError, match="target class 12 in range"):
        reward(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"needs the target digit, an integer 0..9 \(got 11\)"):
        load_reward("digit-classifier", digit=11)


def test_classifier_reward_dtype_and_gradient():
    torch.manual_seed(0)
    module = TinyClassifier()
    images = torch.rand(3, 3, 8, 8, requires_grad=True)
    expected = module(images).log_softmax(1)[:, 1].detach()
    reward = load_reward("classifier", classifier=module, target=1, dtype=torch.bfloat16, differentiable=True)
    assert reward.dtype == torch.bfloat16
    scores = reward(images)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=0.05, rtol=0.05)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.skipif(importlib.util.find_spec("dts_diffusers.digits") is None, reason="dts_diffusers.digits not there")
def test_digit_classifier_reward_is_log_probability_of_digit():
    from dts_diffusers.digits import load_digit_classifier

    try:
        classifier = load_digit_classifier(which="reward")
    except FileNotFoundError as err:
        pytest.skip(f"the bundled digit classifier is not built yet: {err}")
    images = torch.rand(4, 3, 28, 28)
    reward = load_reward("digit-classifier", digit=7)
    expected = classifier.eval()(images).log_softmax(1)[:, 7]
    torch.testing.assert_close(reward(images), expected.float())
    assert (reward(images) <= 0).all()


def test_tensor_preprocessing_matches_clip_conventions():
    images = torch.rand(2, 3, 224, 224)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clip_preprocess(images, 224), (images - mean) / std)
    wide = torch.rand(1, 3, 100, 300)
    assert clip_preprocess(wide, 50).shape == (1, 3, 50, 50)
    assert clip_preprocess(wide, 50, 40).shape == (1, 3, 40, 40)
    torch.testing.assert_close(center_crop(wide, 100), wide[..., :, 100:200])
    assert clip_preprocess(torch.rand(1, 3, 16, 16), 64, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_reward_base_class_moves_images_to_its_device_and_dtype():
    class Mean(Reward):
        needs_prompts = False

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.seen = None

        def score(self, images, prompts):
            self.seen = images.dtype
            return self.scale * images.mean((1, 2, 3))

    reward = Mean().to(torch.bfloat16)
    scores = reward(torch.rand(2, 3, 4, 4))
    assert reward.seen == torch.bfloat16 and scores.dtype == torch.float32 and scores.device.type == "cpu"


def test_digit_classifier_reward_uses_the_digits_module(monkeypatch):
    digits = pytest.importorskip("dts_diffusers.digits")
    torch.manual_seed(0)
    module = TinyClassifier()
    asked = []
    monkeypatch.setattr(digits, "load_digit_classifier", lambda which, device=None: asked.append(which) or module)
    images = torch.rand(3, 3, 28, 28)
    expected = module(images).log_softmax(1)[:, 4]
    reward = load_reward("digit-classifier", digit=4, which="judge")
    assert asked == ["judge"] and reward.name == "digit-classifier[4]"
    torch.testing.assert_close(reward(images), expected)


def test_digit_classifier_reward_can_score_the_logit(monkeypatch):
    digits = pytest.importorskip("dts_diffusers.digits")
    torch.manual_seed(0)
    module = TinyClassifier()
    monkeypatch.setattr(digits, "load_digit_classifier", lambda which, device=None: module)
    images = torch.rand(3, 3, 28, 28)
    reward = load_reward("digit-classifier", digit=2, output="logit")
    torch.testing.assert_close(reward(images), module(images)[:, 2])
    with pytest.raises(ValueError, match="output must be one of"):
        load_reward("digit-classifier", digit=2, output="margin")


def test_load_reward_takes_any_reward_like_value_as_the_readme_says():
    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))

    images = torch.rand(3, 3, 8, 8)
    from_callable = load_reward(brightness)
    assert isinstance(from_callable, CallableReward)
    torch.testing.assert_close(from_callable(images, ["a"] * 3), images.mean(dim=(1, 2, 3)))
    existing = as_reward(brightness)
    assert load_reward(existing) is existing
    with pytest.raises(TypeError, match="cannot use int as a reward"):
        load_reward(3)


@pytest.mark.parametrize("digit", [None, 10, True, 2.5])
def test_digit_classifier_by_name_without_a_digit_names_the_fix(digit):
    with pytest.raises(ValueError, match=r"needs the target digit.*load_reward\('digit-classifier', digit=3\)"):
        load_reward("digit-classifier", digit=digit)
