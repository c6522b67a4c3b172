"""benchmarks/toy.py's summaries: how often a tree's run beats a baseline's, rebuilt from a committed report."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from benchmark_scripts import BENCHMARKS, loaded_benchmark

ROUND4 = BENCHMARKS / "results" / "toy_allocation_round4"


@pytest.fixture(scope="module")
def toy():
    with loaded_benchmark("toy") as module:
        yield module


def rows(method: str, budget: int, values: list[float]) -> list[dict]:
    return [{"method": method, "seed": s, "budget": budget, "mmd": v} for s, v in enumerate(values)]


def test_head_to_head_counts_every_pair_of_seeds_and_ties_half(toy):
    entry = {
        "distance": "mmd",
        "rows": [
            *rows("DTS", 10, [0.1, 0.3]),
            *rows("best-of-N", 10, [0.2, 0.3]),  # pairs: 0.1<0.2, 0.1<0.3, 0.3>0.2, 0.3=0.3 -> (1 + 1 + 0 + 0.5) / 4
            *rows("SMC", 10, [0.05, 0.06]),
            *rows("DTS (paper)", 10, [0.01, 0.01]),  # the paper's rule is a reference, not a tree under test
            *rows("DTS", 20, [0.2]),
            *rows("best-of-N", 20, [0.1]),
        ],
    }
    found = toy.head_to_head(entry)
    assert set(found) == {"DTS"}
    assert found["DTS"]["best-of-N"] == {"10": pytest.approx(0.625), "20": 0.0}
    assert found["DTS"]["SMC"] == {"10": 0.0}


def test_a_committed_report_rebuilds_with_head_to_head_lines(toy):
    report = json.loads((ROUND4 / "s10b.json").read_text())
    report["sampling"] = {"rare-mode-8d": report["sampling"]["rare-mode-8d"]}
    text = toy.markdown(toy.finish(report))
    entry = report["sampling"]["rare-mode-8d"]
    share = entry["head_to_head"]["DTS (β=0.75, k=2)"]["best-of-N"]["100000"]
    ours = [r["mmd"] for r in entry["rows"] if r["method"] == "DTS (β=0.75, k=2)" and r["budget"] == 100_000]
    theirs = [r["mmd"] for r in entry["rows"] if r["method"] == "best-of-N" and r["budget"] == 100_000]
    assert len(ours) == len(theirs) == 10
    assert share == pytest.approx(sum(a < b for a in ours for b in theirs) / 100)
    line = next(t for t in text.splitlines() if t.startswith("- DTS (β=0.75, k=2) is closer to π* than best-of-N"))
    assert f"{100 * share:.0f} % at NFE 100000; than SMC" in line  # every budget, the largest last


def test_merging_reports_of_other_seeds_pools_them_and_a_rerun_replaces_its_own_runs(toy):
    report = json.loads((ROUND4 / "s10b.json").read_text())
    entry = report["sampling"]["rare-mode-8d"]
    first, second = json.loads(json.dumps(report)), json.loads(json.dumps(report))
    first["sampling"] = {"rare-mode-8d": entry | {"rows": [r for r in entry["rows"] if r["seed"] < 7]}}
    second["sampling"] = {"rare-mode-8d": entry | {"rows": [r for r in entry["rows"] if r["seed"] >= 7]}}
    rerun = json.loads(json.dumps(report))
    rerun_rows = [r | {"mmd": 0.0} for r in entry["rows"] if r["method"] == "best-of-N" and r["seed"] == 8]
    rerun["sampling"] = {"rare-mode-8d": entry | {"rows": rerun_rows}}
    report_merged = toy.merge([first, second, rerun])
    assert report_merged["seeds"] == 10
    merged = report_merged["sampling"]["rare-mode-8d"]
    assert len(merged["rows"]) == len(entry["rows"])  # disjoint seeds joined, the rerun replaced its own runs
    assert toy.seed_count(merged) == 10
    best_of_n = [r for r in merged["rows"] if r["method"] == "best-of-N"]
    assert [r["seed"] for r in best_of_n if r["mmd"] == 0.0] == [8] * len(rerun_rows)
    at_largest = [r["mmd"] for r in best_of_n if r["budget"] == 100_000]
    assert merged["summary"]["mmd"]["best-of-N"]["100000"]["median"] == pytest.approx(np.median(at_largest))
    assert "10 seeds. Cell:" in toy.markdown(toy.finish({**report, "sampling": {"rare-mode-8d": merged}, "search": {}}))


def test_a_sampler_spec_names_a_misspelled_option_instead_of_running_the_default():
    with loaded_benchmark("ranking") as ranking:
        label, (method, options) = ranking.parse_sampler('DTS (β=1)=dts:{"level_cost_exponent": 1}')
        assert (label, method, options) == ("DTS (β=1)", "dts", {"level_cost_exponent": 1})
        assert ranking.parse_sampler('SMC ten=smc:{"branch_levels": [20, 10]}')[1] == (
            "smc",
            {"branch_levels": [20, 10]},
        )
        for spec, message in [
            ('x=dts:{"level_cost_exponant": 1}', "dts has no option level_cost_exponant"),
            ("x=dst", "unknown method 'dst'"),
            ("x=dts:{level: 1}", "not a JSON object"),
            ("dts", "expected LABEL=METHOD"),
        ]:
            with pytest.raises(SystemExit, match=re.escape(message)):
                ranking.parse_sampler(spec)


def test_nfe_to_reach_interpolates_in_log_nfe_either_way():
    """Rewards rise to a target, distances fall to one: the first budget reaching it and the NFE between the grid's
    budgets, linear in log NFE."""
    with loaded_benchmark("ranking") as ranking:
        rising = {1000: 1.0, 2000: 1.2, 4000: 1.4}
        assert ranking.nfe_to_reach(rising, 1.3, lower_is_better=False) == (4000, pytest.approx(2000 * math.sqrt(2)))
        assert ranking.nfe_to_reach(rising, 0.9, lower_is_better=False) == (1000, 1000.0)
        assert ranking.nfe_to_reach(rising, 1.5, lower_is_better=False) == (None, None)
        falling = {1000: 400.0, 2000: 300.0, 8000: 200.0}
        assert ranking.nfe_to_reach(falling, 250.0) == (8000, pytest.approx(4000.0))
        assert ranking.nfe_to_reach(falling, 100.0) == (None, None)


def test_the_reuse_table_reads_where_a_real_trees_nfe_went_and_its_lineages(toy):
    """Two seeds of the default DTS on bimodal-1d: the table's NFE shares are the medians of each tree's
    nfe_by_level over its NFE, its lineage row the medians of draw_ess_by_level, its leaf row the draw's ESS."""
    task = toy.SAMPLING_TASKS["bimodal-1d"][0]()
    trees, rows = [], []
    for seed in (0, 1):
        tree = toy.make_sampler(task, "dts", {}, seed).run(600)
        rows.append({"method": "DTS", "seed": seed, "budget": 600} | toy.diagnostics(tree, tree.sample(50)))
        trees.append(tree.stats())
    lines = toy.reuse_table({"budgets": [600], "rows": rows})
    table = {line.split(" | ")[0][2:]: line.strip(" |").split(" | ")[1:] for line in lines if line.startswith("| ")}
    root = task.num_steps + 1
    assert table["seeds (root)"][0] == f"{np.median([s['nfe_by_level'][root] / s['nfe'] for s in trees]):.2f}"
    for level in task.branch_levels:
        share = np.median([s["nfe_by_level"].get(level, 0) / s["nfe"] for s in trees])
        lineages = np.median([s["draw_ess_by_level"][level] for s in trees])
        assert table[f"ℓ = {level}"] == [f"{share:.2f}", f"{lineages:.0f}"]
    eligible = np.median([s["draw_eligible_leaves"] for s in trees])
    assert table["leaves"] == ["—", f"{np.median([s['draw_ess'] for s in trees]):.0f} of {eligible:.0f} eligible"]
    assert json.loads(json.dumps(rows)) == rows  # a saved report reads the same (levels are strings)
    assert toy.reuse_table({"budgets": [600], "rows": [r | {"nfe_by_level": None} for r in rows]}) == []
