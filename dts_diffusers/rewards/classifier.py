"""Classifier rewards: log p(target | x) from any image classifier, and the MNIST digit classifier by name.

The classifier is a torch module, or a `torch.export` file (`torch.export.save(..., "classifier.pt2")`, which carries
its own graph and so loads without unpickling arbitrary code), mapping images in [0, 1] to logits [B, num_classes].
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward

OUTPUTS = ("log_prob", "prob", "logit")


def load_classifier_module(path: str | os.PathLike) -> nn.Module:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier file {path!r} does not exist; pass a torch module or a saved file")
    if not path.endswith(".pt2"):
        raise ValueError(
            f"cannot load the classifier {path!r}: pass a torch module, or a file written by torch.export.save "
            f"(a .pt2 exported in eval mode with a dynamic batch dimension)"
        )
    return torch.export.load(path).module()


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
    if digit is None or not 0 <= int(digit) <= 9:
        raise ValueError(f"the 'digit-classifier' reward needs digit=<0..9> (got {digit!r})")
    from dts_diffusers.digits import load_digit_classifier

    reward = ClassifierReward(load_digit_classifier(which=which, device=device).eval(), int(digit), output)
    reward.name = f"digit-classifier[{int(digit)}]"
    return reward.to(device=device, dtype=dtype)
