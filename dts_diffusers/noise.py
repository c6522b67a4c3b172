"""Per-row random streams, drawn on the compute device.

Every row of a batch draws its noise from its own generator (the diffusers convention of a list of generators), so
a row's result does not depend on which other rows share its batch. That is what lets the tree evict a latent and
replay it later from stored seeds, and what makes the same seed give the same tree at any batch size.

On the CPU each row is `torch.randn` from its own generator (diffusers' stream: a scheduler given the same
generator draws the same noise). On an accelerator, B draws on the CPU and a pageable copy per transition would stall
the host (2.3 ms at batch 8, 9.2 ms at batch 16 on SD latents), so `randn_rows` takes one 64-bit key per row from the
row's generator (which advances it) and computes each element's normal from (key, element index) with the
counter-based Philox4x32-10 generator (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) and the
Box–Muller transform, in vectorised integer ops on the device; the only transfer is the small table of round keys,
from pinned memory without blocking, and nothing reads back. The two paths give different numbers (a tree grown on a
GPU differs from one grown on the CPU at the same seed); on one device the same seed gives the same tree. On the CPU
the counter path would cost 3-4x torch's draw (`benchmarks/pipeline_speed.py`, noise section).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

LOW32 = 0xFFFFFFFF
PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)  # the key's increment per round
PHILOX_ROUNDS = 10


def row_generators(seeds: Sequence[int] | torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per row (on an accelerator it supplies the row's Philox key)."""
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def row_keys(generators: Sequence[torch.Generator]) -> np.ndarray:
    """One 64-bit Philox key per row, as two 32-bit words (uint64 [B, 2]), drawn from (and advancing) that row's
    CPU generator."""
    keys = [torch.randint(2**32, (2,), generator=g) for g in generators]
    return (torch.stack(keys).numpy() if keys else np.empty((0, 2))).astype(np.uint64)


def philox_round_keys(key: np.ndarray) -> np.ndarray:
    """The round keys of Philox keys `key` [..., 2] (32-bit words): uint64 [rounds, ..., 2]."""
    rounds = np.arange(PHILOX_ROUNDS, dtype=np.uint64).reshape(-1, *[1] * key.ndim)
    return (key + rounds * np.array(PHILOX_WEYL, dtype=np.uint64)) & np.uint64(LOW32)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without the host waiting: a pageable copy to a GPU synchronises, a pinned one not."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def philox4x32(counter: torch.Tensor, round_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Philox4x32 of counters [4, N] (words c0..c3) under round keys [R, B, 2], in torch on their device.

    Returns the output words as two [B, 2, N] tensors, (w0, w2) and (w3, w1), the layout the rounds use: c0 and c2
    are multiplied as one tensor, in buffers reused in place (few kernels, no allocation per round). Words are int64
    holding 32-bit values; c·M needs 64 unsigned bits, so it is taken as two products by the 16-bit halves of M, each
    below 2⁴⁹: exact in int64 on any device.
    """
    multipliers = to_device(torch.tensor(PHILOX_MULTIPLIERS).view(2, 1), round_keys.device)
    low_m, high_m = multipliers & 0xFFFF, multipliers >> 16
    shape = (round_keys.shape[1], 2, counter.shape[-1])
    pair, rest = (torch.stack([counter[i], counter[j]]).expand(shape).contiguous() for i, j in ((0, 2), (3, 1)))
    low, high, hi = (torch.empty_like(pair) for _ in range(3))
    for key in round_keys.unsqueeze(-1):
        torch.mul(pair, low_m, out=low)
        torch.mul(pair, high_m, out=high)
        torch.bitwise_right_shift(low, 16, out=hi)
        hi += high
        hi >>= 16  # (hi0, hi1): the top words of c0·M0 and c2·M1
        high &= 0xFFFF
        high <<= 16
        high += low
        high &= LOW32  # (lo0, lo1): their bottom words
        hi ^= rest
        torch.bitwise_xor(hi[:, 1], key[:, 0], out=pair[:, 0])  # c0 = hi1 ^ c1 ^ k0
        torch.bitwise_xor(hi[:, 0], key[:, 1], out=pair[:, 1])  # c2 = hi0 ^ c3 ^ k1
        rest, high = high, rest  # (c3, c1) = (lo0, lo1)
    return pair, rest


def box_muller(u, v, xp):
    """Standard normals [B, 4N] from 24-bit integers u, v [B, 2, N] held in float32 (exact), with `xp` = numpy or
    torch: the radius's uniform 1 − u·2⁻²⁴ lies in (0, 1], so its logarithm is finite (|z| ≤ sqrt(48·ln 2) ≈ 5.8)."""
    radius = xp.sqrt(-2 * xp.log(1 - u * 2**-24))
    theta = v * (2 * math.pi * 2**-24)
    return xp.stack([radius * xp.cos(theta), radius * xp.sin(theta)], -1).reshape(len(u), 4 * u.shape[-1])


def normals_torch(round_keys: torch.Tensor, count: int) -> torch.Tensor:
    """Float32 standard normals [B, count] under round keys (int64 [R, B, 2]), on their device, by Box–Muller on
    Philox words.

    Block n of N (counter n) gives 4 normals: words (w0, w3) make elements 2n and 2n + 1, words (w2, w1) elements
    2N + 2n and 2N + 2n + 1 (cosine, then sine), each uniform from its word's top 24 bits.
    """
    blocks = (count + 3) // 4
    counter = torch.zeros((4, blocks), dtype=torch.int64, device=round_keys.device)
    counter[0] = torch.arange(blocks, device=round_keys.device)
    pair, rest = philox4x32(counter, round_keys)
    u, v = (words.__irshift__(8).to(torch.float32) for words in (pair, rest))
    return box_muller(u, v, torch)[:, :count]


def randn_rows(
    generators: Sequence[torch.Generator],
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of shape `(len(generators), *shape)` on `device`, row `i` from `generators[i]` only.

    On the CPU, `torch.randn` per row; elsewhere one vectorised counter-based draw on the device (`philox_rows`), so
    the host neither draws B rows nor waits for a copy."""
    shape = tuple(int(size) for size in shape)
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "cpu":
        return philox_rows(generators, shape, device).to(dtype)
    rows = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    return (torch.stack(rows) if rows else torch.empty((0, *shape))).to(dtype)


def philox_rows(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Float32 noise `(len(generators), *shape)` on `device`: one key drawn from each row's generator, Philox4x32-10
    normals of (key, element index) in one vectorised computation (the same words on every device)."""
    round_keys = torch.from_numpy(philox_round_keys(row_keys(generators)).astype(np.int64))
    return normals_torch(to_device(round_keys, torch.device(device)), math.prod(shape)).reshape(len(generators), *shape)


def check_renoise_levels(from_level: int, to_level: int, num_steps: int) -> None:
    """`renoise(x, from_level, to_level, ...)` goes up a chain of `num_steps` levels (level 0 is x_0)."""
    if not 0 <= from_level < to_level <= num_steps:
        raise ValueError(
            f"renoise goes up the chain: need 0 <= from_level < to_level <= {num_steps} (the chain's num_steps) "
            f"(got from_level={from_level}, to_level={to_level})"
        )
