"""Long runs: stopping on a signal, resuming to the same weights, non-finite losses, several processes."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import main as cli
from pipeline import training
from pipeline.run_directory import create_run_dir
from utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def errors_of(done: subprocess.CompletedProcess) -> str:
    """A failed launch's stderr without its progress bars."""
    lines = [line for line in done.stderr.splitlines() if line.strip() and "it/s" not in line and "[A" not in line]
    return "\n".join(lines[-40:])


class SignalAtStep(TrainerCallback):
    """Sends this process a signal at the end of one optimizer step, as a user's Ctrl-C or a scheduler would."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def test_sigterm_saves_a_checkpoint_and_resume_ends_with_the_uninterrupted_weights(
    common_flags, tmp_path, monkeypatch, capsys
):
    flags = [*common_flags, "--output_dir", str(tmp_path), "--max_steps", "12", "--learning_rate", "3e-3"]
    flags += ["--eval_examples", "0", "--logging_steps", "2", "--data_fraction", "0.25"]  # epochs of 10 steps
    assert cli.main(["full", *flags, "--run_name", "straight"]) == 0

    build = training.build_trainer

    def build_with_signal(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(SignalAtStep(5, signal.SIGTERM))
        return trainer

    monkeypatch.setattr(training, "build_trainer", build_with_signal)
    capsys.readouterr()
    assert cli.main(["full", *flags, "--run_name", "stopped"]) == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM at step 5" in err and "--resume --run_name stopped" in err
    stopped = json.loads((tmp_path / "stopped" / "results.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["interrupted_at_step"] == 5
    assert stopped["train_tokens"] == 5 * 4 * 32 and stopped["train_time_s"] > 0
    assert (tmp_path / "stopped" / "checkpoints" / "checkpoint-5").is_dir()
    assert not (tmp_path / "stopped" / "model").exists()
    monkeypatch.setattr(training, "build_trainer", build)

    assert cli.main(["compare", "--output_dir", str(tmp_path), "--all"]) == 0
    assert "(stopped)" not in capsys.readouterr().out  # compare shows finished runs only

    assert cli.main(["full", *flags, "--resume"]) == 0  # the latest interrupted full run
    resumed = json.loads((tmp_path / "stopped" / "results.json").read_text())
    assert resumed["status"] == "finished" and resumed["optimizer_steps"] == 12
    assert resumed["train_tokens"] == 12 * 4 * 32
    # each session's first step is timed apart: the stopped one's, kept by its checkpoint, and the resumed one's
    assert stopped["first_step_tokens"] == 4 * 32 and resumed["first_step_tokens"] == 2 * 4 * 32
    assert resumed["first_step_s"] > stopped["first_step_s"] > 0
    # time continues from the checkpoint: it covers both sessions' steps, and saves and validation apart
    assert resumed["train_time_s"] > stopped["train_time_s"] and resumed["checkpoint_time_s"] > 0
    assert resumed["eval_time_s"] > 0
    straight, again = weights(tmp_path / "straight"), weights(tmp_path / "stopped")
    assert straight.keys() == again.keys()
    for name in straight:
        torch.testing.assert_close(again[name], straight[name], rtol=0, atol=1e-6)

    # stopped at a share of the steps (a study's rung), on the whole run's schedule, then resumed to the end
    assert cli.main(["full", *flags, "--run_name", "rung", "--stop_at_share", "0.4"]) == 0
    rung = json.loads((tmp_path / "rung" / "results.json").read_text())
    assert rung["status"] == "stopped_early" and rung["optimizer_steps"] == 5 and "test_loss" not in rung
    assert rung["stopped_early"]["step"] == 5 and rung["stopped_early"]["max_steps"] == 12
    logged = json.loads((tmp_path / "straight" / "results.json").read_text())["log_history"]
    rates = {e["step"]: e["learning_rate"] for e in logged if "learning_rate" in e}
    assert {e["step"]: e["learning_rate"] for e in rung["log_history"] if "learning_rate" in e} == {
        step: rate for step, rate in rates.items() if step <= 5
    }
    assert (tmp_path / "rung" / "checkpoints" / "checkpoint-5").is_dir() and not (tmp_path / "rung" / "model").exists()
    assert cli.main(["full", *flags, "--run_name", "rung", "--resume"]) == 0
    assert json.loads((tmp_path / "rung" / "results.json").read_text())["status"] == "finished"
    for name, value in weights(tmp_path / "rung").items():  # its validation at the rung changed nothing after it
        torch.testing.assert_close(value, straight[name], rtol=0, atol=1e-6)

    # a rung at an epoch's end, where the whole run validates too: the resumed run goes on from after that validation
    assert [e["step"] for e in logged if "eval_loss" in e] == [10, 12]
    assert cli.main(["full", *flags, "--run_name", "epoch-end", "--stop_at_share", str(10 / 12)]) == 0
    assert json.loads((tmp_path / "epoch-end" / "results.json").read_text())["stopped_early"]["step"] == 10
    assert cli.main(["full", *flags, "--run_name", "epoch-end", "--resume"]) == 0
    for name, value in weights(tmp_path / "epoch-end").items():
        torch.testing.assert_close(value, straight[name], rtol=0, atol=1e-6)


def test_resume_refuses_a_finished_run_and_a_missing_one(trained_runs, common_flags, capsys):
    out = trained_runs["output_dir"]
    assert cli.main(["full", *common_flags, "--output_dir", str(out), "--resume", "--run_name", "full-run"]) == 1
    assert "finished already" in capsys.readouterr().err
    assert cli.main(["full", *common_flags, "--output_dir", str(out), "--resume", "--run_name", "nothing"]) == 1
    assert "there is no run nothing" in capsys.readouterr().err


def test_a_loss_that_turns_non_finite_stops_the_run_naming_the_step(common_flags, tmp_path, capsys):
    argv = ["full", *common_flags, "--output_dir", str(tmp_path), "--max_steps", "30", "--learning_rate", "1e4"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "the training loss became" in err and "at step" in err and "Traceback" not in err
    (record,) = tmp_path.glob("full-*/results.json")
    results = json.loads(record.read_text())
    assert results["status"] == "failed" and "the training loss became" in results["error"]


@pytest.fixture(scope="module")
def model_without_dropout(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with dropout off: each process would draw its own masks, and the runs could not agree."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    root = tmp_path_factory.mktemp("no-dropout")
    model.save_pretrained(root)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root)
    return root


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_two_processes_with_gloo_match_one_process_with_the_same_global_batch(
    mode, common_flags, model_without_dropout, tmp_path
):
    flags = [*common_flags, "--model", str(model_without_dropout), "--output_dir", str(tmp_path)]
    flags += ["--max_steps", "8", "--eval_examples", "2", "--learning_rate", "3e-3", "--logging_steps", "2"]
    flags += ["--lora_dropout", "0"] if mode == "lora" else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "main.py"]
    done = subprocess.run(
        [*two, mode, *flags, "--batch_size", "2", "--run_name", "two"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, errors_of(done)
    assert cli.main([mode, *flags, "--batch_size", "4", "--run_name", "one"]) == 0

    two_results = json.loads((tmp_path / "two" / "results.json").read_text())
    one_results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # one run directory per run
    assert two_results["world_size"] == 2 and two_results["global_batch_size"] == 4
    assert two_results["peak_memory_is_max_over_processes"] is True
    assert two_results["train_tokens"] == one_results["train_tokens"] == 8 * 4 * 32  # every process's tokens
    two_losses = [e["loss"] for e in two_results["log_history"] if "loss" in e]
    one_losses = [e["loss"] for e in one_results["log_history"] if "loss" in e]
    # The same samples make each global batch, so the losses agree up to float sums taken in another order
    # (another data order, e.g. another seed, moves them by 0.1% to 0.5% here).
    assert two_losses == pytest.approx(one_losses, rel=1e-4)
    assert two_results["test_loss"] == pytest.approx(one_results["test_loss"], rel=1e-4)
    assert two_results["metrics"]["num_examples"] == 2


def test_accelerate_launch_runs_two_processes_that_write_one_run(common_flags, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "main.py"]
    flags = [*common_flags, "--output_dir", str(tmp_path), "--run_name", "acc", "--max_steps", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [*launch, "lora", *flags, "--batch_size", "2"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, errors_of(done)
    results = json.loads((tmp_path / "acc" / "results.json").read_text())
    assert results["world_size"] == 2 and results["train_tokens"] == 4 * 2 * 2 * 32
    assert [p.name for p in tmp_path.iterdir()] == ["acc"]


def test_default_run_names_are_unique_even_within_one_second(tmp_path):
    first, second = create_run_dir(tmp_path, None, "lora"), create_run_dir(tmp_path, None, "lora")
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name.startswith(first.name)  # lora-<timestamp>, then lora-<timestamp>-2


def test_a_checkpoint_outside_a_run_directory_is_refused_in_one_line(common_flags, tmp_path, capsys):
    stray = tmp_path / "copied" / "checkpoint-3"
    stray.mkdir(parents=True)
    assert cli.main(["full", *common_flags, "--output_dir", str(tmp_path / "out"), "--resume", str(stray)]) == 1
    err = capsys.readouterr().err
    assert "is not a checkpoint inside a run's checkpoints/ folder" in err and "--resume --run_name" in err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["copied"]


def test_results_files_are_strict_json_readable_by_others(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"test_loss": float("nan"), "test_perplexity": math.inf, "steps": [1.5, -math.inf]})
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "test_loss": None, "test_perplexity": None, "steps": [1.5, None]
    }  # fmt: skip
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600
