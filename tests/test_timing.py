"""PhaseTimer: no synchronisation per phase on CUDA (faked here, so this runs on the CPU), one when read."""

import time

import pytest
import torch
from dts_diffusers.pipelines import timing
from dts_diffusers.pipelines.timing import PhaseTimer

from tests.test_pipeline import run, sd_path  # noqa: F401  (sd_path is a fixture)

LAG = 5  # the fake GPU finishes an event only once 5 more have been recorded after it


class FakeGPU:
    """A GPU whose stream runs behind the host: counts every call that would make the host wait."""

    def __init__(self):
        self.clock = 0.0  # seconds of GPU work queued so far
        self.recorded: list = []
        self.synchronizes = 0
        self.event_synchronizes = 0
        self.elapsed_reads = 0

    def synchronize(self, device=None):
        self.synchronizes += 1
        for event in self.recorded:
            event.done = True

    def event_class(self):
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.done, self.at = False, None

            def record(self, stream=None):
                self.at = gpu.clock
                gpu.recorded.append(self)
                for event in gpu.recorded[:-LAG]:
                    event.done = True

            def query(self):
                return self.done

            def synchronize(self):
                gpu.event_synchronizes += 1
                self.done = True

            def elapsed_time(self, end):
                if not (self.done and end.done):  # what cudaEventElapsedTime does: cudaErrorNotReady
                    raise RuntimeError("event not ready")
                gpu.elapsed_reads += 1
                return 1000 * (end.at - self.at)

        return Event


@pytest.fixture
def gpu(monkeypatch):
    fake = FakeGPU()
    monkeypatch.setattr(torch.cuda, "Event", fake.event_class())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "stream")
    monkeypatch.setattr(torch.cuda, "synchronize", fake.synchronize)
    return fake


def run_phases(gpu: FakeGPU, timer: PhaseTimer, batches: int) -> dict:
    """`batches` denoising batches: 50 UNet calls and one VAE decode and reward call each; returns the GPU seconds."""
    expected = {"unet": 0.0, "vae_decode": 0.0, "reward": 0.0}
    for _ in range(batches):
        for phase, seconds in [("unet", 0.03)] * 50 + [("vae_decode", 0.05), ("reward", 0.01)]:
            with timer(phase):
                gpu.clock += seconds  # the kernels this phase launches
            expected[phase] += seconds
    return expected


def test_no_synchronisation_per_phase_and_one_when_the_seconds_are_read(gpu):
    timer = PhaseTimer("cuda")
    expected = run_phases(gpu, timer, batches=40)  # 2480 phases: past FOLD_PENDING, so finished pairs are folded
    assert gpu.synchronizes == 0 and gpu.event_synchronizes == 0
    assert 0 < gpu.elapsed_reads < 2480  # only finished pairs were read, without waiting
    assert len(timer._pending) < timing.FOLD_PENDING
    seconds = timer.seconds
    assert gpu.synchronizes == 1 and gpu.event_synchronizes == 0
    assert seconds == pytest.approx(expected)
    timer.seconds["unet"] += 1.0  # the pipelines add the engine's times this way
    assert timer.finish()["unet"] == pytest.approx(expected["unet"] + 1.0) and gpu.synchronizes == 1  # none pending


def test_add_does_not_resolve_pending_phases(gpu):
    timer = PhaseTimer("cuda:0")
    with timer("unet"):
        gpu.clock += 0.5
    timer.add("engine", 0.25)
    assert gpu.synchronizes == 0
    assert timer.finish() == pytest.approx({"unet": 0.5, "engine": 0.25}) and gpu.synchronizes == 1


def test_synchronize_true_gives_synchronised_wall_times(gpu):
    timer = PhaseTimer("cuda", synchronize=True)
    with timer("unet"):
        time.sleep(0.01)
    assert gpu.synchronizes == 2 and not gpu.recorded
    assert timer.seconds["unet"] >= 0.01


def test_cpu_phases_are_wall_times_and_touch_no_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU timer called CUDA")

    for name in ("Event", "current_stream", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    timer = PhaseTimer(torch.device("cpu"), synchronize=True)
    for _ in range(3):
        with timer("reward"):
            time.sleep(0.005)
    assert 0.015 <= timer.seconds["reward"] < 1.0
    assert timer.seconds["missing"] == 0.0  # a defaultdict, as the pipelines' timings expect


def test_a_pipeline_call_synchronises_once_whatever_its_unet_steps(gpu, monkeypatch, sd_path):  # noqa: F811
    """The default path of a DTS pipeline call, its timer on a (faked) GPU: every UNet step, decode and reward is
    timed by events, and the host waits once, when the call reads the seconds for `output.timings`."""
    from diffusers import DDIMScheduler
    from dts_diffusers.pipelines import DTSPipeline, tree_search

    monkeypatch.setattr(tree_search, "PhaseTimer", lambda device: PhaseTimer("cuda"))
    pipe = DTSPipeline.from_pretrained(sd_path)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    unet_calls = []
    pipe.unet.register_forward_pre_hook(lambda *_: unet_calls.append(1))
    out = run(pipe, nfe_budget=48)
    assert len(unet_calls) >= 12 and len(gpu.recorded) >= 2 * len(unet_calls)
    assert gpu.synchronizes == 1 and gpu.event_synchronizes == 0
    assert out.timings["unet"] >= 0 and set(out.timings) >= {"unet", "vae_decode", "reward", "engine", "total"}
