"""benchmarks/digits.py's summaries: means over runs with the FID's standard error, rebuilt from a committed report."""

from __future__ import annotations

import json
import math

import pytest
from benchmark_scripts import BENCHMARKS, loaded_benchmark


@pytest.fixture(scope="module")
def digits_benchmark():
    with loaded_benchmark("digits") as module:
        yield module


def run(method: str, budget: int, fid: float) -> dict:
    return {"task": "sampling", "method": method, "budget": budget, "fid": fid, "nfe": budget, "judge_accuracy": 0.9,
            "diversity": 30.0, "best_reward": 0.0, "mean_reward": -0.1, "seconds": 1.0}  # fmt: skip


def test_each_mean_fid_comes_with_its_standard_error(digits_benchmark):
    table = digits_benchmark.aggregate(
        [run("DTS", 2000, f) for f in (100.0, 200.0, 300.0)] + [run("SMC", 2000, 50.0)], "sampling"
    )
    assert table["DTS"][2000]["fid"] == 200.0
    assert table["DTS"][2000]["fid_se"] == pytest.approx(100.0 / math.sqrt(3))  # sample SD 100 over three runs
    assert math.isnan(table["SMC"][2000]["fid_se"])  # one run: no spread to read


def test_the_committed_report_rebuilds_with_standard_errors(digits_benchmark):
    """digits.md is written from digits.json's rows: every sampling cell shows FID ± SE, and the headline comparison
    is the committed one."""
    record = json.loads((BENCHMARKS / "results" / "digits.json").read_text())
    sampling = digits_benchmark.aggregate(record["rows"], "sampling")
    search = digits_benchmark.aggregate(record["rows"], "search")
    budgets = record["settings"]["budgets"]
    found = digits_benchmark.claims(sampling, search, budgets[-1])
    assert found["fid"]["best_baseline"] == record["claims"]["fid"]["best_baseline"]
    settings = type("Settings", (), record["settings"])
    report = digits_benchmark.markdown(sampling, search, found, settings)
    dts_2000 = sampling["DTS"][2000]
    assert f"DTS: {dts_2000['fid']:.0f} ± {dts_2000['fid_se']:.0f} /" in report
    assert (BENCHMARKS / "results" / "digits.md").read_text().strip() == report.strip()


def test_exact_reference_accepts_base_samples_with_probability_exp_lambda_r(digits_benchmark):
    """At λ = 0 every base-model sample is an exact π* sample (π* is the base law), so every size the pool allows is
    measured; at λ = 1 the classifier's p(digit | x) rejects most of them."""
    from dts_diffusers import DTSPipeline, digits

    pipe = DTSPipeline.from_pretrained(digits.bundled_model_path())
    pipe.set_progress_bar_config(disable=True)
    args = type("Args", (), {"digits": [3], "exact_reference": 24, "steps": 4, "batch_size": 24, "draws": 16})
    flat = digits_benchmark.exact_reference(pipe, type("Flat", (args,), {"lam": 0.0}), repeats=2)
    assert flat["per_digit"][3]["acceptance"] == 1.0
    assert list(flat["fid_by_exact_samples"]) == [10, 15]  # the sizes up to the 24 samples drawn
    assert all(math.isfinite(v) and v > 0 for v in flat["fid_by_exact_samples"].values())
    tilted = digits_benchmark.exact_reference(pipe, type("Tilted", (args,), {"lam": 1.0}), repeats=2)
    assert 0 < tilted["per_digit"][3]["acceptance"] < 0.5  # about one digit in ten is a 3
