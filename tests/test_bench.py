"""The benchmark runs end to end at a toy size (it asserts no timing: speed lives in bench/, not in tests)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_every_figure(tiny_model_dir, data_dir, tmp_path):
    argv = [
        sys.executable,
        "bench/run.py",
        "--quick",
        "--model",
        str(tiny_model_dir),
        "--text",
        str(data_dir / "test.txt"),
    ]
    argv += ["--block_size", "32", "--steps", "2", "--examples", "3", "--out_dir", str(tmp_path)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = tmp_path.glob("*.json")
    results = json.loads(written.read_text())
    assert results["batch_efficiency"]["ours"] == 1.0 and 0 < results["batch_efficiency"]["seed_style"] < 1
    for mode in ("full", "lora"):
        assert set(results["train_tokens_per_s"][mode]) == {"ours", "seed_style"}
        assert results["train_flops_share_of_peak"][mode] > 0 and results["peak_cpu_memory_mb"][mode] > 0
    for mode in ("full", "lora"):
        assert all(results["peak_memory_mb"][mode][v] > 0 for v in ("plain", "checkpointing"))
        assert results["checkpointing_slowdown"][mode] > 0
        compiled, error = results["compile_speedup"][mode], results["compile_error"][mode]
        assert (compiled is None) == (error is not None)  # a speedup, or the reason there is none
    assert results["matmul_peak_flop_per_s"] > 0 and results["memory_read_bytes_per_s"] > 0
    assert set(results["generation_examples_per_s"]) == {"batched", "sequential"}
    assert results["generation_identical_hypotheses"] is True
    assert all(0 < results["generation_share_of_roofline"][side] < 1 for side in ("batched", "sequential"))
    assert results["generation_roofline_speedup"] > 1  # batching shares the weight reads
    assert (
        results["generation_speedup_ceiling"]
        > results["generation_examples_per_s"]["batched"] / (results["generation_examples_per_s"]["sequential"])
    )  # the measured gain stays under its ceiling
    assert set(results["data_prep_s"]) == {"cold", "warm"}
    assert {"model_config", "dtype", "device", "threads"} <= results.keys()
    assert written.with_suffix(".md").read_text().count("|") > 20


def test_device_check_dry_run_writes_one_json_of_every_figure(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "device.json"
    argv = ["bench/device_check.sh", "--dry_run", "--model", str(tiny_model_dir), "--text", str(data_dir / "test.txt")]
    done = subprocess.run([*argv, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["dry_run"] is True and results["complete"] is True
    assert set(results["matmul_peak_flop_per_s"]) == {"bf16", "fp32"}
    assert set(results["training"]) == {f"{m}_{p}" for m in ("full", "lora") for p in ("bf16", "fp32")}
    for run in results["training"].values():
        assert run["real_tokens_per_s"] > 0 and run["share_of_bf16_peak"] > 0 and run["peak_memory_mb"] > 0
        assert run["compiled"] is False and run["compile_time_s"] == 0  # a dry run compiles nothing
    versus = results["head_to_head"]
    assert versus["tokens_per_s_ratio"] > 0 and versus["peak_memory_ratio"] > 0 and versus["generation_speedup"] > 0
    assert versus["generation"]["identical_texts"] is True


def test_a_measurement_process_killed_mid_run_is_reported_not_waited_for(tiny_model_dir, data_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    for name in ("PYTHONPATH", "PYTORCH_NVML_BASED_CUDA_CHECK"):  # set by measurement_processes; undone after
        monkeypatch.setenv(name, os.environ.get(name, ""))
    import run as bench

    argv = ["--quick", "--model", str(tiny_model_dir), "--text", str(data_dir / "test.txt"), "--block_size", "32"]
    monkeypatch.setattr(sys, "argv", ["run.py", *argv])
    job = {"args": vars(bench.parse_args()), "mode": "full", "pipeline": "ours", "extra": (), "threads": 1}
    answers: list[dict] = []  # a daemon thread: a measurement waited for forever fails the test, not the suite
    waiting = threading.Thread(
        target=lambda: answers.append(bench.measured_alone(bench.measurement_processes(), job)), daemon=True
    )
    waiting.start()
    while not (children := multiprocessing.active_children()):  # killed as soon as it exists, as OOM would
        time.sleep(0.01)
    os.kill(children[0].pid, signal.SIGKILL)
    waiting.join(timeout=120)
    assert answers == [{"error": "the measurement process died (exit code -9)"}]
