"""Per-row random streams.

Every row of a batch draws its noise from its own generator (the diffusers convention of a list of generators), so
a row's result does not depend on which other rows share its batch. That is what lets the tree evict a latent and
replay it later from stored seeds, and what makes the same seed give the same tree at any batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def row_generators(seeds: Sequence[int] | torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per row; CPU streams give the same numbers on every device."""
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def randn_rows(
    generators: Sequence[torch.Generator],
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of shape `(len(generators), *shape)`, row `i` drawn from `generators[i]`."""
    rows = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]
    out = torch.stack(rows) if rows else torch.empty((0, *shape))
    return out.to(device=device, dtype=dtype)


def check_renoise_levels(from_level: int, to_level: int, num_steps: int) -> None:
    """`renoise(x, from_level, to_level, ...)` goes up a chain of `num_steps` levels (level 0 is x_0)."""
    if not 0 <= from_level < to_level <= num_steps:
        raise ValueError(
            f"renoise goes up the chain: need 0 <= from_level < to_level <= {num_steps} (the chain's num_steps) "
            f"(got from_level={from_level}, to_level={to_level})"
        )
