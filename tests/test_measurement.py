"""How a run's time and memory are measured: start-up apart from the training rate, and a memory baseline that does
not depend on what the data cache held."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time

import pytest
from conftest import wikitext_rows
from transformers import TrainerCallback

import main as cli
from pipeline import training

START_UP_S = 0.5
ARTICLES = 500  # enough text that a cold cache measured 19 MB more before the fix
TOLERANCE_MB = 10  # a cold cache still leaves about 6 MB (the tokenizer's, independent of the text)


class SlowFirstStep(TrainerCallback):
    """Stands in for one-time start-up (CUDA initialisation, kernel selection, compilation): the first step of a
    session takes START_UP_S longer."""

    def __init__(self) -> None:
        self.started = False

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.started:
            self.started = True
            time.sleep(START_UP_S)


def test_the_first_steps_start_up_is_timed_apart_and_left_out_of_tokens_per_s(common_flags, tmp_path, monkeypatch):
    build = training.build_trainer

    def build_with_slow_start(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(SlowFirstStep())
        return trainer

    monkeypatch.setattr(training, "build_trainer", build_with_slow_start)
    flags = [*common_flags, "--output_dir", str(tmp_path), "--max_steps", "4", "--eval_examples", "0"]
    assert cli.main(["full", *flags, "--run_name", "run"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["first_step_s"] >= START_UP_S and results["train_time_s"] >= results["first_step_s"] + 0.001
    assert results["first_step_tokens"] == 4 * 32 and results["train_tokens"] == 4 * 4 * 32
    steady_s = results["train_time_s"] - results["first_step_s"]  # steps 2 to 4, without the start-up
    assert results["train_tokens_per_s"] == pytest.approx(3 * 4 * 32 / steady_s)


@pytest.mark.skipif(sys.platform != "linux", reason="forks, and measures with Linux's high-water mark and glibc")
def test_a_cold_and_a_warm_data_cache_measure_the_same_cpu_peak(tiny_model_dir, tmp_path, monkeypatch):
    """Data preparation on a cold cache builds the token lists of the whole text (and datasets' Arrow files) and
    drops them; a warm cache reads what they made. Neither may shift the peak, which is measured after preparation.
    Each run is a process forked from this one: both start from the same memory, without importing anew."""
    data = tmp_path / "data"
    data.mkdir()
    for split, articles in (("train", ARTICLES), ("validation", 3), ("test", 3)):
        (data / f"{split}.txt").write_text("\n".join(wikitext_rows(articles, seed=0)) + "\n")
    flags = ["--model", str(tiny_model_dir), "--data_dir", str(data), "--cache_dir", str(tmp_path / "cache")]
    flags += ["--output_dir", str(tmp_path / "runs"), "--block_size", "32", "--max_steps", "1", "--eval_examples", "0"]
    # The tokenizer's worker threads, which a cold cache starts and which live on (their stacks and heaps, about 1 MB
    # per CPU here), are not freed memory: tokenize without them, so that the peaks differ by what was freed only.
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    peaks = {}
    for cache in ("cold", "warm"):
        argv = ["full", *flags, "--run_name", cache]
        run = multiprocessing.get_context("fork").Process(target=run_and_exit, args=(argv,))
        run.start()
        run.join()
        assert run.exitcode == 0
        peaks[cache] = json.loads((tmp_path / "runs" / cache / "results.json").read_text())["peak_cpu_memory_mb"]
    assert peaks["cold"] == pytest.approx(peaks["warm"], abs=TOLERANCE_MB)


def run_and_exit(argv: list[str]) -> None:
    os._exit(cli.main(argv))
