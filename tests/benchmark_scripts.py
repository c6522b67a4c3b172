"""Load a script of benchmarks/ as a module for the tests, the way the scripts run: beside their sibling `ranking`."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def loaded_benchmark(name: str) -> Iterator[ModuleType]:
    """benchmarks/<name>.py as the module `name`, registered while in use (dataclasses look their module up while a
    class is built), with benchmarks/ on sys.path for its sibling imports."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(BENCHMARKS))
