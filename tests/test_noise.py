"""randn_rows: torch's per-row stream on the CPU; on accelerators Philox4x32-10 normals per row key (`philox_rows`,
tested here on the CPU, where the same computation runs), the same at any batch composition."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dts_diffusers.noise import philox4x32, philox_round_keys, philox_rows, randn_rows, row_generators

# Random123's known-answer vectors for philox4x32_10 (its kat_vectors file): counter, key, output words
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def output_words(pair, rest) -> list[int]:
    """(w0, w1, w2, w3) of block 0, row 0, from the (w0, w2), (w3, w1) layout."""
    return [int(pair[0, 0, 0]), int(rest[0, 1, 0]), int(pair[0, 1, 0]), int(rest[0, 0, 0])]


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KAT)
def test_philox_matches_random123s_known_answers(counter, key, expected):
    round_keys = philox_round_keys(np.array([key], dtype=np.uint64))
    counter = np.array(counter, dtype=np.uint64).reshape(4, 1)
    torch_words = philox4x32(torch.from_numpy(counter.astype(np.int64)), torch.from_numpy(round_keys.astype(np.int64)))
    assert output_words(*torch_words) == list(expected)


def test_on_the_cpu_each_row_is_torchs_own_draw_from_its_generator():
    """diffusers' stream: a row is what torch.randn gives with the row's generator, which it advances."""
    drawn = randn_rows(row_generators([4, 8]), (3, 5))
    for row, seed in zip(drawn, [4, 8], strict=True):
        torch.testing.assert_close(row, torch.randn((3, 5), generator=torch.Generator().manual_seed(seed)))


def test_off_the_cpu_rows_come_from_one_vectorised_philox_draw(monkeypatch):
    """On an accelerator randn_rows computes the noise on the device (here "meta": shapes, no numbers) from one key
    per row, never drawing a row on the CPU."""
    from dts_diffusers import noise

    calls = []
    monkeypatch.setattr(noise, "philox_rows", lambda *args: calls.append(args) or noise.torch.zeros(2, 3))
    generators = row_generators([1, 2])
    out = randn_rows(generators, (3,), device="meta", dtype=torch.float16)
    assert len(calls) == 1 and calls[0][0] is generators and calls[0][2] == torch.device("meta")
    assert out.dtype == torch.float16 and out.shape == (2, 3)
    monkeypatch.undo()
    meta = noise.philox_rows(generators, (3, 4), torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == (2, 3, 4)


def philox(generators, shape, dtype=torch.float32) -> torch.Tensor:
    """The accelerator path, computed on the CPU (the same integer words on every device)."""
    return philox_rows(generators, tuple(shape), torch.device("cpu")).to(dtype)


def test_rows_depend_only_on_their_own_generator_never_on_the_batch():
    seeds = [11, 3, 7, 2**62, 0]
    together = philox(row_generators(seeds), (3, 5, 7))
    for index, seed in enumerate(seeds):
        torch.testing.assert_close(together[index], philox(row_generators([seed]), (3, 5, 7))[0], rtol=0, atol=0)
    reversed_rows = philox(row_generators(seeds[::-1]), (3, 5, 7))
    torch.testing.assert_close(reversed_rows, together.flip(0), rtol=0, atol=0)


def test_the_same_state_gives_the_same_noise_and_each_draw_advances_the_stream():
    first, again = row_generators([5, 6]), row_generators([5, 6])
    a, b = philox(first, (4, 9)), philox(again, (4, 9))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    following = philox(first, (4, 9))
    assert not torch.allclose(following, a)
    torch.testing.assert_close(following, philox(again, (4, 9)), rtol=0, atol=0)
    # one key (two 32-bit words) a row: the generator is where a two-word randint would leave it
    probe = torch.Generator().manual_seed(5)
    torch.randint(2**32, (2,), generator=probe)
    torch.randint(2**32, (2,), generator=probe)
    assert torch.equal(first[0].get_state(), probe.get_state())


def test_elements_of_a_row_come_from_blocks_by_index_whatever_the_shape():
    """The row's elements 2n, 2n + 1 come from block n: a longer row of the same key starts with the same pairs."""
    short, long = philox(row_generators([9]), (8,)), philox(row_generators([9]), (2, 20))
    torch.testing.assert_close(short[0, :4], long[0, 0, :4], rtol=0, atol=0)  # blocks 0 and 1, words (w0, w3)
    assert not torch.allclose(short[0, 4:], long[0, 0, 4:8])  # blocks 2 and 3 of the long row; the short has 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_dtype_and_shape_asked_for(dtype):
    x = philox(row_generators([1, 2, 3]), (2, 3, 5), dtype=dtype)
    assert x.dtype == dtype and x.shape == (3, 2, 3, 5) and x.device.type == "cpu"
    torch.testing.assert_close(x.float(), philox(row_generators([1, 2, 3]), (2, 3, 5)), rtol=1e-2, atol=1e-2)


def test_empty_batches_and_rows():
    assert philox([], (4, 2)).shape == (0, 4, 2)
    assert philox(row_generators([1]), (0, 3)).shape == (1, 0, 3)
    assert philox(row_generators([1, 2]), ()).shape == (2,)


@pytest.fixture(scope="module")
def million() -> torch.Tensor:
    """1000 rows (consecutive seeds, as the engine's sibling edges have) of 1000 elements, float64 for the sums."""
    return philox(row_generators(range(1000)), (10, 100), dtype=torch.float64).reshape(1000, 1000)


def test_a_million_draws_are_standard_normal(million):
    z = million.flatten().numpy()
    n = len(z)
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)
    tail = (np.abs(z) > 4).sum()  # the 24-bit uniforms keep the tails: P(|z| > 4) = 6.3e-5
    expected = n * 2 * stats.norm.sf(4)
    assert abs(tail - expected) < 5 * math.sqrt(expected)


def test_rows_and_neighbouring_elements_are_uncorrelated(million):
    z = million.numpy()
    bound = 5 / math.sqrt(z.shape[1])  # 5 standard errors of one correlation of 1000 pairs
    rows = np.corrcoef(z)[np.triu_indices(len(z), k=1)]
    assert np.abs(rows).max() < bound * 1.6  # the largest of 5e5 correlations: ~5.3 standard errors
    assert abs(rows.mean()) < 5 / math.sqrt(z.shape[1] * len(rows))
    flat = z.flatten()
    for lag in (1, 2, 3, 4, 500):  # the cos / sin pair, neighbouring blocks, and the half-row partner (2N apart)
        assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 5 / math.sqrt(len(flat))
    squares = (z**2).flatten()  # Box–Muller's cos and sin share a radius: their squares must still be independent
    assert abs(np.corrcoef(squares[0::2], squares[1::2])[0, 1]) < 5 / math.sqrt(len(squares) / 2)
