"""How a run's figures are measured: peak memory, time per activity, perplexity, bests, and their reduction
across processes."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pyarrow
import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback

from pipeline.compilation import compile_seconds
from utils import MIB


class PeakMemoryTracker:
    """Peak resident memory of this process, and peak CUDA memory torch allocated on any GPU, since `with`."""

    def __enter__(self) -> PeakMemoryTracker:
        release_freed_memory()  # the peak counts from what is live, not from what was freed before
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


SAMPLE_INTERVAL_S = 0.5
BUSY_SPARE_CORES = 0.5  # other processes' mean CPU use may fill the cores the run leaves free, plus this much


def cpus_usable() -> list[int]:
    """The CPUs this process may run on (its affinity where the platform has one)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(psutil.cpu_count()))


def busy_cpu_seconds(cpus: list[int]) -> float:
    """CPU seconds the machine has spent working (not idle or waiting for I/O) on `cpus`, since boot."""
    total = 0.0
    per_cpu = psutil.cpu_times(percpu=True)
    for cpu in cpus:
        t = per_cpu[cpu]._asdict()
        # Linux counts guest time inside user time as well: leave it out once, as psutil's cpu_percent does.
        total += sum(t.values()) - sum(t.get(k, 0.0) for k in ("idle", "iowait", "guest", "guest_nice"))
    return total


BUSY_SHARE = 0.1  # a run is busy when this share of its load samples saw others above the threshold


class MachineLoad:
    """What else loaded the machine while the run worked, sampled every half second in a background thread on the
    main process: the CPU use of every other process on the CPUs this run may use (the machine's busy CPU time
    there less the CPU time of the run's own processes on this host), and, where NVML (nvidia-ml-py) is installed,
    the other processes holding the run's GPUs and their utilisation. Every process of the run takes part in
    starting it (each names its process id); only the main one samples.
    """

    def __init__(self, main: bool, previous: dict | None = None) -> None:
        """`previous`: the load a resumed run recorded before, which the summary continues."""
        here = socket.gethostname()
        self.pids = [pid for host, pid in gather_object([(here, os.getpid())]) if host == here]
        self.main, self.previous = main, previous
        self.cpus = cpus_usable()
        # Busy: other processes used more than the cores the run's threads left free, plus half a core.
        self.threshold = max(0.0, len(self.cpus) - torch.get_num_threads() * len(self.pids)) + BUSY_SPARE_CORES
        self.other_cores: list[float] = []
        self.gpu_others: list[int] = []
        self.gpu_utilization: list[float] = []

    def __enter__(self) -> MachineLoad:
        if self.main:
            self._gpus = nvml_handles()
            self._last = self._read()
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample_until_stopped, daemon=True)
            self._sampler.start()
        return self

    def _read(self) -> tuple[float, float, float]:
        """(now, the machine's busy CPU seconds, the run's own CPU seconds)."""
        own = 0.0
        for pid in self.pids:
            try:
                times = psutil.Process(pid).cpu_times()
                own += times.user + times.system
            except psutil.Error:  # a process of the run that has exited: it loads nothing now
                continue
        return time.monotonic(), busy_cpu_seconds(self.cpus), own

    def _sample(self) -> None:
        now, busy, own = self._read()
        then, busy_then, own_then = self._last
        if now > then:
            self.other_cores.append(max(0.0, ((busy - busy_then) - (own - own_then)) / (now - then)))
            self._last = now, busy, own
        for others, utilization in gpu_samples(self._gpus):
            self.gpu_others.append(others)
            self.gpu_utilization.append(utilization)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def summary(self) -> dict | None:
        """The load so far, over every session of the run (None on the other processes)."""
        if not self.main:
            return None
        self._sample()  # the last part of an interval, and at least one sample however short the run
        cores, others, utilization = self.other_cores, self.gpu_others, self.gpu_utilization
        count = len(cores)
        mean = sum(cores) / count
        peak = max(cores)
        over = sum(c > self.threshold for c in cores)
        gpu_seen, previous = bool(self._gpus), self.previous
        if previous and previous.get("samples"):  # the sessions before a resume count too
            before = previous["samples"]
            mean = (mean * count + previous["other_cpu_cores_mean"] * before) / (count + before)
            peak = max(peak, previous["other_cpu_cores_max"])
            over += previous.get("samples_over_threshold") or 0
            count += before
        gpu_others = max(others) if others else None
        if previous and previous.get("other_gpu_processes_max") is not None:
            gpu_others = max(gpu_others or 0, previous["other_gpu_processes_max"])
        return {
            "other_cpu_cores_mean": mean,
            "other_cpu_cores_max": peak,
            "cpus": len(self.cpus),
            "busy_threshold_cores": self.threshold,
            "samples": count,
            "samples_over_threshold": over,
            "other_gpu_processes_max": gpu_others,
            "gpu_utilization_mean": sum(utilization) / len(utilization) if gpu_seen and utilization else None,
            # a share, not the mean: contention during training alone must show, however long generation took after
            "busy": over >= BUSY_SHARE * count or bool(gpu_others),
        }

    def __exit__(self, *exc: object) -> None:
        if self.main:
            self._stop.set()
            self._sampler.join()


def nvml_handles() -> list:
    """NVML handles of the GPUs this process uses; empty without CUDA or without nvidia-ml-py."""
    if not torch.cuda.is_available():
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
        return [
            pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(d).uuid}")
            for d in range(torch.cuda.device_count())
        ]
    except Exception:  # no NVML library, or a device it cannot name: the GPU side stays unknown (null)
        return []


def gpu_samples(handles: list) -> list[tuple[int, float]]:
    """Per GPU: processes holding it besides the run's one, and its utilisation in percent."""
    if not handles:
        return []
    import pynvml

    samples = []
    for handle in handles:
        try:
            # PIDs seen from a container need not be ours: count the run as one process per GPU it uses.
            holders = len(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
            samples.append((max(0, holders - 1), float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)))
        except pynvml.NVMLError:
            continue
    return samples


def release_freed_memory() -> None:
    """Hand memory that allocators keep after it is freed back to the kernel: glibc's free heap (malloc_trim;
    elsewhere nothing) and Arrow's pool (datasets). Resident memory then no longer holds what data preparation
    built and dropped, which a cold cache builds (the token lists of the whole text, the datasets Arrow files) and a
    warm one does not. (No gc.collect: those lists hold no cycles, and a full collection takes seconds here.)"""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        ctypes.CDLL(None).malloc_trim(0)
    pyarrow.default_memory_pool().release_unused()


class RunClock(TrainerCallback):
    """Seconds a run spent in optimizer steps, in loss evaluation and in checkpoint saves, over every session.

    A step runs from the Trainer's step-begin to its step-end callback: forward, backward and optimizer update.
    Each session's first step (one-time start-up: allocation, kernel selection, CUDA initialisation, compilation),
    and any later step in which torch.compile compiled (a new shape, such as an epoch's shorter last batch), is also
    counted apart, in first_step_s and first_step_tokens, so that a rate can leave it out; compile_time_s is the
    compiling itself.
    """

    KEYS = ("train_time_s", "first_step_s", "compile_time_s", "eval_time_s", "checkpoint_time_s")

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
        self._compiled_at_start = compile_seconds()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(args.device)
        seconds = time.perf_counter() - self._step_start
        self.seconds["train_time_s"] += seconds
        compiling = compile_seconds() - self._compiled_at_start
        self.seconds["compile_time_s"] += compiling
        if self._first_of_session or compiling > 0:
            self._first_of_session = False
            self.seconds["first_step_s"] += seconds
            self.first_step_tokens += int(state.num_input_tokens_seen - self._tokens_at_start)

    def tokens_per_s(self, tokens: int) -> float | None:
        """Training tokens per second over the steps that were not start-up (first_step_s); None before any."""
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
