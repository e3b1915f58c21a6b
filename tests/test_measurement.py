"""How a run's time and memory are measured: start-up apart from the training rate, and a memory baseline that does
not depend on what the data cache held."""

from __future__ import annotations

import json
import time

import pytest
from transformers import TrainerCallback

import main as cli
from pipeline import training

START_UP_S = 0.5


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
