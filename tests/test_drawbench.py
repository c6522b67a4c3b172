"""benchmarks/drawbench.py: the shipped prompts, and a smoke run on the bundled tiny model with cheap rewards.

The smoke run covers every method at two budgets on two prompts, split over two shards: a rerun calls no pipeline
and leaves the rows as they were, a lost row is recomputed alone (an anytime tree regrown to the budget before it)
and equals the first run's, and the summary and plot are written.
"""

from __future__ import annotations

import hashlib
import json
import re

import PIL.Image
import pytest
from benchmark_scripts import loaded_benchmark

from dts_diffusers import DTSPipeline
from dts_diffusers.defaults import BUNDLED_MODEL_DIR

COUNTS = {
    "Colors": 25, "Conflicting": 10, "Counting": 19, "DALL-E": 20, "Descriptions": 20, "Gary Marcus et al.": 10,
    "Misspellings": 10, "Positional": 20, "Rare Words": 7, "Reddit": 38, "Text": 21,
}  # fmt: skip


@pytest.fixture(scope="module")
def drawbench():
    with loaded_benchmark("drawbench") as module:
        yield module


def test_the_prompts_are_drawbench(drawbench):
    prompts = drawbench.load_prompts()
    assert len(prompts) == 200
    assert {category: sum(p.category == category for p in prompts) for category in COUNTS} == COUNTS
    assert set(drawbench.CATEGORIES) == set(COUNTS)
    assert len({p.text for p in prompts}) == 200 and all(p.text.strip() == p.text != "" for p in prompts)
    assert (prompts[0].text, prompts[0].category) == ("A red colored car.", "Colors")
    assert (prompts[134].text, prompts[134].category) == ("Acersecomicke.", "Rare Words")
    assert prompts[-1].category == "Text"


def test_the_prompt_file_is_the_one_its_source_note_names(drawbench):
    note = (drawbench.DATA.parent / "DRAWBENCH_SOURCE.md").read_text()
    recorded = re.search(r"sha256 of `drawbench.csv`\*\*: ([0-9a-f]{64})", note)[1]
    assert hashlib.sha256(drawbench.DATA.read_bytes()).hexdigest() == recorded


def test_prompt_selection(drawbench):
    prompts = drawbench.load_prompts()
    two_each = drawbench.select_prompts(prompts, None, ["Colors", "Text"], 2)
    assert [(p.index, p.category) for p in two_each] == [(0, "Colors"), (1, "Colors"), (179, "Text"), (180, "Text")]
    with pytest.raises(drawbench.SetupError, match="categories are"):
        drawbench.select_prompts(prompts, None, ["Colours"], None)
    with pytest.raises(drawbench.SetupError, match=r"numbered 0\.\.199"):
        drawbench.select_prompts(prompts, [200], None, None)


def row(prompt: int, method: str, budget: int, reward: float) -> dict:
    return {
        "prompt_index": prompt, "category": "Colors", "method": method, "budget": budget, "max_reward": reward,
        "mean_reward": reward, "nfe": budget, "seconds": 1.0, "peak_memory_bytes": None, "judges": {},
    }  # fmt: skip


def test_means_compare_methods_on_the_prompts_all_of_them_finished(drawbench):
    rows = [row(0, "A", 10, 1.0), row(1, "A", 10, 3.0), row(0, "B", 10, 2.0), row(1, "A", 20, 5.0)]
    table = drawbench.summarize(rows)
    assert table["A"][10]["max_reward"] == 1.0 and table["A"][10]["prompts"] == 1  # prompt 1: B has not finished it
    assert table["A"][20]["max_reward"] == 5.0 and 20 not in table["B"]  # B did not run at 20: A alone


def test_a_rerun_with_other_settings_is_refused(drawbench, tmp_path):
    config = {key: None for key in drawbench.IDENTITY} | {"lam": 1.0, "methods": {"DTS*": ["dts*", {}]}}
    drawbench.check_config(tmp_path, config)
    merged = drawbench.check_config(tmp_path, config | {"methods": {"FK": ["fk", {"lam": 10.0}]}})
    assert merged["methods"] == {"DTS*": ["dts*", {}], "FK": ["fk", {"lam": 10.0}]}  # methods may be added
    with pytest.raises(drawbench.SetupError, match=r"lam: 1\.0 there, 2\.0 now"):
        drawbench.check_config(tmp_path, config | {"lam": 2.0})
    with pytest.raises(drawbench.SetupError, match="method FK"):
        drawbench.check_config(tmp_path, config | {"methods": {"FK": ["fk", {"lam": 1.0}]}})


def test_a_model_it_cannot_run_fails_before_loading_with_the_fix(drawbench, tmp_path):
    args = [
        "--judges",
        "--reward",
        "jpeg-compressibility",
        "--prompt-indices",
        "0",
        "--shard",
        "0/1",
        "--device",
        "cpu",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"no model_index\.json.*hf download stable-diffusion-v1-5"):
        drawbench.main(["--model", str(empty), "--out", str(tmp_path / "a"), *args])
    (empty / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(SystemExit, match="names 'FluxPipeline'; this benchmark runs StableDiffusion3Pipeline"):
        drawbench.main(["--model", str(empty), "--out", str(tmp_path / "b"), *args])
    with pytest.raises(SystemExit, match=r"no such folder.*hf download"):
        drawbench.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "c"), *args])


def test_smoke_run_every_method_resumes_and_reports(drawbench, tmp_path, monkeypatch):
    budgets = []
    original = DTSPipeline.__call__

    def counted(self, *args, **kwargs):
        budgets.append(kwargs["nfe_budget"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DTSPipeline, "__call__", counted)
    out = tmp_path / "run"
    common = [
        "--model", str(BUNDLED_MODEL_DIR), "--reward", "jpeg-compressibility", "--judges", "jpeg-incompressibility",
        "--methods", *drawbench.METHODS, "--budgets", "16", "32", "--steps", "4", "--batch-size", "4",
        "--images", "2", "--prompt-indices", "0", "25", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    methods = len(drawbench.METHODS)

    for shard in ("0/2", "1/2"):  # one prompt each; every method twice: anytime ones 16 then +16, the rest 16 and 32
        drawbench.main([*common, "--shard", shard])
    assert len(budgets) == 2 * methods * 2
    first = {path.name: path.read_bytes() for path in out.glob("rows-*.jsonl")}
    rows = {drawbench.row_key(r): r for r in drawbench.read_rows(out)}
    assert len(rows) == 2 * methods * 2
    assert {r["prompt_index"] for r in map(json.loads, first["rows-0of2.jsonl"].splitlines())} == {0}
    assert {r["prompt_index"] for r in map(json.loads, first["rows-1of2.jsonl"].splitlines())} == {25}
    assert all(r["nfe"] <= r["budget"] and len(r["rewards"]) == 2 for r in rows.values())
    assert all(r["max_reward"] >= max(r["rewards"]) - 1e-6 for r in rows.values())
    assert set(rows[(0, "DTS*", 32)]["judges"]) == {"jpeg-incompressibility"}

    budgets.clear()
    drawbench.main([*common, "--shard", "0/1"])  # everything is done: no pipeline call, the rows untouched
    assert budgets == []
    assert {path.name: path.read_bytes() for path in out.glob("rows-*.jsonl")} == first

    lost = {(25, "DTS*", 32), (25, "FK", 32)}  # as if the run had stopped before these rows
    kept = [line for line in first["rows-1of2.jsonl"].splitlines() if drawbench.row_key(json.loads(line)) not in lost]
    (out / "rows-1of2.jsonl").write_bytes(b"\n".join(kept) + b"\n")
    drawbench.main([*common, "--shard", "0/1"])
    assert sorted(budgets) == [16, 16, 32]  # DTS* regrown to 16 and continued by 16; FK rerun at 32
    again = {drawbench.row_key(r): r for r in drawbench.read_rows(out)}
    assert again.keys() == rows.keys()
    for key in lost:
        assert again[key]["nfe"] == rows[key]["nfe"]
        assert again[key]["rewards"] == pytest.approx(rows[key]["rewards"], rel=1e-5)

    summary = (out / "summary.md").read_text()
    assert all(f"| {label} |" in summary for label in drawbench.METHODS)
    assert "| Colors |" in summary and "| Conflicting |" in summary and "jpeg-incompressibility" in summary
    assert "paper:" not in summary  # the paper's points belong beside ImageReward only
    with PIL.Image.open(out / drawbench.PLOT) as image:
        assert image.format == "PNG" and image.width > 1000
