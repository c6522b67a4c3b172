"""Depth-first search with backtracking, and the forward-noising hook it backtracks with, on the exact toy chains."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from dts_diffusers.dfs import DepthFirstSearch
from dts_diffusers.methods import build_sampler
from dts_diffusers.noise import row_generators
from dts_diffusers.toy import bimodal_1d, checkerboard_2d

BIMODAL = bimodal_1d()
CHECKERBOARD = checkerboard_2d(num_steps=20)


class CountingTransition:
    """The toy chain's transition, recording every call's level, rows, inputs and outputs."""

    def __init__(self, chain):
        self.chain, self.calls = chain, []

    def __call__(self, x, level, generators, return_x0=False):
        out = self.chain.transition(x, level, generators, return_x0=return_x0)
        self.calls.append((level, x.clone(), out[0].clone() if return_x0 else out.clone()))
        return out

    @property
    def rows(self) -> int:
        return sum(len(x) for _, x, _ in self.calls)


class RecordingRenoise:
    def __init__(self, chain):
        self.chain, self.calls = chain, []

    def __call__(self, x, from_level, to_level, generators):
        self.calls.append((from_level, to_level, len(x)))
        return self.chain.renoise(x, from_level, to_level, generators)


def dfs(task, transition=None, renoise=None, **options) -> DepthFirstSearch:
    chain = task.chain
    return DepthFirstSearch(
        chain.prior, transition or chain.transition, task.reward, task.num_steps, lam=task.lam,
        renoise=renoise or chain.renoise, **options,
    )  # fmt: skip


def mixture_cdf(chain, level: int):
    means, var = chain._marginal(level)
    weights = chain.log_weights.exp().numpy()
    return lambda x: sum(w * stats.norm.cdf(x, m, s) for w, m, s in zip(weights, means[:, 0], var.sqrt(), strict=True))


# ---------------------------------------------------------------------------------------------------------------------
# renoise: the forward process q(x_to | x_from)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [(0, 7), (0, 20), (3, 12)])
def test_toy_renoise_draws_the_chain_marginal(path):
    """Exact data renoised to level L (through an intermediate level too) follows the closed-form marginal at L."""
    chain = BIMODAL.chain
    x = chain.sample_data(20000, torch.Generator().manual_seed(0))
    start, level = path
    if start:
        x = chain.renoise(x, 0, start, row_generators(range(20000)))
    x = chain.renoise(x, start, level, row_generators(range(100_000, 120_000)))
    assert stats.kstest(x[:, 0].numpy(), mixture_cdf(chain, level)).pvalue > 0.01
    means, var = chain._marginal(level)
    weights = chain.log_weights.exp()
    mean = (weights * means[:, 0]).sum()
    variance = (weights * (var + means[:, 0] ** 2)).sum() - mean**2
    assert x.mean().item() == pytest.approx(mean.item(), abs=0.03)
    assert x.var().item() == pytest.approx(variance.item(), rel=0.05)


def test_toy_renoise_is_per_row_and_checks_its_levels():
    chain = CHECKERBOARD.chain
    x = chain.sample_data(6, torch.Generator().manual_seed(1))
    whole = chain.renoise(x, 2, 9, row_generators(range(6)))
    part = chain.renoise(x[3:], 2, 9, row_generators(range(3, 6)))
    torch.testing.assert_close(whole[3:], part)
    with pytest.raises(ValueError, match="renoise goes up the chain"):
        chain.renoise(x, 9, 2, row_generators(range(6)))
    with pytest.raises(ValueError, match="to_level <= 20"):
        chain.renoise(x, 0, 21, row_generators(range(6)))


# ---------------------------------------------------------------------------------------------------------------------
# budgets
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [{}, {"max_backtracks": 8, "threshold_quantile": 0.9}, {"local_search_steps": 2, "local_search_step_size": 0.2}],
)
def test_dfs_never_exceeds_its_budget_and_counts_every_step(options):
    transition = CountingTransition(CHECKERBOARD.chain)
    search = dfs(CHECKERBOARD, transition, batch_size=4, seed=1, **options)
    spent = 0
    for budget in (31, 137, 400):
        search.run(budget)
        spent += budget
        assert search.nfe <= spent
        assert search.nfe == transition.rows  # every denoising step, repeated ones included
        assert search.stats()["running"] == 0  # a dive starts or backtracks only if every running dive can finish
    stats = search.stats()
    assert stats["backtracks"] > 0 and stats["dives"] == len(search._rewards)
    assert sum(search._dive_nfe) == search.nfe
    assert stats["mean_dive_nfe"] > CHECKERBOARD.num_steps


def test_each_dive_keeps_to_its_backtracking_budget():
    """Every score below δ=+inf: each dive backtracks exactly max_backtracks times, each costing ΔT + 1 NFE."""
    renoise = RecordingRenoise(CHECKERBOARD.chain)
    search = dfs(
        CHECKERBOARD, renoise=renoise, eval_levels=[10], backtrack_depth=4, max_backtracks=2, thresholds=np.inf,
        batch_size=3,
    )  # fmt: skip
    search.run(600)
    backtracks = search._dive_backtracks
    assert search.stats()["max_dive_backtracks"] == 2 and set(backtracks) <= {0, 1, 2}
    assert backtracks.count(2) >= len(backtracks) - 6  # only dives started near the end of the budget go short
    assert search._dive_nfe == [20 + b * (4 + 1) for b in backtracks]
    assert {(start, to) for start, to, _ in renoise.calls} == {(9, 14)}  # from the state after level 10, up to 10 + 4
    assert search.nfe <= 600 and sum(search._dive_nfe) == search.nfe


def test_spent_backtracks_continue_from_the_best_state_seen_at_that_level():
    transition = CountingTransition(CHECKERBOARD.chain)
    search = dfs(
        CHECKERBOARD, transition, eval_levels=[10], backtrack_depth=4, max_backtracks=3, thresholds=np.inf, batch_size=1
    )
    search.run(20 + 3 * 5)  # exactly one dive and its three backtracks
    visits = [out for level, _, out in transition.calls if level == 10]
    assert len(visits) == 4
    inputs = [x for level, x, _ in transition.calls if level == 10]
    scores = [CHECKERBOARD.reward(CHECKERBOARD.chain.x0_mean(x, 10)).item() for x in inputs]
    best = visits[int(np.argmax(scores))]
    after = [x for level, x, _ in transition.calls if level == 9]
    assert len(after) == 1 and torch.equal(after[0], best)


def test_low_score_backtracks_and_the_run_budget_can_forbid_it():
    """Hand-checked: one dive, one evaluation at level 4 of 8, ΔT=2; the first score is low, the second high."""

    class FirstCallLow:
        def __init__(self):
            self.calls = 0

        def __call__(self, x0):
            self.calls += 1
            return torch.full((len(x0),), -1.0 if self.calls == 1 else 1.0)

    chain = bimodal_1d(num_steps=8).chain
    for budget, backtracks, nfe in ((11, 1, 11), (10, 0, 8)):
        renoise = RecordingRenoise(chain)
        search = DepthFirstSearch(
            chain.prior, chain.transition, FirstCallLow(), 8, renoise=renoise, eval_levels=[4], backtrack_depth=2,
            thresholds=0.0, batch_size=1,
        )  # fmt: skip
        search.run(budget)
        assert search.stats()["dives"] == 1 and search.backtracks == backtracks and search.nfe == nfe
        # 4 steps down, the evaluated step, re-noise from 3 up to 6, 2 steps back to 4, evaluate again, 3 steps
        assert renoise.calls == ([(3, 6, 1)] if backtracks else [])


def test_adaptive_threshold_is_the_quantile_of_the_scores_seen():
    transition = CountingTransition(CHECKERBOARD.chain)
    search = dfs(CHECKERBOARD, transition, eval_levels=[16, 8], threshold_quantile=0.25, batch_size=4, seed=2)
    search.run(800)
    for level in (16, 8):
        seen = [x for lvl, x, _ in transition.calls if lvl == level]
        scores = CHECKERBOARD.reward(CHECKERBOARD.chain.x0_mean(torch.cat(seen), level)).numpy()
        assert search.stats()["thresholds"][level] == pytest.approx(np.quantile(scores, 0.25), rel=1e-5)
    assert search.backtracks > 0
    never = dfs(CHECKERBOARD, threshold_quantile=0.0, batch_size=4, seed=2).run(800)
    assert never.backtracks == 0 and never._dive_nfe == [20] * len(never._rewards)


# ---------------------------------------------------------------------------------------------------------------------
# what it finds, how it draws
# ---------------------------------------------------------------------------------------------------------------------
def test_without_backtracking_dives_are_plain_ancestral_rollouts():
    """The best-of-N special case: max_backtracks=0 gives exactly the chain's own rollouts, seed for seed."""
    chain = CHECKERBOARD.chain
    search = dfs(CHECKERBOARD, max_backtracks=0, batch_size=4, seed=5).run(8 * 20)
    generators = row_generators(np.random.Generator(np.random.PCG64(5)).integers(0, 2**63 - 1, 8))
    x = chain.prior(8, generators)
    for level in range(20, 0, -1):
        x = chain.transition(x, level, generators)
    assert sorted(search._rewards) == pytest.approx(sorted(CHECKERBOARD.reward(x).tolist()))


def test_backtracking_raises_the_reward_of_finished_dives_at_equal_nfe():
    plain = [np.mean(dfs(CHECKERBOARD, max_backtracks=0, seed=s).run(2000)._rewards) for s in range(2)]
    searched = [np.mean(dfs(CHECKERBOARD, seed=s).run(2000)._rewards) for s in range(2)]
    assert max(searched) < 0 and min(searched) > max(plain) + 1.5  # about -2.5 against -5.3


def test_search_mode_returns_the_best_first_and_sample_mode_weights_by_reward():
    searched = dfs(CHECKERBOARD, seed=3, mode="search").run(600)
    x, rewards = searched.sample(4, return_rewards=True)
    assert rewards[0].item() == pytest.approx(searched.best()[1]) == pytest.approx(max(searched._rewards))
    assert (rewards[:-1] >= rewards[1:]).all() and torch.equal(x[:1], searched.best()[0])
    greedy = dfs(CHECKERBOARD, seed=3).run(600)
    greedy.lam = float("inf")
    assert (greedy.sample(20, return_rewards=True)[1] == max(greedy._rewards)).all()
    uniform = dfs(CHECKERBOARD, seed=3).run(600)
    uniform.lam = 0.0
    assert len(torch.unique(uniform.sample(40, return_rewards=True)[1])) > 10


def test_same_seed_same_samples_and_runs_continue():
    first, second = dfs(CHECKERBOARD, seed=4).run(500), dfs(CHECKERBOARD, seed=4).run(500)
    assert torch.equal(first.sample(8), second.sample(8))
    dives = first.stats()["dives"]
    first.run(300)
    assert first.stats()["dives"] > dives and first.nfe <= 800


def test_callback_sees_finished_dives_and_can_stop_the_run():
    seen = []
    search = dfs(CHECKERBOARD, batch_size=2)
    search.run(2000, callback=lambda s: seen.append(s.best()[1]) or len(seen) == 3)
    assert len(seen) == 3 and search.nfe < 2000 and search.stats()["running"] > 0
    search.run(0)  # the interrupted dives are still in flight: a later run finishes them within the same budget
    assert search.stats()["running"] == 0 and search.nfe <= 2000


def test_registered_as_dfs_with_branch_levels_as_evaluation_levels():
    chain = CHECKERBOARD.chain
    search = build_sampler(
        "dfs", chain.prior, chain.transition, CHECKERBOARD.reward, 20, renoise=chain.renoise, branch_levels=[15, 5],
        widening="paper", max_backtracks=1,
    )  # fmt: skip
    assert isinstance(search, DepthFirstSearch) and search.eval_levels == [15, 5] and search.max_backtracks == 1
    assert search.backtrack_depth == 10


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"renoise": None}, "renoise=transition.renoise"),
        ({"thresholds": [0.0, 1.0]}, "one per evaluation level"),
        ({"threshold_quantile": 1.5}, "threshold_quantile must be in"),
        ({"backtrack_depth": 0}, "backtrack_depth must be >= 1"),
        ({"max_backtracks": -1}, "max_backtracks must be >= 0"),
        ({"eval_levels": [25]}, "eval_levels must be a non-empty list of levels in 1..num_steps=20"),
        ({"mode": "best"}, "mode must be"),
        ({"local_search_steps": 1, "local_search_step_size": -1.0}, "local_search_step_size must be a positive number"),
    ],
)
def test_bad_options_name_the_fix(options, match):
    chain = CHECKERBOARD.chain
    arguments = {"renoise": chain.renoise, **options}
    with pytest.raises(ValueError, match=match):
        DepthFirstSearch(chain.prior, chain.transition, CHECKERBOARD.reward, 20, **arguments)


def test_counts_may_be_numpy_integers_as_in_the_engine():
    """Step and batch counts read from arrays (np.int64) are taken, as `DTS` takes them; bools are not."""
    chain = CHECKERBOARD.chain
    search = DepthFirstSearch(
        chain.prior, chain.transition, CHECKERBOARD.reward, np.int64(20), renoise=chain.renoise,
        backtrack_depth=np.int64(5), batch_size=np.int64(4),
    )  # fmt: skip
    assert (search.num_steps, search.backtrack_depth, search.batch_size) == (20, 5, 4)
    assert all(type(value) is int for value in (search.num_steps, search.backtrack_depth, search.batch_size))
    with pytest.raises(TypeError, match=r"batch_size must be an integer \(got bool"):
        DepthFirstSearch(chain.prior, chain.transition, CHECKERBOARD.reward, 20, renoise=chain.renoise, batch_size=True)


def test_budget_below_one_dive_and_drawing_before_running_raise():
    search = dfs(CHECKERBOARD, local_search_steps=1)
    with pytest.raises(RuntimeError, match="call run"):
        search.best()
    with pytest.raises(ValueError, match="a dive costs at least 25 NFE"):
        search.run(24)


# ---------------------------------------------------------------------------------------------------------------------
# the dts command
# ---------------------------------------------------------------------------------------------------------------------
def test_dts_command_runs_dfs_with_local_search_on_the_bundled_model(tmp_path):
    from dts_diffusers import cli

    out = tmp_path / "dfs"
    arguments = ["generate", "--out", str(out), "--method", "dfs", "--steps", "6", "--branch-every", "3"]
    options = ["--method-option", "local_search_steps=1", "--method-option", "max_backtracks=1"]
    assert cli.main([*arguments, *options, "--nfe-budget", "40", "--checkpoints", "1", "--device", "cpu"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["nfe"] <= 40 and record["tree"]["dives"] >= 1 and record["tree"]["max_dive_backtracks"] <= 1
    assert record["tree"]["mean_dive_nfe"] >= 6 + 2  # one local-search step at each of the levels 6 and 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--method-option", "max_backtracks"], "write NAME=VALUE"),
        (["--method-option", "no_such=1"], "has no option no_such"),
        (["--method-option", "local_search_steps=1", "--reward", "jpeg-compressibility"], "needs a reward with"),
    ],
)
def test_dts_command_explains_bad_method_options(tmp_path, capsys, options, message):
    from dts_diffusers import cli

    assert cli.main(["generate", "--out", str(tmp_path / "x"), "--method", "dfs", *options]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()
