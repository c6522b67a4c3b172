"""The MLP head that the LAION aesthetic predictor and ImageReward share (both descend from the same code)."""

from __future__ import annotations

from torch import nn


def preference_mlp(embedding_dim: int) -> nn.Sequential:
    """Five linear layers with dropout between the first four; indices match both checkpoints (`0`, `2`, `4`, `6`, `7`).

    There are no activations: the reference code has them commented out, so the head is affine at eval time.
    """
    return nn.Sequential(
        nn.Linear(embedding_dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
