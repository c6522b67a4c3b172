"""Queue a shipped DTS workflow on a running ComfyUI server, with your prompt, λ and NFE budget, and wait for it.

Start ComfyUI with this pack in custom_nodes/ (and a checkpoint the workflow names in models/checkpoints/), then:

    python examples/comfyui_api.py --server http://127.0.0.1:8188 --prompt "a lighthouse at dusk" --lam 2

`--dry-run` prints the edited API graph instead of queueing it. The same functions drive the integration test
(tests/test_comfyui_integration.py) against a real ComfyUI.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
SAMPLER = "DTSSampler"


def load_workflow(path: Path, prompt: str | None = None, **sampler_inputs) -> dict:
    """An API-format workflow with the positive prompt (and the reward's prompt) and DTS Sampler inputs replaced."""
    workflow = json.loads(Path(path).read_text())
    samplers = [node for node in workflow.values() if node["class_type"] == SAMPLER]
    if len(samplers) != 1:
        raise ValueError(f"{path}: expected one {SAMPLER} node, found {len(samplers)}")
    sampler = samplers[0]
    unknown = set(sampler_inputs) - set(sampler["inputs"])
    if unknown:
        raise ValueError(f"{path}: the {SAMPLER} node has no inputs {sorted(unknown)}")
    sampler["inputs"].update(sampler_inputs)
    if prompt is not None:
        positive_id = sampler["inputs"]["positive"][0]
        workflow[positive_id]["inputs"]["text"] = prompt
        sampler["inputs"]["reward_prompt"] = prompt
    return workflow


def request(url: str, payload: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of a GET, or of a POST when `payload` is given."""
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def queue(server: str, workflow: dict, client_id: str | None = None) -> str:
    """Queue the workflow; returns its prompt id. ComfyUI validates it first and answers 400 with node errors.

    With `client_id`, ComfyUI sends the run's progress and previews to the websocket `/ws?clientId=<client_id>`."""
    payload = {"prompt": workflow} if client_id is None else {"prompt": workflow, "client_id": client_id}
    status, answer = request(f"{server}/prompt", payload)
    if status != 200:
        raise RuntimeError(f"ComfyUI refused the workflow ({status}): {json.dumps(answer.get('node_errors', answer))}")
    return answer["prompt_id"]


def wait(server: str, prompt_id: str, timeout: float = 600) -> dict:
    """The history entry of a queued prompt once it succeeded or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, history = request(f"{server}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("status_str") in ("success", "error"):
            return history[prompt_id]
        time.sleep(1)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    parser.add_argument("--workflow", type=Path, default=WORKFLOWS / "sd15_image_reward_dts_api.json")
    parser.add_argument("--prompt", default=None, help="positive prompt, also the reward's prompt")
    parser.add_argument("--lam", type=float, default=None, help="λ of π* ∝ p·exp(λ·r)")
    parser.add_argument("--nfe-budget", type=int, default=None, help="denoising steps the sampler may spend")
    parser.add_argument("--dry-run", action="store_true", help="print the API graph instead of queueing it")
    args = parser.parse_args()
    inputs = {k: v for k, v in {"lam": args.lam, "nfe_budget": args.nfe_budget}.items() if v is not None}
    workflow = load_workflow(args.workflow, args.prompt, **inputs)
    if args.dry_run:
        print(json.dumps(workflow, indent=2))
        return
    entry = wait(args.server, queue(args.server, workflow))
    print(json.dumps({"status": entry["status"]["status_str"], "outputs": entry["outputs"]}, indent=2))


if __name__ == "__main__":
    main()
