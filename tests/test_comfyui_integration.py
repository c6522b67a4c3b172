"""The node pack inside a real ComfyUI, driven through its HTTP API. Runs only when COMFYUI_PATH names a ComfyUI
checkout (COMFYUI_PYTHON: the interpreter of its environment, default the current one).

The test builds a tiny SD 1.5-architecture checkpoint with ComfyUI's own modules (UNet with 320 channels and one
level, zero-weight CLIP text encoder, random TAESD as the VAE), starts ComfyUI on the CPU with a temporary
--base-directory holding that checkpoint and a link to this repository in custom_nodes/, and runs
workflows/tiny_cpu_dts_api.json to saved images and reported rewards, with DTS and with a particle baseline picked by
the sampler's `method` input; the SamplerCustomAdvanced workflow with DTS Run Report; and the anytime workflow, whose
second sampler continues the first one's tree across two queue runs.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = [
    pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to run"),
    pytest.mark.slow,
]
ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = "dts-tiny-sd15.safetensors"
WORKFLOW = json.loads((ROOT / "workflows" / "tiny_cpu_dts_api.json").read_text())
SAMPLER_NODE = "6"
_spec = importlib.util.spec_from_file_location("comfyui_api", ROOT / "examples" / "comfyui_api.py")
comfyui_api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comfyui_api)
request = comfyui_api.request

BUILD_CHECKPOINT = """
import json, sys
out = sys.argv[1]
sys.argv = sys.argv[:1] + ["--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
from safetensors.torch import save_file
import comfy.ops
from comfy.clip_model import CLIPTextModel
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.taesd.taesd import TAESD

torch.manual_seed(0)
unet = UNetModel(
    image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1], channel_mult=(1,),
    num_heads=8, use_spatial_transformer=True, transformer_depth=[1], transformer_depth_output=[1, 1],
    transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False, device="meta",
    operations=comfy.ops.manual_cast,
)
state = {}
for key, value in unet.state_dict().items():
    fill = torch.randn(value.shape) * 0.02 if value.ndim > 1 else torch.zeros(value.shape)
    state["model.diffusion_model." + key] = fill
with open("comfy/sd1_clip_config.json") as f:
    clip = CLIPTextModel(json.load(f), dtype=torch.float16, device="meta", operations=comfy.ops.manual_cast)
for key, value in clip.state_dict().items():
    state["cond_stage_model.transformer." + key] = torch.zeros(value.shape, dtype=torch.float16)
for key, value in TAESD().state_dict().items():
    fill = torch.randn(value.shape) * 0.05 if value.ndim > 1 else torch.full(value.shape, float("scale" in key))
    state["first_stage_model." + key] = fill
save_file(state, out)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "dts_rewards" / "empty-weights").mkdir(parents=True)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "dts-diffusers").symlink_to(ROOT, target_is_directory=True)
    subprocess.run(
        [python, "-c", BUILD_CHECKPOINT, str(base / "models" / "checkpoints" / CHECKPOINT)],
        cwd=COMFYUI_PATH, env={**os.environ, "PYTHONPATH": COMFYUI_PATH}, check=True, timeout=300,
    )  # fmt: skip
    port = free_port()
    log = open(base / "comfyui.log", "w")  # noqa: SIM115 (closed at teardown)
    server = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base)],
        cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        assert server.poll() is None, (base / "comfyui.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "ComfyUI did not answer /object_info within 240 s"
        try:
            status, object_info = request(f"{url}/object_info")
            if status == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(1)
    yield {"url": url, "base": base, "server": server, "object_info": object_info}
    server.terminate()
    server.wait(timeout=30)
    log.close()


def run(comfyui, workflow: dict, timeout: float = 400) -> dict:
    """Queue and wait with the functions of examples/comfyui_api.py, so the example runs against a real ComfyUI."""
    return comfyui_api.wait(comfyui["url"], comfyui_api.queue(comfyui["url"], workflow), timeout)


def with_inputs(node: str, **inputs) -> dict:
    workflow = copy.deepcopy(WORKFLOW)
    workflow[node]["inputs"].update(inputs)
    return workflow


def execution_error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error"
    return next(data for kind, data in entry["status"]["messages"] if kind == "execution_error")


def test_pack_is_listed_with_its_reward_folder(comfyui):
    info = comfyui["object_info"]
    assert {"DTSRewardLoader", "DTSSampler", "DTSSamplerSelect", "DTSRunReport"} <= set(info)
    assert info["DTSSampler"]["display_name"] == "DTS Sampler"
    assert info["DTSSamplerSelect"]["display_name"] == "DTS Sampler (SAMPLER)"
    ours = [info[node]["display_name"].casefold() for node in info if node.startswith("DTS")]
    assert len(set(ours)) == len(ours) == 4  # distinct as the node search compares them
    assert info["DTSSampler"]["output_name"] == ["latent", "rewards", "summary", "tree"]
    assert info["DTSSampler"]["input"]["optional"]["tree"][0] == "DTS_TREE"
    weights = info["DTSRewardLoader"]["input"]["required"]["weights"]
    assert "empty-weights" in weights[1]["options"]
    status, stats = request(f"{comfyui['url']}/system_stats")
    assert status == 200
    print("ComfyUI version:", stats["system"]["comfyui_version"])


def test_tiny_workflow_saves_images_and_reports_rewards(comfyui):
    entry = run(comfyui, WORKFLOW)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["8"]["images"]
    assert len(images) == 2  # num_outputs
    for image in images:
        assert (comfyui["base"] / "output" / image["subfolder"] / image["filename"]).stat().st_size > 0
    rewards = entry["outputs"][SAMPLER_NODE]["rewards"]
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
    summary = entry["outputs"][SAMPLER_NODE]["text"][0]
    assert summary.startswith("DTS: rewards [") and "NFE 16/16" in summary


def test_the_example_script_queues_a_workflow_with_its_overrides(comfyui):
    workflow = comfyui_api.load_workflow(
        ROOT / "workflows" / "tiny_cpu_dts_api.json", prompt="a blue circle", lam=2.0, nfe_budget=8, num_outputs=1
    )
    entry = run(comfyui, workflow)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(entry["outputs"]["8"]["images"]) == 1
    assert "NFE 8/8" in entry["outputs"][SAMPLER_NODE]["text"][0]


def test_the_method_input_runs_a_particle_baseline_under_the_same_budget(comfyui):
    entry = run(comfyui, with_inputs(SAMPLER_NODE, method="bfs", mode="search"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(entry["outputs"]["8"]["images"]) == 2
    rewards = entry["outputs"][SAMPLER_NODE]["rewards"]
    assert len(rewards) == 2 and rewards == sorted(rewards, reverse=True)  # search: the best found, best first
    summary = entry["outputs"][SAMPLER_NODE]["text"][0]
    assert summary.startswith("BFS SEARCH: rewards [") and "NFE 16/16" in summary


def test_an_api_workflow_saved_before_the_method_input_still_runs_dts(comfyui):
    workflow = with_inputs(SAMPLER_NODE, seed=1, baseline="none")  # the input `method` replaced
    del workflow[SAMPLER_NODE]["inputs"]["method"]
    entry = run(comfyui, workflow)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"][SAMPLER_NODE]["text"][0].startswith("DTS: rewards [")


def test_wrong_inputs_are_node_errors_and_the_server_keeps_serving(comfyui):
    status, answer = request(f"{comfyui['url']}/prompt", {"prompt": with_inputs(SAMPLER_NODE, lam=-1.0)})
    assert status == 400 and SAMPLER_NODE in answer["node_errors"]
    assert "lam" in json.dumps(answer["node_errors"][SAMPLER_NODE])
    status, answer = request(f"{comfyui['url']}/prompt", {"prompt": with_inputs(SAMPLER_NODE, method="none")})
    assert status == 400 and "method: 'none' not in" in json.dumps(answer["node_errors"][SAMPLER_NODE])

    error = execution_error(run(comfyui, with_inputs(SAMPLER_NODE, nfe_budget=2)))
    assert error["node_id"] == SAMPLER_NODE and "below one rollout" in error["exception_message"]

    error = execution_error(run(comfyui, with_inputs(SAMPLER_NODE, eta=0.0)))
    assert error["node_id"] == SAMPLER_NODE and "eta must be > 0" in error["exception_message"]

    error = execution_error(run(comfyui, with_inputs("5", options="{'quality': 50}")))
    assert error["node_id"] == "5" and error["exception_message"].startswith("options: not valid JSON")
    assert "accepts: quality" in error["exception_message"]

    missing = with_inputs("5", reward_name="image-reward", weights="empty-weights", device="cpu")
    error = execution_error(run(comfyui, missing))
    assert error["node_id"] == "5" and "empty-weights" in error["exception_message"]

    assert comfyui["server"].poll() is None
    status, _ = request(f"{comfyui['url']}/object_info/DTSSampler")
    assert status == 200


def test_dts_sampler_in_sampler_custom_advanced(comfyui):
    workflow = json.loads((ROOT / "workflows" / "sampler_custom_advanced_dts_api.json").read_text())
    workflow["1"]["inputs"]["ckpt_name"] = CHECKPOINT
    workflow["4"]["inputs"].update(width=64, height=64, batch_size=2)
    workflow["5"]["inputs"].update(reward_name="jpeg-compressibility", weights="(none)", device="cpu")
    workflow["6"]["inputs"].update(nfe_budget=12, rollout_batch=3)
    workflow["9"]["inputs"]["steps"] = 3
    workflow["13"] = {"class_type": "DTSRunReport", "inputs": {"sampler": ["6", 0], "samples": ["10", 0]}}
    for method in ("dts", "smc"):
        workflow["6"]["inputs"]["method"] = method
        entry = run(comfyui, workflow)
        assert entry["status"]["status_str"] == "success", (method, entry["status"])
        assert len(entry["outputs"]["12"]["images"]) == 2  # as many samples as the latent batch
        assert len(entry["outputs"]["13"]["rewards"]) == 2
        assert entry["outputs"]["13"]["text"][0].startswith(f"{method.upper()}: rewards [")
    workflow["6"]["inputs"].update(nfe_budget=2, sigmas=["9", 0])  # the budget is checked on the SAMPLER node
    error = execution_error(run(comfyui, workflow))
    assert error["node_id"] == "6" and "nfe_budget=2 is below one rollout" in error["exception_message"]


def test_both_samplers_give_as_many_samples_as_the_latent_batch(comfyui):
    workflow = with_inputs(SAMPLER_NODE, num_outputs=0)
    workflow["4"]["inputs"]["batch_size"] = 3
    entry = run(comfyui, workflow)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(entry["outputs"]["8"]["images"]) == 3 and len(entry["outputs"][SAMPLER_NODE]["rewards"]) == 3


def test_a_second_queue_run_continues_the_cached_tree_with_more_budget(comfyui):
    workflow = json.loads((ROOT / "workflows" / "sd15_dts_anytime_tree_api.json").read_text())
    workflow["1"]["inputs"]["ckpt_name"] = CHECKPOINT
    workflow["4"]["inputs"].update(width=64, height=64)
    workflow["5"]["inputs"].update(reward_name="jpeg-compressibility", weights="(none)", device="cpu")
    for node, budget in (("6", 8), ("10", 8)):
        workflow[node]["inputs"].update(steps=4, nfe_budget=budget, num_outputs=2, rollout_batch=2)
    entry = run(comfyui, workflow)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "NFE 8/8;" in entry["outputs"]["6"]["text"][0]  # two whole rollouts of 4 steps
    assert re.search(r"NFE (9|1[0-6])/16;", entry["outputs"]["10"]["text"][0])  # 8 more on the same tree
    assert len(entry["outputs"]["8"]["images"]) == 2

    workflow["10"]["inputs"]["nfe_budget"] = 16  # queue again with more budget: the first tree comes from the cache
    entry = run(comfyui, workflow)
    assert entry["status"]["status_str"] == "success", entry["status"]
    cached = next(data["nodes"] for kind, data in entry["status"]["messages"] if kind == "execution_cached")
    assert "6" in cached and re.search(r"NFE (9|1\d|2[0-4])/24;", entry["outputs"]["10"]["text"][0])

    workflow["10"]["inputs"]["lam"] = 2.0  # a tree continues only the target it was grown for
    error = execution_error(run(comfyui, workflow))
    assert error["node_id"] == "10" and "lam=2.0 (the tree has 10.0)" in error["exception_message"]
