"""Resampling schemes for particle methods: each returns the ancestor index of every one of the `n` offspring."""

from __future__ import annotations

import numpy as np


def multinomial(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(weights.size, size=n, p=weights / weights.sum()))


def systematic(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """One uniform offset, n evenly spaced pointers into the weight CDF: lower variance than multinomial."""
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0
    return np.searchsorted(cdf, (rng.random() + np.arange(n)) / n, side="right")


def stratified_draws(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices ∝ weights, each one marginally a weighted draw, jointly systematic (fewer repeats), in random order."""
    index = systematic(weights, n, rng)
    rng.shuffle(index)
    return index


def ssp_counts(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Srinivasan sampling process: particle i gets ⌊n·w_i⌋ or ⌈n·w_i⌉ copies, n in total, E[copies] = n·w_i.

    Fractional parts are rounded pairwise: two fractional entries exchange mass until one of them is integral,
    with probabilities chosen so each keeps its expectation.
    """
    expected = n * weights / weights.sum()
    counts = np.floor(expected)
    frac = expected - counts
    carry = None  # the one entry still fractional after each exchange; O(n) in total
    for j in np.flatnonzero(frac > 1e-12):
        if carry is None:
            carry = j
            continue
        i = carry
        a, b = min(1 - frac[i], frac[j]), min(frac[i], 1 - frac[j])  # move a from j to i, or b from i to j
        if rng.random() < b / (a + b):
            frac[i], frac[j] = frac[i] + a, frac[j] - a
        else:
            frac[i], frac[j] = frac[i] - b, frac[j] + b
        carry = next((k for k in (i, j) if 1e-12 < frac[k] < 1 - 1e-12), None)
    counts = counts + np.round(frac)
    shortfall = n - int(counts.sum())  # only float round-off can leave one
    if shortfall:
        counts[np.argmax(frac if shortfall > 0 else counts)] += shortfall
    return counts.astype(np.int64)


def ssp(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.repeat(np.arange(weights.size), ssp_counts(weights, n, rng))


RESAMPLERS = {"multinomial": multinomial, "systematic": systematic, "ssp": ssp}


def effective_size(weights: np.ndarray) -> float:
    """(Σw)²/Σw² of non-negative weights: how many equally weighted items they are worth."""
    return float(weights.sum() ** 2 / (weights**2).sum())


def effective_sample_size(log_weights: np.ndarray) -> float:
    return effective_size(np.exp(log_weights - log_weights.max()))
