"""Seconds per phase of a pipeline call (UNet, VAE decode, reward), without making the host wait for the GPU.

Synchronising CUDA around every phase charges each kernel to the phase that launched it, but it stops the CPU from
running ahead: with ~100 phases a batch, the GPU idles while the host prepares the next launch. On CUDA the timer
instead records a pair of CUDA events on the current stream per phase and reads them all after one synchronisation,
when `seconds` is read or `finish()` is called. An event pair measures the GPU's time between the two points in its
stream: the phase's kernels, plus any time the GPU waited for the host inside the phase. `synchronize=True` gives
the synchronised wall times instead, for profiling. On other devices the phases are wall times.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

FOLD_PENDING = 1024  # pending event pairs after which the finished ones are read (without waiting)


class PhaseTimer:
    """`with timer("unet"): ...` adds the phase's seconds to `timer.seconds["unet"]`.

    On CUDA (unless `synchronize=True`) the seconds of phases still running on the GPU are added when `seconds` is
    read or `finish()` is called, after one `torch.cuda.synchronize`; `add(phase, seconds)` adds time measured
    elsewhere without that synchronisation.
    """

    def __init__(self, device: torch.device | str, synchronize: bool = False):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.synchronize = synchronize and cuda
        self.use_events = cuda and not synchronize
        self._seconds: defaultdict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.use_events:
            with self._events(phase):
                yield
            return
        if self.synchronize:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize(self.device)
            self._seconds[phase] += time.perf_counter() - start

    @contextmanager
    def _events(self, phase: str) -> Iterator[None]:
        start = torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(self.device))
        try:
            yield
        finally:
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            self._pending.append((phase, start, end))
            if len(self._pending) >= FOLD_PENDING:
                self._fold_finished()

    def _fold_finished(self) -> None:
        """Add the pairs whose events have completed (`query()` does not wait), keeping the rest pending."""
        waiting = []
        for phase, start, end in self._pending:
            if not waiting and start.query() and end.query():
                self._seconds[phase] += start.elapsed_time(end) / 1000
            else:
                waiting.append((phase, start, end))
        self._pending = waiting

    def add(self, phase: str, seconds: float) -> None:
        """Add seconds measured elsewhere (e.g. the engine's bookkeeping) without resolving pending events."""
        self._seconds[phase] += seconds

    def finish(self) -> defaultdict[str, float]:
        """Resolve every pending phase with one synchronisation; returns `seconds`."""
        if self._pending:
            torch.cuda.synchronize(self.device)
            for phase, start, end in self._pending:
                self._seconds[phase] += start.elapsed_time(end) / 1000
            self._pending = []
        return self._seconds

    @property
    def seconds(self) -> defaultdict[str, float]:
        """Seconds per phase, pending GPU phases resolved (one synchronisation if any are pending)."""
        return self.finish()
