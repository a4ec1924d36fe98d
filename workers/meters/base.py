"""The meter contract: one window, ``begin()`` then ``end() -> EnergyReading``.

Every energy backend (NVML, RAPL, a TDP estimate) implements :class:`Meter`. A window
measures what happened between the two calls; the stage decides what goes inside it
(for ``evaluate``: one pass over the test split, nothing else). A meter is made for a
torch device and waits for that device's queued work at both edges, so asynchronous
CUDA kernels are counted in the window that launched them (as Zeus does).

A domain a meter cannot see reports ``None`` energy with source ``"none"`` -- never a
silent 0 J, which a report would add up as a real, impossibly good figure.
"""

from __future__ import annotations

import abc
import time

from workers.types import EnergyReading


class Meter(abc.ABC):
    """One measurement window at a time; a meter may be reused for the next window."""

    @abc.abstractmethod
    def begin(self) -> None:
        """Open a window (sampling idle power first, where the backend does that)."""

    @abc.abstractmethod
    def end(self) -> EnergyReading:
        """Close the window opened by :meth:`begin` and return what it measured.

        Raises ``RuntimeError`` when no window is open.
        """


class NullMeter(Meter):
    """Wall-clock time only (``time.perf_counter``); every energy domain is unknown.

    The fallback wherever no sensor exists, so time per sample is still measured.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._start_s: float | None = None

    def begin(self) -> None:
        synchronize(self.device)
        self._start_s = time.perf_counter()

    def end(self) -> EnergyReading:
        synchronize(self.device)
        end_s = time.perf_counter()
        if self._start_s is None:
            raise RuntimeError("NullMeter.end() called without a matching begin()")
        duration_s = end_s - self._start_s
        self._start_s = None
        return EnergyReading(duration_s=duration_s)


def synchronize(device: str) -> None:
    """Wait until the work queued on torch ``device`` has finished (a no-op off CUDA)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
