"""Every code block of the README and every script in examples/ runs as written (CI runs this file).

Python blocks and examples run in a fresh interpreter in an empty folder. Bash blocks: the set-up block's test command
is the one `.ci/run` runs, and its `dts generate` runs; the HPSv2 block runs with `pip` replaced by a shell function
that prints its arguments (CI installs nothing), so the torchvision pin it computes is checked against this torch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```$", README, flags=re.M | re.S)
PYTHON_BLOCKS = [code for lang, code in BLOCKS if lang == "python"]
BASH_BLOCKS = [code for lang, code in BLOCKS if lang == "bash"]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
EXAMPLE_ARGS = {"comfyui_api.py": ["--dry-run", "--prompt", "a lighthouse", "--lam", "2"]}  # no server in CI


def run_python(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_readme_has_the_blocks_this_file_runs():
    assert len(PYTHON_BLOCKS) >= 3 and len(BASH_BLOCKS) >= 2
    assert set(lang for lang, _ in BLOCKS) <= {"python", "bash"}, "a block in a language this test cannot run"
    assert {p.name for p in EXAMPLES} >= {
        "toy_engine.py", "pipeline_bundled.py", "custom_reward.py", "continue_tree.py", "comfyui_api.py",
    }  # fmt: skip


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(PYTHON_BLOCKS[index])
    result = run_python([str(script)], tmp_path)
    assert result.returncode == 0, f"README python block {index}:\n{PYTHON_BLOCKS[index]}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, tmp_path):
    result = run_python([str(path), *EXAMPLE_ARGS.get(path.name, [])], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "an example prints what it shows"


def setup_commands() -> list[str]:
    block = next(code for code in BASH_BLOCKS if "python -m venv" in code)
    return [line for line in block.splitlines() if line.startswith("python -m venv")]


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()[-1]
    assert ci.replace("pip install -q ", "pip install ") == setup_commands()[1]
    assert setup_commands()[0].startswith(setup_commands()[1].split(" && python -m pytest")[0])


def test_the_readme_main_job_runs(tmp_path):
    main_job = setup_commands()[0].split(" && ")[-1]
    assert main_job.startswith("dts generate ")
    result = run_python(["-m", "dts_diffusers.cli", *main_job.split()[1:]], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / main_job.split("--out ")[1].split()[0]
    assert (out / "comparison.png").is_file() and any(out.glob("*.json"))


def test_the_hpsv2_block_pins_the_torchvision_of_this_torch():
    block = next(code for code in BASH_BLOCKS if "torchvision" in code)
    stubbed = f'pip() {{ echo "pip $*"; }}\nPATH="{Path(sys.executable).parent}:$PATH"\n{block}'
    result = subprocess.run(["bash", "-c", stubbed], capture_output=True, text=True, timeout=60, check=True)
    minor = int(torch.__version__.split(".")[1])
    assert result.stdout.splitlines() == [
        f"pip install torchvision==0.{minor + 15}.*",
        "pip install dts-diffusers[hpsv2]",
    ]
