"""The node pack inside a real ComfyUI, driven through its HTTP API. Runs only when COMFYUI_PATH names a ComfyUI
checkout (COMFYUI_PYTHON: the interpreter of its environment, default the current one).

The test builds a tiny SD 1.5-architecture checkpoint with ComfyUI's own modules (UNet with 320 channels and one
level, zero-weight CLIP text encoder, random TAESD as the VAE), starts ComfyUI on the CPU with a temporary
--base-directory holding that checkpoint and a link to this repository in custom_nodes/, and runs
workflows/tiny_cpu_dts_api.json to saved images and reported rewards, with DTS and with a particle baseline picked by
the sampler's `method` input; the SamplerCustomAdvanced workflow with DTS Run Report; and the anytime workflow, whose
second sampler continues the first one's tree across two queue runs.

Two observers watch ComfyUI from outside the pack: a probe written into custom_nodes/ (not part of the pack) records
every `comfy.model_management.load_models_gpu` call and serves the record at /dts_probe/loads, which shows the
reward held and loaded by ComfyUI's model management; and a websocket client (run with COMFYUI_PYTHON, which has
aiohttp) records the progress and preview messages a browser gets.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import uuid
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


PROBE = """
import comfy.model_management as model_management
from aiohttp import web
from server import PromptServer

CALLS = []
_load_models_gpu = model_management.load_models_gpu


def load_models_gpu(models, *args, **kwargs):
    out = _load_models_gpu(models, *args, **kwargs)
    CALLS.append({
        "models": [type(m.model).__name__ for m in models],
        "sizes": [m.model_size() for m in models],
        "loaded": [type(m.model).__name__ for m in model_management.loaded_models()],
    })
    return out


model_management.load_models_gpu = load_models_gpu


@PromptServer.instance.routes.get("/dts_probe/loads")
async def loads(request):
    return web.json_response(CALLS)


NODE_CLASS_MAPPINGS = {}
"""

LISTEN = """
import asyncio, json, sys
import aiohttp


async def main(url, path):
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        with open(path, "w") as out:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    out.write(message.data + "\\n")
                elif message.type == aiohttp.WSMsgType.BINARY:  # a preview: event type, then the image
                    event = int.from_bytes(message.data[:4], "big")
                    out.write(json.dumps({"type": "binary", "data": {"event": event}}) + "\\n")
                out.flush()


asyncio.run(main(sys.argv[1], sys.argv[2]))
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
    (base / "custom_nodes" / "dts_probe").mkdir()
    (base / "custom_nodes" / "dts_probe" / "__init__.py").write_text(PROBE)
    subprocess.run(
        [python, "-c", BUILD_CHECKPOINT, str(base / "models" / "checkpoints" / CHECKPOINT)],
        cwd=COMFYUI_PATH, env={**os.environ, "PYTHONPATH": COMFYUI_PATH}, check=True, timeout=300,
    )  # fmt: skip
    port = free_port()
    log = open(base / "comfyui.log", "w")  # noqa: SIM115 (closed at teardown)
    server = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
         "--preview-method", "latent2rgb"],
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
    yield {"url": url, "base": base, "server": server, "object_info": object_info, "python": python}
    server.terminate()
    server.wait(timeout=30)
    log.close()


def run(comfyui, workflow: dict, timeout: float = 400) -> dict:
    """Queue and wait with the functions of examples/comfyui_api.py, so the example runs against a real ComfyUI."""
    return comfyui_api.wait(comfyui["url"], comfyui_api.queue(comfyui["url"], workflow), timeout)


def run_watched(comfyui, workflow: dict, timeout: float = 400) -> tuple[dict, list[dict]]:
    """Run a workflow with a websocket client connected as its client: (history entry, messages in order)."""
    client_id = uuid.uuid4().hex
    path = comfyui["base"] / f"ws-{client_id}.jsonl"
    url = comfyui["url"].replace("http://", "ws://") + f"/ws?clientId={client_id}"
    listener = subprocess.Popen([comfyui["python"], "-c", LISTEN, url, str(path)])
    try:
        messages = wait_for_messages(path, lambda ms: ms, listener)  # ComfyUI's status message: connected
        prompt_id = comfyui_api.queue(comfyui["url"], workflow, client_id)
        entry = comfyui_api.wait(comfyui["url"], prompt_id, timeout)

        def finished(ms):
            return any(m["type"] in ("execution_success", "execution_error") and m["data"]["prompt_id"] == prompt_id
                       for m in ms)  # fmt: skip

        messages = wait_for_messages(path, finished, listener)
    finally:
        listener.terminate()
        listener.wait(timeout=30)
    return entry, messages


def wait_for_messages(path: Path, done, listener, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        messages = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if done(messages):
            return messages
        assert listener.poll() is None, "the websocket client stopped"
        assert time.monotonic() < deadline, f"no such websocket messages within {timeout} s: {messages[-5:]}"
        time.sleep(0.2)


def probe_loads(comfyui) -> list[dict]:
    """Every load_models_gpu call so far: the models it loaded (class names, sizes) and what was loaded after it."""
    status, calls = request(f"{comfyui['url']}/dts_probe/loads")
    assert status == 200
    return calls


def progress_values(messages: list[dict], node: str, total: int) -> list[int]:
    """The values of a node's "progress" messages, checked to count up to `total`."""
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"]["node"] == node]
    values = [p["value"] for p in progress]
    assert values and values == sorted(values) and all(p["max"] == total for p in progress), progress
    return values


def largest_step(values: list[int]) -> int:
    return max(b - a for a, b in itertools.pairwise([0, *values]))


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
        entry, messages = run_watched(comfyui, workflow)
        assert entry["status"]["status_str"] == "success", (method, entry["status"])
        assert len(entry["outputs"]["12"]["images"]) == 2  # as many samples as the latent batch
        assert len(entry["outputs"]["13"]["rewards"]) == 2
        summary = entry["outputs"]["13"]["text"][0]
        assert summary.startswith(f"{method.upper()}: rewards [")
        # the custom sampler's bar counts NFE of the budget (not the sigmas' 3 steps), at every denoising step batch
        values = progress_values(messages, "10", 12)
        assert values[-1] == int(re.search(r"NFE (\d+)/12", summary)[1])
        if method == "dts":  # rollout_batch 3: at most 3 rows per step batch (SMC steps its one population of 4)
            assert len(values) >= values[-1] // 3 and largest_step(values) <= 3
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


def test_the_reward_is_a_comfyui_managed_model_and_progress_comes_every_denoising_step_batch(comfyui):
    """The digit classifier (a reward with weights): model management loads it for every scoring batch (which counts
    its weights in its accounting) and loads the UNet back after; the sampler's progress bar moves in NFE at least
    once per denoising step batch (at most rollout_batch rows each), each update with a preview."""
    workflow = with_inputs("5", reward_name="digit-classifier", device="auto", options='{"digit": 3}')
    workflow[SAMPLER_NODE]["inputs"].update(nfe_budget=24, rollout_batch=2, num_outputs=1)
    before = len(probe_loads(comfyui))
    entry, messages = run_watched(comfyui, workflow)
    assert entry["status"]["status_str"] == "success", entry["status"]
    summary = entry["outputs"][SAMPLER_NODE]["text"][0]
    nfe, evaluations = (int(n) for n in re.search(r"NFE (\d+)/24; reward evaluations (\d+)", summary).groups())

    calls = probe_loads(comfyui)[before:]
    reward_loads = [i for i, call in enumerate(calls) if call["models"] == ["DTSRewardModel"]]
    assert len(reward_loads) >= math.ceil(evaluations / 2)  # a batch of <= 2 rollouts per call (and the guides')
    from dts_diffusers.rewards import load_reward

    weights = sum(t.nbytes for t in load_reward("digit-classifier", digit=3).state_dict().values())
    for i in reward_loads:
        assert calls[i]["sizes"] == [weights] and calls[i]["loaded"][0] == "DTSRewardModel"
        assert calls[i + 1]["models"][0] == "BaseModel"  # the UNet back for the next denoising batch
    assert "Requested to load DTSRewardModel" in (comfyui["base"] / "comfyui.log").read_text()

    values = progress_values(messages, SAMPLER_NODE, 24)
    assert len(values) >= nfe // 2 and values[-1] == nfe
    assert largest_step(values) <= 2  # one step batch of <= 2 rows, never a whole batch of rollouts at once
    previews = [m for m in messages if m["type"] == "binary"]
    assert len(previews) >= len(values)  # latent2rgb previews of the best found (the step's x̂_0 before one is)
