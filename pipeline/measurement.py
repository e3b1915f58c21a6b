"""How a run's figures are measured: peak memory, time per activity, perplexity, bests, and their reduction
across processes."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback

from utils import MIB


class PeakMemoryTracker:
    """Peak resident memory of this process, and peak CUDA memory torch allocated on any GPU, since `with`."""

    def __enter__(self) -> PeakMemoryTracker:
        self.peak_cpu_mb: float | None = None
        self.peak_gpu_mb: float | None = None
        self._sampler = None
        try:  # Linux: reset the kernel's high-water mark, then read it (exact, no sampling)
            Path("/proc/self/clear_refs").write_text("5")
            self._exact = True
        except OSError:
            self._exact = False
            self._sampled_peak = psutil.Process().memory_info().rss
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        for device in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(device)
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.02):
            self._sampled_peak = max(self._sampled_peak, process.memory_info().rss)

    def peaks(self) -> tuple[float, float | None]:
        """(CPU, GPU) peaks in MiB so far; GPU is the largest over every visible device, None without CUDA."""
        if self._exact:
            status = Path("/proc/self/status").read_text()
            kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
            cpu = kib * 1024 / MIB
        else:
            cpu = self._sampled_peak / MIB
        devices = range(torch.cuda.device_count())
        gpu = max(torch.cuda.max_memory_allocated(d) for d in devices) / MIB if devices else None
        return cpu, gpu

    def __exit__(self, *exc: object) -> None:
        self.peak_cpu_mb, self.peak_gpu_mb = self.peaks()
        if self._sampler:
            self._stop.set()
            self._sampler.join()


class RunClock(TrainerCallback):
    """Seconds a run spent in optimizer steps, in loss evaluation and in checkpoint saves, over every session.

    A step runs from the Trainer's step-begin to its step-end callback: forward, backward and optimizer update.
    Each session's first step (one-time start-up: allocation, kernel selection, CUDA initialisation, compilation)
    is also counted apart, in first_step_s and first_step_tokens, so that a rate can leave it out.
    """

    KEYS = ("train_time_s", "first_step_s", "eval_time_s", "checkpoint_time_s")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.KEYS, 0.0)
        self.first_step_tokens = 0
        self._step_start = 0.0
        self._tokens_at_start = 0
        self._first_of_session = True

    def start_from(self, figures: dict) -> None:
        """Continue from the figures a checkpoint recorded."""
        self.seconds = {key: float(figures.get(key) or 0.0) for key in self.KEYS}
        self.first_step_tokens = int(figures.get("first_step_tokens") or 0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start, self._tokens_at_start = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(args.device)
        seconds = time.perf_counter() - self._step_start
        self.seconds["train_time_s"] += seconds
        if self._first_of_session:
            self._first_of_session = False
            self.seconds["first_step_s"] += seconds
            self.first_step_tokens += int(state.num_input_tokens_seen - self._tokens_at_start)

    def tokens_per_s(self, tokens: int) -> float | None:
        """Training tokens per second over the steps after each session's first; None before there are any."""
        seconds = self.seconds["train_time_s"] - self.seconds["first_step_s"]
        return (tokens - self.first_step_tokens) / seconds if seconds > 0 else None

    @contextmanager
    def timing(self, key: str) -> Iterator[None]:
        """Add the time the block takes to `key` (eval_time_s or checkpoint_time_s)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] += time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def best(log_history: list[dict], key: str) -> float | None:
    values = [entry[key] for entry in log_history if key in entry]
    return min(values) if values else None


def max_over_processes(value: float | None) -> float | None:
    """The largest value any process measured (the value itself in a single process)."""
    values = [v for v in gather_object([value]) if v is not None]
    return max(values) if values else None
