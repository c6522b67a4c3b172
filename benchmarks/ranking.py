"""Helpers shared by the benchmarks: ranking tables, the NFE a curve needs to reach a target, atomic writes,
sampler specs."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from dts_diffusers.methods import METHODS, build_sampler_options


def ranking_table(
    table: dict, budgets: list, key: str, lower_is_better: bool, cell: Callable[[dict], str]
) -> list[str]:
    """Markdown rows ranking the methods of `table` ({label: {budget: metrics}}) by `key` at each budget."""
    lines = ["| rank | " + " | ".join(f"NFE {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    columns = []
    for budget in budgets:
        ranked = sorted(table, key=lambda label: table[label][budget][key] * (1 if lower_is_better else -1))
        columns.append([f"{label}: {cell(table[label][budget])}" for label in ranked])
    for rank, cells in enumerate(zip(*columns, strict=True), start=1):
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    return lines


def nfe_to_reach(curve: dict, target: float, lower_is_better: bool = True) -> tuple[int | None, float | None]:
    """The first budget of `curve` ({budget: value}) whose value reaches `target`, and the NFE interpolated linearly
    in log NFE between it and the budget before (None, None when no budget does): a grid of budgets doubling at each
    step would otherwise report up to twice the NFE a method needs."""
    sign = -1.0 if lower_is_better else 1.0
    previous = None
    for budget, value in sorted(curve.items()):
        if sign * value >= sign * target:
            if previous is None or sign * previous[1] >= sign * value:
                return int(budget), float(budget)
            fraction = (target - previous[1]) / (value - previous[1])
            log_nfe = math.log(previous[0]) + fraction * (math.log(budget) - math.log(previous[0]))
            return int(budget), float(math.exp(log_nfe))
        previous = (budget, value)
    return None, None


def write_atomically(path: Path, text: str) -> None:
    """Write to a fresh file beside `path`, then rename: a failed run never leaves a half-written result, and two
    runs writing at once never share a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def parse_sampler(spec: str) -> tuple[str, tuple[str, dict]]:
    """'LABEL=METHOD[:JSON options]' -> (label, (method, options)), for side-by-side design experiments. Options
    are checked by name here: `build_sampler` drops the options a method does not take (so one set of arguments can
    drive every method), and a misspelled one would silently run the default."""
    head, brace, text = spec.partition(":{")
    label, _, method = head.rpartition("=")  # the label may hold "=" (β=1), the method name does not
    if not label or not method:
        raise SystemExit(f"--sampler {spec!r}: expected LABEL=METHOD[:JSON options]")
    if method not in METHODS:
        raise SystemExit(f"--sampler {spec!r}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        options = json.loads("{" + text) if brace else {}
    except ValueError as error:
        raise SystemExit(f"--sampler {spec!r}: the options are not a JSON object ({error})") from error
    accepted = build_sampler_options(method)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SystemExit(f"--sampler {spec!r}: {method} has no option {', '.join(unknown)}; it takes {accepted}")
    return label, (method, options)
