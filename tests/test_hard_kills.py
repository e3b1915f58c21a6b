"""Runs that survive a hard kill (SIGKILL: the OOM killer, a scheduler, a power cut) at any point, with every
figure right: the killed run is a child process, its resume is compared with a run that was never stopped."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import main as cli
from pipeline.run_directory import CHECKPOINT_FIGURES, take_lock

ROOT = Path(__file__).resolve().parents[1]

# Installed in the child before the tool runs: each kill point SIGKILLs the process where a real one could land.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import main
    from pipeline import generation, training
    from transformers import Trainer, TrainerCallback

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    point = sys.argv[1]
    if point in ("first_step", "optimizer_step"):  # after the backward pass of step 1 or 5, before its update
        class KillBeforeUpdate(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                if state.global_step == (0 if point == "first_step" else 4):
                    die()
        build = training.build_trainer
        def build_and_arm(*args, **kwargs):
            trainer = build(*args, **kwargs)
            trainer.add_callback(KillBeforeUpdate())
            return trainer
        training.build_trainer = build_and_arm
    elif point == "checkpoint_save":  # checkpoint-4 has its weights and optimizer, not yet its RNG and state
        save_rng_state = Trainer._save_rng_state
        def save_rng_state_or_die(self, output_dir):
            if self.state.global_step == 4:
                die()
            save_rng_state(self, output_dir)
        Trainer._save_rng_state = save_rng_state_or_die
    elif point == "after_model_save":  # model/ is saved, results.json still says running
        training.evaluate_and_save_results = die
    elif point == "generation":
        generation.generate_continuations = die
    sys.exit(main.main(sys.argv[2:]))
    """
)

KILL_POINTS = ["first_step", "optimizer_step", "checkpoint_save", "after_model_save", "generation"]


@pytest.fixture(scope="module")
def flags(common_flags, tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("killed-runs")
    return [
        *common_flags,
        *("--output_dir", str(out), "--max_steps", "6", "--save_steps", "2", "--learning_rate", "3e-3"),
        *("--logging_steps", "2", "--eval_examples", "1"),
    ]


@pytest.fixture(scope="module")
def straight(flags) -> Path:
    """The same run, never stopped."""
    assert cli.main(["full", *flags, "--run_name", "straight"]) == 0
    return Path(flags[flags.index("--output_dir") + 1]) / "straight"


def results_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_hard_kill_then_resume_ends_as_the_run_that_was_never_stopped(point, flags, straight, tmp_path, capsys):
    before = (straight / "results.json").read_bytes()
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(root=str(ROOT)))
    done = subprocess.run([sys.executable, str(killer), point, "full", *flags, "--run_name", point], cwd=ROOT)
    assert done.returncode == -9  # SIGKILL: nothing of the tool ran after it
    run_dir = straight.parent / point
    assert results_of(run_dir)["status"] == "running"  # the record is there from the start
    complete = sorted(p for p in run_dir.glob("checkpoints/*") if (p / CHECKPOINT_FIGURES).is_file())
    survived = json.loads((complete[-1] / CHECKPOINT_FIGURES).read_text()) if complete else {"train_time_s": 0}

    capsys.readouterr()
    assert cli.main(["full", *flags, "--resume", "--run_name", point]) == 0
    err = capsys.readouterr().err
    if point == "checkpoint_save":
        assert "checkpoint-4: its save did not finish" in err
    if point == "first_step":
        assert "no complete checkpoint: starting it over from step 0" in err

    resumed, reference = results_of(run_dir), results_of(straight)
    assert resumed["status"] == "finished"
    assert resumed["resumed_from"] == (str(complete[-1]) if complete else None)
    assert resumed["optimizer_steps"] == reference["optimizer_steps"] == 6
    assert resumed["train_tokens"] == reference["train_tokens"]
    assert resumed["train_time_s"] >= survived["train_time_s"] and resumed["train_time_s"] > 0
    # each session that took steps has its first step apart: the killed one's, if a checkpoint kept it, and the
    # resumed one's unless it started at the last step
    sessions = 1 + bool(complete and int(complete[-1].name.split("-")[1]) < 6)
    assert resumed["first_step_tokens"] == sessions * 4 * 32
    steady_s = resumed["train_time_s"] - resumed["first_step_s"]
    assert resumed["train_tokens_per_s"] == pytest.approx((resumed["train_tokens"] - sessions * 4 * 32) / steady_s)
    assert resumed["test_loss"] == pytest.approx(reference["test_loss"], abs=1e-6)
    ours, theirs = (load_file(d / "model" / "model.safetensors") for d in (run_dir, straight))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".model")) == []
    assert (straight / "results.json").read_bytes() == before  # nothing finished was touched


def test_a_fresh_run_into_a_crashed_runs_directory_is_refused_in_one_line(flags, straight, capsys):
    crashed = straight.parent / "crashed"
    crashed.mkdir()
    (crashed / "results.json").write_text('{"mode": "full", "status": "running"}\n')
    assert cli.main(["full", *flags, "--run_name", "crashed"]) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "--resume --run_name crashed" in line and "another --run_name" in line
    assert (crashed / "results.json").read_text() == '{"mode": "full", "status": "running"}\n'


def test_a_run_that_is_still_going_cannot_be_resumed(flags, straight, capsys):
    live = straight.parent / "live"
    live.mkdir()
    (live / "results.json").write_text('{"mode": "full", "status": "running"}\n')
    held = take_lock(live)  # as the live run's process holds it
    try:
        assert cli.main(["full", *flags, "--resume", "--run_name", "live"]) == 1
        assert "still going" in capsys.readouterr().err
    finally:
        held.close()


def test_resume_refuses_another_commands_run(flags, straight, capsys):
    crashed = straight.parent / "crashed-lora"
    crashed.mkdir()
    (crashed / "results.json").write_text('{"mode": "lora", "status": "running"}\n')
    assert cli.main(["full", *flags, "--resume", "--run_name", "crashed-lora"]) == 1
    assert "is a lora run; resume it with python main.py lora" in capsys.readouterr().err
    assert json.loads((crashed / "results.json").read_text()) == {"mode": "lora", "status": "running"}
