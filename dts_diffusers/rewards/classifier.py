"""Classifier rewards: log p(target | x) from any image classifier, and the MNIST digit classifier by name.

The classifier is a torch module, or a `torch.export` file (`torch.export.save(..., "classifier.pt2")`), mapping images
in [0, 1] to logits [B, num_classes].

`torch.export.load` is not safe on its own: it unpickles (without `weights_only`) every weight or constant the archive
marks `use_pickle` (tensor subclasses, opaque objects, torchbind objects), falls back to a full unpickle of the sample
inputs when the restricted one fails, loads compiled AOTInductor code, and reads the pre-2.7 zip layout with the same
fallback. So before calling it, `check_pt2_archive` reads the archive's entries itself and refuses all of these: only
plain tensors stored as raw bytes, sample inputs that load with `torch.load(weights_only=True)`, and shape expressions
made of plain sympy terms get through. The graph still names the torch operators it calls, so load classifiers you
trust; a `torch.nn.Module` built in code with safetensors weights needs no archive at all.
"""

from __future__ import annotations

import io
import json
import numbers
import os
import re
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward

OUTPUTS = ("log_prob", "prob", "logit")


# the layout torch.export.save writes (torch/export/pt2_archive/constants.py), relative to the archive's root folder
MODELS_DIR = "models/"
WEIGHTS_DIR = "data/weights/"
CONSTANTS_DIR = "data/constants/"
SAMPLE_INPUTS_DIR = "data/sample_inputs/"
CODE_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia")
TENSOR_CONSTANT_PREFIX = "tensor_"
# names a shape expression (given to sympy.sympify, i.e. eval) may use; any other name is refused
SYMPY_NAMES_TEXT = (
    "Symbol Integer Float Rational Add Mul Pow Mod Max Min Abs floor ceiling Eq Ne Lt Le Gt Ge StrictLessThan "
    "StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not true false True False oo zoo nan "
    "Infinity NegativeInfinity positive negative nonnegative nonpositive integer real finite FloorDiv "
    "ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural FloatPow "
    "FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal "
    "ToFloat Identity OpaqueUnaryFn_sqrt"
)
SYMPY_NAMES = frozenset(SYMPY_NAMES_TEXT.split())
SYMPY_TOKEN = re.compile(
    r"\s+|'[A-Za-z0-9_]*'|[0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?|[A-Za-z_][A-Za-z0-9_]*|[-+*/%(),=<>!]+"
)


class UnsafeArchiveError(ValueError):
    """A .pt2 file whose loading would unpickle data or run compiled code."""


def load_classifier_module(path: str | os.PathLike) -> nn.Module:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier file {path!r} does not exist; pass a torch module or a saved file")
    if not path.endswith(".pt2"):
        raise ValueError(
            f"cannot load the classifier {path!r}: pass a torch module, or a file written by torch.export.save "
            f"(a .pt2 exported in eval mode with a dynamic batch dimension)"
        )
    with open(path, "rb") as handle:
        data = handle.read()  # checked and loaded from the same bytes, so the file cannot change in between
    check_pt2_archive(data, path)
    return torch.export.load(io.BytesIO(data)).module()


def check_pt2_archive(data: bytes, path: str) -> None:
    """Raise UnsafeArchiveError unless `torch.export.load` of these bytes can only read raw tensors and JSON."""

    def refuse(reason: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(
            f"refusing to load the classifier {path!r}: {reason}. Loading it would unpickle data or run code from "
            f"the file. Re-export it without pickled constants (plain tensors only: no tensor subclasses, "
            f"torchbind or opaque objects, no AOTInductor package) with torch.export.save, or pass a torch module "
            f"and load its weights from safetensors"
        )

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            roots = {name.split("/", 1)[0] for name in names}
            if len(roots) != 1 or any("/" not in name for name in names) or len(set(names)) != len(names):
                raise refuse("it is not a torch.export archive (one root folder, unique entries)")
            root = f"{roots.pop()}/"
            entries = {name[len(root) :]: name for name in names}
            read = lambda entry: archive.read(entries[entry])  # noqa: E731

            if read("archive_version").decode() != "0" or read("archive_format").decode() != "pt2":
                raise refuse("it is not a torch.export .pt2 archive of the current format (archive_version 0)")
            code = [entry for entry in entries if entry.startswith(CODE_DIRS)]
            if code:
                raise refuse(f"it holds compiled code ({code[0]})")
            models = [e[len(MODELS_DIR) : -len(".json")] for e in entries if e.startswith(MODELS_DIR)]
            if models != ["model"]:
                raise refuse(f"it must hold exactly one exported program, models/model.json (found {models})")
            for model in models:
                check_payloads(read, entries, model, refuse)
                check_shape_expressions(json.loads(read(f"{MODELS_DIR}{model}.json")), refuse)
            for entry in entries:
                if entry.startswith(SAMPLE_INPUTS_DIR):
                    try:  # torch retries a failed restricted load with a full unpickle; make sure it never fails
                        torch.load(io.BytesIO(read(entry)), weights_only=True)
                    except Exception as error:
                        raise refuse(f"its sample inputs {entry} are not plain tensors ({error})") from None
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise refuse(f"it is not a readable torch.export archive ({type(error).__name__}: {error})") from None


def check_payloads(read, entries: dict, model: str, refuse) -> None:
    """Weights and constants must all be raw tensor bytes: `use_pickle` entries are unpickled without weights_only,
    `custom_obj_*` / `opaque_obj_*` constants are unpickled outright, and `<model>.pt` is the legacy pickled form."""
    for directory, kind in ((WEIGHTS_DIR, "weights"), (CONSTANTS_DIR, "constants")):
        if f"{directory}{model}.pt" in entries:
            raise refuse(f"its {kind} are pickled ({directory}{model}.pt, the legacy layout)")
        config_entry = f"{directory}{model}_{kind}_config.json"
        if config_entry not in entries:
            raise refuse(f"it has no {config_entry}")
        config = json.loads(read(config_entry)).get("config", {})
        if not isinstance(config, dict):
            raise refuse(f"{config_entry} is not a payload config")
        for fqn, payload in config.items():
            file_name = payload.get("path_name", "") if isinstance(payload, dict) else ""
            if not isinstance(payload, dict) or payload.get("use_pickle") is not False:
                raise refuse(f"its {kind} entry {fqn!r} ({directory}{file_name}) is pickled (use_pickle)")
            if kind == "constants" and not str(file_name).startswith(TENSOR_CONSTANT_PREFIX):
                raise refuse(f"its constant {fqn!r} ({directory}{file_name}) is a pickled object, not a tensor")


def check_shape_expressions(graph, refuse) -> None:
    """torch.export parses every `expr_str` with sympy.sympify, which evaluates it as Python: allow plain terms only."""
    stack = [graph]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr_str" and not is_plain_sympy(value):
                    raise refuse(f"a shape expression is not a plain sympy term ({str(value)[:80]!r})")
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


def is_plain_sympy(text) -> bool:
    if not isinstance(text, str):
        return False
    position = 0
    while position < len(text):
        token = SYMPY_TOKEN.match(text, position)
        if token is None:
            return False
        word = token.group()
        if (word[0].isalpha() or word[0] == "_") and word not in SYMPY_NAMES:
            return False
        position = token.end()
    return True


class ClassifierReward(Reward):
    """`log_softmax(classifier(x))[target]` by default (`output="prob"` or `"logit"` for the others)."""

    needs_prompts = False
    image_channels = (1, 3)

    def __init__(self, classifier: nn.Module, target: int, output: str = "log_prob", image_size: int | None = None):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS} (got {output!r})")
        self.classifier = classifier.requires_grad_(False)
        self.target = int(target)
        self.output = output
        self.image_size = image_size
        self.name = f"classifier[{self.target}]"

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        if self.image_size is not None and images.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        logits = self.classifier(images).float()
        if logits.ndim != 2 or not 0 <= self.target < logits.shape[1]:
            raise ValueError(
                f"the classifier returned shape {tuple(logits.shape)}; it must return logits [B, num_classes] with "
                f"target class {self.target} in range"
            )
        if self.output == "logit":
            return logits[:, self.target]
        log_probs = logits.log_softmax(dim=1)[:, self.target]
        return log_probs.exp() if self.output == "prob" else log_probs


def load_classifier_reward(
    device=None,
    dtype=None,
    classifier: nn.Module | str | os.PathLike | None = None,
    target: int | None = None,
    output: str = "log_prob",
    image_size: int | None = None,
) -> ClassifierReward:
    """`load_reward("classifier", classifier=module_or_path, target=k)`."""
    if classifier is None or target is None:
        raise ValueError("the 'classifier' reward needs classifier=<torch module or file> and target=<class index>")
    module = classifier.eval() if isinstance(classifier, nn.Module) else load_classifier_module(classifier)
    return ClassifierReward(module, target, output, image_size).to(device=device, dtype=dtype)


def load_digit_reward(
    device=None, dtype=None, digit: int | None = None, which: str = "reward", output: str = "log_prob"
) -> ClassifierReward:
    """log p(digit | x) under the project's digit classifier (`dts_diffusers.digits`), imported only when asked for.

    `output="logit"` gives the digit's logit instead, which keeps rising where log p saturates at 0 (search tasks).
    """
    if isinstance(digit, bool) or not isinstance(digit, numbers.Integral) or not 0 <= int(digit) <= 9:
        raise ValueError(
            f"the 'digit-classifier' reward needs the target digit, an integer 0..9 (got {digit!r}): build it with "
            "load_reward('digit-classifier', digit=3) and pass that object as reward= (from the command line: "
            "--digit 3, or a prompt that names the digit)"
        )
    from dts_diffusers.digits import load_digit_classifier

    reward = ClassifierReward(load_digit_classifier(which=which, device=device).eval(), int(digit), output)
    reward.name = f"digit-classifier[{int(digit)}]"
    return reward.to(device=device, dtype=dtype)
