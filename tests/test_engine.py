"""The tree engine on exact toy chains: laws, budgets, determinism, anytime continuation, storage, errors."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dts_diffusers import DTS
from dts_diffusers.engine import deficit_pick
from dts_diffusers.noise import randn_rows
from dts_diffusers.toy import bimodal_1d, gmm_2d, rare_mode_8d
from dts_diffusers.tree import Widening, boltzmann, soft_mean

TASK = bimodal_1d()


def make(task=TASK, **kw):
    kw.setdefault("lam", task.lam)
    return DTS(task.chain.prior, task.chain.transition, task.reward, task.num_steps, **kw)


def finished_leaf_values(dts):
    n = dts.tree.size
    return dts.tree.value_np[:n][(dts.tree.level_np[:n] == 0) & dts.tree.done_np[:n]]


@pytest.mark.parametrize("estimator", ["frontier", "nested", "held-out", "paper"])
def test_lambda_zero_samples_the_base_chain(estimator):
    """One draw from each of many independent trees: iid draws of the procedure's law, tested against the data."""
    task = bimodal_1d(num_steps=10)
    drawn = np.array(
        [make(task, lam=0.0, seed=s, estimator=estimator, batch_size=4).run(400).sample(1).item() for s in range(120)]
    )
    data = task.chain.sample_data(20000, torch.Generator().manual_seed(0)).flatten().numpy()
    assert stats.ks_2samp(drawn, data).pvalue > 0.01


def test_nested_and_held_out_estimators_are_unbiased_where_the_papers_rule_is_not():
    target = (TASK.target_samples(100_000, 0) > 0).float().mean().item()

    def high_mode_mass(**kw):
        return np.mean([(make(seed=s, **kw).run(20_000).sample(3000) > 0).float().mean().item() for s in range(2)])

    assert abs(high_mode_mass() - target) < 0.07
    assert abs(high_mode_mass(estimator="nested") - target) < 0.07
    assert abs(high_mode_mass(estimator="held-out", widening="paper") - target) < 0.07
    assert high_mode_mass(estimator="paper", widening="paper") < target - 0.1  # the bias documented in the README


X_T_BRANCHING = {"branch_at_x_t": True, "early_lineages": "branch"}  # x_T nodes branch: the trees before round 9


def test_cost_aware_level_shares_spend_equal_nfe_per_level():
    st = make(seed=0, level_cost_exponent=1.0, equal_share_levels=0, **X_T_BRANCHING).run(20_000).stats()
    costs = [20, 20, 16, 12, 8, 4]  # a new x_T seed, then a child of each node level, in NFE
    assert st["nfe_per_leaf"] == pytest.approx(len(costs) / sum(1 / c for c in costs), rel=0.02)
    spent = list(st["nfe_by_level"].values())
    assert len(spent) == len(costs) and max(spent) < 1.01 * min(spent)  # the root's key is its x_T seeds' level 21
    half = make(seed=0, level_cost_exponent=0.5, equal_share_levels=0, **X_T_BRANCHING).run(20_000).stats()
    assert 9.7 < half["nfe_per_leaf"] < 80 / 6  # between equal NFE and equal counts
    # the default: β = 0.75, the x_T seeds at the equal share, x_T nodes one child each: under 0.6·T
    assert 9.7 < make(seed=0).run(20_000).stats()["nfe_per_leaf"] < 0.6 * 20
    with pytest.raises(ValueError, match="level_cost_exponent must lie in"):
        make(level_cost_exponent=2.0)


def test_level_shares_keep_the_top_levels_even_and_split_the_rest_by_cost():
    from dts_diffusers.engine import level_shares

    levels = [21, 20, 16, 12, 8, 4]  # the root's x_T seeds, then each node level of a 20-step chain
    assert level_shares(levels, 20, 0.0) == pytest.approx(dict.fromkeys(levels, 1 / 6))
    shares = level_shares(levels, 20, 1.0, equal_top=1)
    assert sum(shares.values()) == pytest.approx(1.0) and shares[21] == pytest.approx(1 / 6)
    below = {lv: share * min(lv, 20) for lv, share in shares.items() if lv != 21}  # NFE spent per level
    assert max(below.values()) == pytest.approx(min(below.values()))
    st = make(seed=0, level_cost_exponent=1.0, equal_share_levels=1, **X_T_BRANCHING).run(20_000).stats()
    assert st["nfe_by_level"][21] == pytest.approx(st["nfe"] / 6 * 20 / st["nfe_per_leaf"], rel=0.02)


def test_by_default_the_levels_of_the_chains_first_fifth_take_equal_shares():
    """On the 100-step chain branching every 10, three of eleven levels (the root's seeds, x_T's children, level
    90's): the levels where a trajectory commits to a mode; by default (early_lineages="fresh") all three shares go
    to new seeds. On a 20-step chain branching every 4 the x_T nodes' children lie a fifth of the chain below x_T:
    x_T nodes keep one child, and the seeds alone take the equal share."""
    from dts_diffusers.engine import branches_at_x_t, high_noise_levels
    from dts_diffusers.toy import long_chain

    assert high_noise_levels([21, 20, 16, 12, 8, 4], 20) == 2
    assert high_noise_levels([21, 16, 12, 8, 4], 20) == 1
    assert high_noise_levels([101, *range(100, 0, -10)], 100) == 3
    assert not branches_at_x_t([20, 16, 12, 8, 4, 0], 20) and branches_at_x_t([20, 17, 12, 0], 20)
    assert branches_at_x_t([100, *range(90, -1, -10)], 100) and not branches_at_x_t([50, 0], 50)
    default = make(seed=0).run(20_000)
    assert (default.equal_share_levels, default.branch_at_x_t) == (1, False)
    tree = default.tree
    x_t_nodes = np.flatnonzero(tree.level_np[: tree.size] == 20)
    assert x_t_nodes.size > 100 and tree.child_count_np[x_t_nodes].max() == 1
    branching = make(seed=0, **X_T_BRANCHING).run(20_000)
    assert branching.equal_share_levels == 2 and branching._expansions_by_level[20] > 100
    with pytest.raises(TypeError, match="branch_at_x_t must be True, False or None"):
        make(branch_at_x_t=1)
    with pytest.raises(ValueError, match="pass early_lineages='branch' with it"):
        make(branch_at_x_t=True)
    with pytest.raises(ValueError, match="early_lineages must be one of"):
        make(early_lineages="fresh chains")
    chain = long_chain()
    branched = make(chain, seed=0, branch_levels=chain.branch_levels, early_lineages="branch").run(20_000)
    assert branched.equal_share_levels == 3 and branched.branch_at_x_t
    counts = branched._expansions_by_level
    assert counts[101] == pytest.approx(counts[100], abs=2) and counts[100] == pytest.approx(counts[90], abs=2)
    assert counts[80] < 0.7 * counts[90] and counts[10] > 1.5 * counts[90]  # below: ∝ cost^-0.75
    dts = make(chain, seed=0, branch_levels=chain.branch_levels).run(20_000)  # fresh early lineages
    assert dts.equal_share_levels == 3 and not dts.branch_at_x_t
    fresh = dts._expansions_by_level
    assert 100 not in fresh and 90 not in fresh  # the first fifth's nodes keep one child ...
    assert fresh[101] == pytest.approx(counts[101] + counts[100] + counts[90], abs=6)  # ... and seeds take their shares
    assert fresh[80] == pytest.approx(counts[80], abs=2) and fresh[10] == pytest.approx(counts[10], abs=4)
    tree = dts.tree
    early = np.isin(tree.level_np[: tree.size], [100, 90])
    assert tree.child_count_np[: tree.size][early].max() == 1
    assert dts.stats()["nfe_per_leaf"] < 0.55 * 100
    assert make(chain, branch_levels=chain.branch_levels, equal_share_levels=0).equal_share_levels == 0
    with pytest.raises(ValueError, match="or None for the chain's first fifth"):
        make(equal_share_levels=-1)


def test_sibling_spread_pools_the_variance_within_parents():
    from dts_diffusers.engine import sibling_spread

    values, parents = np.array([1.0, 3.0, 10.0, 14.0, 7.0]), np.array([5, 5, 6, 6, 9])  # 9: an only child
    assert sibling_spread(values, parents) == pytest.approx(math.sqrt((1 + 1 + 4 + 4) / (5 - 3)))
    assert math.isnan(sibling_spread(np.array([1.0, 2.0]), np.array([0, 1])))


def test_neyman_level_allocation_moves_expansions_to_where_outcomes_still_vary():
    """The last steps barely change a bimodal outcome: level 4 gets fewer expansions than the levels above it (the
    fixed rule gives every level the same count) on every seed, and well under them on the median seed."""
    ratios = []
    for seed in range(5):
        dts = make(seed=seed, level_allocation="neyman", **X_T_BRANCHING).run(20_000)
        counts = dts._expansions_by_level
        ratios.append(counts[4] / min(counts[lv] for lv in (8, 12, 16)))
        assert dts.stats()["draw_eligible_leaves"] == dts.stats()["leaves"]
    assert max(ratios) < 0.9 and float(np.median(ratios)) < 0.7, ratios
    with pytest.raises(ValueError, match="level_allocation must be one of"):
        make(level_allocation="greedy")


def test_default_rollouts_start_deep_and_every_leaf_can_be_drawn():
    from dts_diffusers.engine import level_shares

    st = make(seed=0).run(20_000).stats()
    # the frontier expands each level (x_T seeds included, x_T nodes not: they keep one child) its share of the
    # time: the seeds 1/5, the rest ∝ cost^-0.75; a leaf costs the shares' mean of (20, 16, 12, 8, 4) NFE, 10.6
    costs = dict(zip([21, 16, 12, 8, 4], [20, 16, 12, 8, 4], strict=True))
    shares = level_shares(list(costs), 20, 0.75, equal_top=1)
    assert st["nfe_per_leaf"] == pytest.approx(sum(shares[lv] * c for lv, c in costs.items()), rel=0.01)
    assert st["nfe_per_leaf"] <= 0.55 * TASK.num_steps
    narrow = make(seed=0, estimator="nested", widening=Widening(1.0, 0.4, 0.2, 0.9)).run(20_000).stats()
    assert narrow["nfe_per_leaf"] <= 0.6 * TASK.num_steps
    assert sum(st["nfe_by_level"].values()) == st["nfe"]
    assert st["draw_eligible_leaves"] == st["leaves"]
    paper = make(seed=0, estimator="paper", widening="paper").run(20_000).stats()
    assert paper["nfe_per_leaf"] > 0.95 * TASK.num_steps  # the paper's widening: nearly every rollout is full length
    held_out = make(seed=0, estimator="held-out", widening="paper").run(20_000).stats()
    assert held_out["draw_eligible_leaves"] < 0.8 * held_out["leaves"]


@pytest.mark.parametrize("estimator", ["frontier", "nested", "held-out", "paper"])
def test_draw_ess_is_that_of_the_descent_law_over_leaves(estimator):
    """stats()'s draw ESS equals (Σp)²/Σp² of leaf probabilities multiplied out along every root-to-leaf path."""
    dts = make(seed=6, estimator=estimator, batch_size=4).run(600)
    tree = dts.tree
    probs = []

    through = {}  # level -> probabilities of passing through each node of that level

    def descend(node, p):
        through.setdefault(int(tree.level_np[node]), []).append(p)
        if tree.level_np[node] == 0:
            probs.append(p)
            return
        kids = tree.children(node)
        kids = kids[tree.done_np[kids]]
        values = tree.value_np[kids]
        if estimator == "held-out":
            kids = kids[tree.is_draw_child_np[kids] & tree.draw_complete_np[kids]]
            values = tree.draw_value_np[kids]
        for kid, q in zip(kids, boltzmann(values, dts.lam), strict=True):
            descend(int(kid), p * q)

    descend(0, 1.0)
    probs = np.array(probs)
    st = dts.stats()
    assert st["draw_eligible_leaves"] == (probs > 0).sum()
    assert st["draw_ess"] == pytest.approx(probs.sum() ** 2 / (probs**2).sum())
    lineages = {lv: np.array(p) for lv, p in through.items() if 0 < lv <= dts.num_steps}
    assert st["draw_ess_by_level"] == pytest.approx({lv: p.sum() ** 2 / (p**2).sum() for lv, p in lineages.items()})
    assert all(1 <= ess <= st["draw_ess"] + 1e-9 for ess in st["draw_ess_by_level"].values())  # lineages merge upward


@pytest.mark.parametrize("mode", ["sample", "search"])
@pytest.mark.parametrize(
    "options",
    [{}, {"estimator": "nested"}, {"estimator": "held-out", "widening": "paper"},
     {"estimator": "paper", "widening": "paper"}, {"estimator": "paper", "widening": Widening.uniform(1.0, 0.5)},
     {"estimator": "nested", "widening": Widening(1.0, 0.2, 0.1, 0.5)}],
)  # fmt: skip
def test_any_batch_size_runs_within_budget(mode, options):
    """Large batches put every child of a node in flight at once: selection then expands instead of picking."""
    task = bimodal_1d(num_steps=8)
    for batch_size in (1, 5, 39, 64, 256):
        dts = make(task, seed=batch_size, mode=mode, batch_size=batch_size, **options).run(3000)
        assert dts.nfe <= 3000 and dts.stats()["leaves"] > 0
        assert dts.sample(8).shape == (8, 1)


def test_frontier_multiplies_a_good_node_across_its_level():
    """On the rare-mode chain the frontier puts far more leaves in the rare mode than its prior mass (0.5 %), where a
    top-down tree, whose nodes compete only with their siblings, stays near it."""
    task = rare_mode_8d()

    def rare_leaf_share(**kw):
        dts = make(task, seed=0, **kw).run(20_000)
        tree = dts.tree
        leaves = np.flatnonzero((tree.level_np[: tree.size] == 0) & tree.done_np[: tree.size])
        return task.high_mode(dts._latents(leaves.tolist())).float().mean().item()

    assert rare_leaf_share() > 0.1
    assert rare_leaf_share(estimator="nested") < 0.05


def test_deficit_pick_gives_each_child_its_share_to_within_one_visit():
    shares = np.array([0.5, 0.3, 0.15, 0.05])
    counts = np.zeros(4)
    for visits in range(1, 201):
        counts[deficit_pick(shares, visits, counts)] += 1
        assert np.all(np.abs(counts - shares * visits) < 1 + 1e-9)


def test_budget_is_never_exceeded_and_split_runs_equal_one_run():
    for budget in (20, 37, 999, 4321):
        assert make(seed=1).run(budget).nfe <= budget
    once = make(seed=5, batch_size=8).run(3000)
    twice = make(seed=5, batch_size=8).run(1500).run(1500)
    assert once.stats() | {"timings": None} == twice.stats() | {"timings": None}
    assert torch.equal(once.sample(50), twice.sample(50))


def test_draws_are_stratified_over_children_and_keep_the_descent_law():
    """A node holding m draws gives each child ⌊m·p⌋ or ⌈m·p⌉ of them, and on average exactly m·p."""
    dts = make(seed=3, estimator="held-out").run(3000)
    tree = dts.tree
    kids = tree.children(0)
    kids = kids[tree.is_draw_child_np[kids] & tree.draw_complete_np[kids]]
    probs = boltzmann(tree.draw_value_np[kids], dts.lam)

    def root_child_counts(leaves):
        top = []
        for leaf in leaves:
            while tree.parent_np[leaf] != 0:
                leaf = tree.parent_np[leaf]
            top.append(leaf)
        return np.array([top.count(k) for k in kids])

    n = 500
    rng = np.random.default_rng(0)
    mean_counts = np.zeros(kids.size)
    for _ in range(200):
        counts = root_child_counts(dts._draw_leaves(n, rng))
        assert counts.sum() == n
        assert np.all((counts >= np.floor(n * probs) - 1e-9) & (counts <= np.ceil(n * probs) + 1e-9))
        mean_counts += counts / 200
    np.testing.assert_allclose(mean_counts, n * probs, atol=0.15)


def test_same_seed_same_samples_and_other_seed_differs():
    a, b, c = (make(seed=s).run(2000) for s in (7, 7, 8))
    assert torch.equal(a.sample(64), b.sample(64))
    assert not torch.equal(a.sample(64), c.sample(64))


def test_tree_statistics_and_structure():
    dts = make(seed=2, batch_size=4).run(5000)
    st = dts.stats()
    assert st["nfe"] <= 5000 and st["iterations"] >= 5000 // TASK.num_steps
    assert st["leaves"] == st["reward_evals"]
    assert st["depth"] == TASK.num_steps + 1  # dummy root down to x_0
    tree = dts.tree
    levels = set(tree.level_np[1 : tree.size].tolist())
    assert levels == set(dts.node_levels)  # nodes only at branch levels
    # every node's visits = completed iterations through it: the root's equals 1 + iterations
    assert tree.visits_np[0] == 1 + st["iterations"]
    assert (tree.pending_np[: tree.size] >= 0).all()


def test_search_mode_draws_the_argmax_path_and_tracks_the_best_leaf():
    dts = make(seed=4, mode="search", search_backup="soft").run(4000)
    _, reward = dts.best()
    assert reward == pytest.approx(finished_leaf_values(dts).max())
    tree, node = dts.tree, 0
    while tree.level_np[node] > 0:  # argmax descent by soft value
        kids = tree.children(node)
        kids = kids[tree.done_np[kids]]
        node = int(kids[np.argmax(tree.value_np[kids])])
    assert torch.equal(dts.sample(1), dts._latents([node]))


def test_search_draws_are_the_best_leaves_in_order_under_max_backup():
    dts = make(seed=1, lam=math.inf, mode="search").run(3000)
    _, rewards = dts.sample(20, return_rewards=True)
    best = np.sort(finished_leaf_values(dts))[::-1][:20]
    np.testing.assert_allclose(rewards.numpy(), best, rtol=1e-6)


def test_search_returns_distinct_leaves_and_warns_when_the_tree_has_too_few():
    dts = make(seed=2, mode="search").run(2000)
    _, rewards = dts.sample(20, return_rewards=True)
    np.testing.assert_allclose(rewards.numpy(), np.sort(finished_leaf_values(dts))[::-1][:20], rtol=1e-6)
    assert dts.stats()["last_draw_distinct"] == 20
    small = make(seed=2, mode="search", batch_size=2).run(2 * TASK.num_steps)
    leaves = small.stats()["leaves"]
    with pytest.warns(UserWarning, match=f"only {leaves} leaves"):
        padded, padded_rewards = small.sample(2 * leaves + 1, return_rewards=True)
    assert padded.shape == (2 * leaves + 1, 1)
    assert small.stats()["last_draw_distinct"] == leaves
    # every leaf comes back in rank order, then again: not the best one repeated, so the mean stays the tree's own
    ranked = np.sort(finished_leaf_values(small))[::-1]
    np.testing.assert_allclose(padded_rewards.numpy(), np.concatenate([ranked, ranked, ranked[:1]]), rtol=1e-6)


def test_infinite_lambda_backs_up_the_max():
    dts = make(seed=0, lam=math.inf, mode="search").run(2000)
    assert dts.tree.value_np[0] == pytest.approx(finished_leaf_values(dts).max())


def test_soft_mean_is_stable_for_large_lambda_and_rewards():
    values = np.array([1000.0, 999.0, -5000.0])
    assert soft_mean(values, 1e4) == pytest.approx(1000.0 - math.log(3) / 1e4)
    assert soft_mean(values, 0.0) == pytest.approx(values.mean())
    assert soft_mean(values, math.inf) == 1000.0


def test_evicted_latents_are_replayed_from_seeds():
    task = gmm_2d(num_steps=20)
    full = make(task, seed=9).run(3000)
    small = make(task, seed=9, latent_budget_bytes=8 * 64, latent_device="cpu").run(3000)
    assert small.stats()["stored_latent_bytes"] <= 8 * 64
    torch.testing.assert_close(small.sample(32), full.sample(32), rtol=1e-5, atol=1e-5)
    assert small.nfe == full.nfe and small.replayed_nfe > 0 and full.replayed_nfe == 0


def test_rows_do_not_depend_on_batch_composition():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    x = TASK.chain.prior(3, gens)
    together = TASK.chain.transition(x, 5, [torch.Generator().manual_seed(s) for s in (4, 5, 6)])
    alone = TASK.chain.transition(x[1:2], 5, [torch.Generator().manual_seed(5)])
    torch.testing.assert_close(together[1:2], alone)


@pytest.mark.parametrize(
    ("kwargs", "budget", "message"),
    [
        ({"lam": -1.0}, 100, "lam must be >= 0"),
        ({}, 5, "below one rollout"),
        ({"branch_levels": [25]}, 100, "branch levels must lie in 1..num_steps=20"),
        ({"mode": "greedy"}, 100, "mode must be"),
        ({"estimator": "magic"}, 100, "estimator must be one of"),
        ({"widening": "wide"}, 100, "widening must be a Widening or one of"),
        ({"search_backup": "mean"}, 100, "search_backup must be"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, budget, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs).run(budget)


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (lambda x: torch.zeros(len(x), 1), r"shape \(\d+,\)"),
        (lambda x: torch.full((len(x),), float("nan")), "NaN or infinite"),
        (lambda x: torch.full((len(x),), float("inf")), "NaN or infinite"),
    ],
)
def test_bad_rewards_are_reported(reward, message):
    dts = DTS(TASK.chain.prior, TASK.chain.transition, reward, TASK.num_steps)
    with pytest.raises(ValueError, match=message):
        dts.run(100)


def test_bad_transition_shape_is_reported():
    dts = DTS(TASK.chain.prior, lambda x, level, gens: x[:, :0], TASK.reward, TASK.num_steps, estimator="paper")
    with pytest.raises(ValueError, match="transition must return a tensor shaped like its input"):
        dts.run(100)
    bad_x0 = DTS(TASK.chain.prior, lambda x, level, gens, return_x0=False: (x, x[:, :0]), TASK.reward, TASK.num_steps)
    with pytest.raises(ValueError, match=r"must return \(x_prev, x0_hat\)"):
        bad_x0.run(100)


def test_a_transition_without_a_prediction_is_refused_by_the_default_and_runs_under_the_paper_rules():
    def transition(x, level, gens):
        return TASK.chain.transition(x, level, gens)

    with pytest.raises(TypeError, match="return_x0=True"):
        DTS(TASK.chain.prior, transition, TASK.reward, TASK.num_steps)
    for options in ({"estimator": "paper", "widening": "paper"}, {"estimator": "held-out"}):
        assert DTS(TASK.chain.prior, transition, TASK.reward, TASK.num_steps, **options).run(200).nfe <= 200


def test_engine_works_on_a_generic_chain_without_the_toy():
    """A hand-written random-walk chain: the engine only needs the three callables."""

    def prior(n, gens):
        return randn_rows(gens, (3,))

    def transition(x, level, gens, return_x0=False):
        out = 0.9 * x + 0.1 * randn_rows(gens, x.shape[1:])
        return (out, x) if return_x0 else out

    dts = DTS(prior, transition, lambda x: x.sum(-1), num_steps=10, lam=2.0, seed=0).run(800)
    assert dts.sample(5).shape == (5, 3)
    assert dts.nfe <= 800


def counting(transition):
    """`transition` that records the level and row count of every call."""
    calls = []

    def wrapped(x, level, gens, return_x0=False):
        calls.append((level, len(x)))
        return transition(x, level, gens, return_x0=return_x0)

    return wrapped, calls


@pytest.mark.parametrize("batch_size", [16, 64])
def test_sample_replays_evicted_latents_together_level_by_level_and_bit_for_bit(batch_size):
    task = gmm_2d(num_steps=20)
    transition, calls = counting(task.chain.transition)
    full = make(task, seed=9, batch_size=batch_size).run(3000)
    small = DTS(task.chain.prior, transition, task.reward, task.num_steps, lam=task.lam, seed=9, batch_size=batch_size,
                latent_budget_bytes=8 * 64, latent_device="cpu").run(3000)  # fmt: skip
    calls.clear()
    replayed = small.replayed_nfe
    assert torch.equal(small.sample(64), full.sample(64))
    assert small.replayed_nfe - replayed == sum(rows for _, rows in calls) > 64  # every evicted leaf was replayed
    per_level = {level: sum(1 for lv, _ in calls if lv == level) for level, _ in calls}
    assert max(per_level.values()) <= math.ceil(64 / batch_size)
    assert max(rows for _, rows in calls) <= batch_size


def store_with_nodes(count, **kw):
    from dts_diffusers.tree import LatentStore, TreeArrays

    tree = TreeArrays(root_level=2)
    for _ in range(count):
        tree.add_node(0, 1, seed=0, is_draw_child=True)
    return tree, LatentStore(torch.device("cpu"), **kw)


def peak_bytes_allocated(call) -> int:
    """The most bytes torch held at once during `call()`, above what it held before (its allocator's own events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_the_latent_store_grows_by_pages_and_never_holds_more_than_its_latents_and_one_page():
    page = 64 * 1024
    tree, store = store_with_nodes(3000, budget_bytes=None, page_bytes=page)
    latents = torch.randn(3000, 4, 16, 16)  # 4 KiB each: 16 to a page
    held = 0
    for start in range(0, 3000, 100):
        held += peak_bytes_allocated(lambda s=start: store.put(tree, list(range(1 + s, 101 + s)), latents[s : s + 100]))
        assert held <= store.bytes + page
        held = store.allocated_bytes
    assert store.bytes == 3000 * 4096 and len(store.pages) == math.ceil(3000 / 16)
    stored = np.flatnonzero(tree.slot_np[: tree.size] >= 0)
    torch.testing.assert_close(store.get(tree.slot_np[stored].tolist()), latents[stored - 1], rtol=0, atol=0)


def test_the_latent_store_evicts_the_least_recently_used_within_its_budget():
    tree, store = store_with_nodes(40, budget_bytes=10 * 16, page_bytes=64)  # 16-byte latents: 10 slots, 4 a page
    latents = torch.arange(40 * 4, dtype=torch.float32).view(40, 4)
    store.put(tree, list(range(1, 11)), latents[:10])
    for node in [*range(4, 11), 1, 2, 3]:  # node 4 is the least recently used, then 5, …
        store.get([tree.slot_np[node]])
    store.put(tree, list(range(11, 16)), latents[10:15])
    assert store.allocated_bytes == store.bytes == 10 * 16
    assert sorted(np.flatnonzero(tree.slot_np[:16] >= 0).tolist()) == [1, 2, 3, 9, 10, 11, 12, 13, 14, 15]
    store.put(tree, list(range(16, 41)), latents[15:])  # more than it holds: the last ten stay
    assert np.flatnonzero(tree.slot_np[: tree.size] >= 0).tolist() == list(range(31, 41))
    torch.testing.assert_close(store.get(tree.slot_np[31:41].tolist()), latents[30:], rtol=0, atol=0)


def test_the_latent_budget_defaults_to_no_limit_off_the_gpu():
    from dts_diffusers.tree import default_latent_budget

    assert default_latent_budget(torch.device("cpu")) is None
    assert make(seed=0).run(400).store.budget_bytes is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_latent_budget_on_cuda_is_a_share_of_free_memory():
    from dts_diffusers.tree import CUDA_BUDGET_FRACTION, LatentStore, TreeArrays, default_latent_budget

    free, _ = torch.cuda.mem_get_info()
    budget = default_latent_budget(torch.device("cuda"))
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0.9 * CUDA_BUDGET_FRACTION * free <= budget <= CUDA_BUDGET_FRACTION * total
    tree, store = TreeArrays(root_level=2), LatentStore(torch.device("cuda"), None)
    node = tree.add_node(0, 1, seed=0, is_draw_child=True)
    store.put(tree, [node], torch.ones(1, 4, 8, 8))
    assert 0.9 * budget <= store.budget_bytes <= total and store.pages[0].is_cuda
    assert torch.equal(store.get([tree.slot_np[node]]).cpu(), torch.ones(1, 4, 8, 8))


@pytest.mark.parametrize(
    ("lam", "options"),
    [(1.0, {"estimator": "held-out"}), (0.0, {}), (30.0, {"estimator": "paper"}),
     (math.inf, {"mode": "search"}), (2.0, {"mode": "search", "estimator": "paper", "search_backup": "soft"})],
)  # fmt: skip
def test_backed_up_values_equal_a_recomputation_from_all_children(lam, options):
    """Backup updates one member of each soft mean per node; every node's three values must still be the soft means
    of its finished children (soft_mean over each set, as `refresh` computes them)."""
    dts = make(seed=0, lam=lam, **options).run(4000)
    tree, backup_lam = dts.tree, dts._backup_lam
    inner = [node for node in range(tree.size) if tree.level_np[node] > 0 and tree.done_np[node]]
    assert len(inner) > 300
    for node in inner:
        kids = tree.children(node)
        kids = kids[tree.done_np[kids]]
        draw = tree.is_draw_child_np[kids]
        values = tree.value_np[kids]
        expected = [soft_mean(values, backup_lam), soft_mean(values[~draw], backup_lam),
                    soft_mean(tree.draw_value_np[kids[draw & tree.draw_complete_np[kids]]], backup_lam)]  # fmt: skip
        got = [tree.value_np[node], tree.build_value_np[node], tree.draw_value_np[node]]
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_soft_means_recompute_where_a_removal_would_cancel():
    from dts_diffusers.tree import soft_replace, soft_state, soft_value

    values = np.array([5.0, 0.0, -1.0])
    state = soft_state(values, 10.0)
    assert soft_replace(state, 5.0, -2.0, 10.0) is None  # the member holding nearly all of the total drops
    moved = soft_replace(state, 0.0, 0.5, 10.0)
    assert soft_value(moved, 10.0) == pytest.approx(soft_mean(np.array([5.0, 0.5, -1.0]), 10.0), rel=1e-14)
    assert soft_replace(soft_state(values, math.inf), 5.0, 4.0, math.inf) is None  # the max fell
    assert soft_value(soft_replace(soft_state(values, math.inf), 0.0, 7.0, math.inf), math.inf) == 7.0
    assert soft_value(soft_replace(soft_state(values, 0.0), -1.0, 2.0, 0.0), 0.0) == pytest.approx(7.0 / 3)


def reference_frontier_unsplit(dts):
    """The frontier's masses by one pass over the whole tree, as the engine computed them before they were kept
    incrementally: m(n)·K(parent) per finished node (level-wise scale aside), and the finished nodes per level.
    Tilts telescope over each level's guide scale (`guide_scale`, fixed once the level has been measured)."""
    tree = dts.tree
    n = tree.size
    done, levels, parent = tree.done_np[:n], tree.level_np[:n], tree.parent_np[:n]
    scale = np.array([dts.guide_scale.get(int(level), 1.0) for level in levels])
    guide = np.nan_to_num(tree.guide_np[:n], nan=0.0) * scale  # each level's tempered guide
    kids = np.maximum(tree.child_count_np[:n], 1)
    mass, unsplit, rows_by_level = np.zeros(n), np.zeros(n), {}
    mass[0] = 1.0
    above = dts.num_steps + 1
    for level in dts.node_levels[:-1]:
        rows = np.flatnonzero(done & (levels == level))
        if rows.size:
            rows_by_level[level] = rows
            par = parent[rows]
            tilt = dts.lam * dts._trust[above] * (guide[rows] - np.where(par == 0, 0.0, guide[par]))
            unsplit[rows] = mass[par] * np.exp(tilt - tilt.max())
            mass[rows] = unsplit[rows] / kids[par]
        above = level
    return unsplit, rows_by_level


@pytest.mark.parametrize(("task", "lam"), [(TASK, TASK.lam), (TASK, 0.0), (gmm_2d(num_steps=20), 1.0)])
def test_the_incremental_frontier_picks_what_a_pass_over_the_tree_picks(task, lam):
    """Every pick of the kept masses is the argmax of C·m(n)/M − K(n) over the level, computed from scratch."""
    dts = make(task, seed=3, lam=lam)
    masses, picks, reference = dts._masses, [], {}
    start_batch, pick = dts._start_frontier_batch, masses.pick

    def start_and_measure():
        start_batch()
        reference["unsplit"], reference["rows"] = reference_frontier_unsplit(dts)

    def checked_pick(level, expansions):
        rows = reference["rows"][level]
        tree = dts.tree
        share = reference["unsplit"][rows] / np.maximum(tree.child_count_np[tree.parent_np[rows]], 1)
        expected = int(rows[deficit_pick(share / share.sum(), expansions, tree.child_count_np[rows])])
        picks.append((pick(level, expansions), expected))
        return picks[-1][0]

    dts._start_frontier_batch, masses.pick = start_and_measure, checked_pick
    dts.run(4000)
    assert len(picks) > 200
    if task is not TASK:  # the GMM's log-density guide is tempered mid-run: the picks after the retilt count too
        assert min(dts.guide_scale.values()) < 0.9
    assert [got for got, _ in picks] == [expected for _, expected in picks]


def test_only_a_guide_spread_past_the_cap_is_tempered():
    """A level's guide scale is min(1, cap / SD(λ·h)) over its first nodes: the GMM's log-density reward, whose
    x̂_0 at high noise spreads λ·h over tens of nats, is tempered most at the top; the bounded bimodal reward is not,
    and its tree is exactly the untempered one."""
    gmm = make(gmm_2d(), seed=1).run(20_000)
    scale = gmm.guide_scale
    assert gmm.stats()["guide_scale"] == scale  # reported, top level first
    assert set(scale) == set(gmm.node_levels[:-1]) and all(0 < s <= 1 for s in scale.values())
    assert scale[100] < 0.3 and scale[20] > scale[100]
    looser = make(gmm_2d(), seed=1, guide_spread_cap=30.0).run(20_000).guide_scale
    assert all(looser[level] >= scale[level] for level in scale) and looser[100] > scale[100]
    assert not make(gmm_2d(), seed=1, guide_spread_cap=None).run(5_000).guide_scale

    capped, free = make(seed=2).run(3000), make(seed=2, guide_spread_cap=None).run(3000)
    assert set(capped.guide_scale.values()) == {1.0} and len(capped.guide_scale) == len(capped.node_levels) - 1
    n = capped.tree.size
    assert n == free.tree.size and np.array_equal(capped.tree.value_np[:n], free.tree.value_np[:n], equal_nan=True)
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="guide_spread_cap must be positive"):
            make(guide_spread_cap=bad)


def test_grouped_boltzmann_and_systematic_match_each_group_alone():
    from dts_diffusers.engine import grouped_boltzmann, grouped_systematic
    from dts_diffusers.resampling import systematic

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 9, size=200)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    values = rng.normal(size=sizes.sum()).round(1)  # ties at λ = ∞
    counts = rng.integers(1, 50, size=sizes.size)
    for lam in (0.0, 2.0, math.inf):
        probs = grouped_boltzmann(values, starts, lam)
        uniforms = np.array([np.random.default_rng(g).random() for g in range(sizes.size)])
        shares = grouped_systematic(probs, starts, counts, uniforms)
        for g, (start, size) in enumerate(zip(starts, sizes, strict=True)):
            alone = boltzmann(values[start : start + size], lam)
            np.testing.assert_allclose(probs[start : start + size], alone, rtol=1e-12)
            drawn = systematic(alone, int(counts[g]), np.random.default_rng(g))
            assert shares[start : start + size].tolist() == np.bincount(drawn, minlength=size).tolist()


@pytest.mark.parametrize("options", [{}, {"estimator": "held-out", "widening": "paper"}])
def test_draw_frequencies_follow_the_descent_law_over_leaves(options):
    """Pooled over many stratified draws, each leaf comes up at its probability under the draw rule (stats()'s law),
    to within the binomial error of independent draws (stratification only lowers it)."""
    dts = make(seed=4, **options).run(3000)
    tree = dts.tree
    leaves = np.flatnonzero(tree.level_np[: tree.size] == 0)
    leaves = leaves[dts._drawable(leaves)[0]]  # the leaves _passage_probabilities gives, in order
    probs = dts._passage_probabilities()[0]
    rng = np.random.default_rng(0)
    drawn = np.concatenate([dts._draw_leaves(997, rng) for _ in range(200)])
    assert np.isin(drawn, leaves[probs > 0]).all()
    freq = np.bincount(np.searchsorted(leaves, drawn), minlength=leaves.size) / drawn.size
    assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / drawn.size) + 1e-9)
    assert (probs == 0).any() == bool(options)  # the held-out rule cannot draw its building children's leaves


def test_a_deep_copy_continues_exactly_as_the_original_would():
    """ComfyUI keeps a copy of a tree and grows it later: the copy must keep growing past its arrays' capacity."""
    import copy

    once = make(seed=5, batch_size=8).run(6000)
    copied = copy.deepcopy(make(seed=5, batch_size=8).run(1500)).run(4500)
    assert copied.tree.size > 1024  # the node arrays grew after the copy
    assert once.stats() | {"timings": None} == copied.stats() | {"timings": None}
    assert torch.equal(once.sample(50), copied.sample(50))


@pytest.mark.parametrize("estimator", ["paper", "held-out"])
def test_indexed_boltzmann_selection_builds_the_tree_a_pass_over_the_children_builds(estimator, monkeypatch):
    """With every node indexed (ChildDraws from two children on), the tree equals the one drawn by rng.choice over
    all children: the same uniform picks the same child."""
    import dts_diffusers.tree as tree_module

    plain = make(seed=8, estimator=estimator, widening=Widening.uniform(1.0, 0.5))
    plain._draws = None  # rng.choice over every finished child, as before the index
    plain.run(4000)
    monkeypatch.setattr(tree_module, "MIN_INDEXED_CHILDREN", 2)
    indexed = make(seed=8, estimator=estimator, widening=Widening.uniform(1.0, 0.5))
    drawn = []
    draw = indexed._draws.draw
    indexed._draws.draw = lambda node, u: drawn.append(draw(node, u)) or drawn[-1]
    indexed.run(4000)
    assert sum(child is not None for child in drawn) > 500
    size = plain.tree.size
    assert indexed.tree.size == size
    assert np.array_equal(plain.tree.parent_np[:size], indexed.tree.parent_np[:size])
    assert np.array_equal(plain.tree.seed_np[:size], indexed.tree.seed_np[:size])
