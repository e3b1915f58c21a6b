"""How a run's figures are measured: peak memory, perplexity, bests, and their reduction across processes."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import psutil
import torch
from accelerate.utils import gather_object

from utils import MIB


class PeakMemoryTracker:
    """Peak resident memory of this process, and peak CUDA memory torch allocated, inside a `with` block."""

    def __enter__(self) -> PeakMemoryTracker:
        self.peak_cpu_mb: float | None = None
        self.peak_gpu_mb: float | None = None
        self._sampler = None
        try:  # Linux: reset the kernel's high-water mark, then read it at the end (exact, no sampling)
            Path("/proc/self/clear_refs").write_text("5")
            self._exact = True
        except OSError:
            self._exact = False
            self._sampled_peak = psutil.Process().memory_info().rss
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.02):
            self._sampled_peak = max(self._sampled_peak, process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self._exact:
            status = Path("/proc/self/status").read_text()
            kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
            self.peak_cpu_mb = kib * 1024 / MIB
        else:
            self._stop.set()
            self._sampler.join()
            self.peak_cpu_mb = self._sampled_peak / MIB
        if torch.cuda.is_available():
            self.peak_gpu_mb = torch.cuda.max_memory_allocated() / MIB


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def best(log_history: list[dict], key: str) -> float | None:
    values = [entry[key] for entry in log_history if key in entry]
    return min(values) if values else None


def max_over_processes(value: float | None) -> float | None:
    """The largest value any process measured (the value itself in a single process)."""
    values = [v for v in gather_object([value]) if v is not None]
    return max(values) if values else None
