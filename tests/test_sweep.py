"""Studies as processes: a learning-rate sweep with seeds run piecewise as a job array would (the rate chosen on
validation, generation only at the chosen rates), and a study stopped by a signal and continued. A file of their
own: their many processes then run beside the other study tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import main as cli
from study.statistics import rate_text

ROOT = Path(__file__).resolve().parents[1]


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_a_sweep_with_seeds_runs_piecewise_chooses_on_validation_and_generates_only_at_the_chosen_rates(
    common_flags, tmp_path, capfd
):
    """Two rates per method, two seeds: `--list`/`--only` run the training as a job array would, two at a time; the
    plain command with --jobs 2 then generates at each arm's chosen rate and writes the report; again, it runs
    nothing and writes the same report."""
    argv = [
        *("study", *common_flags, "--output_dir", str(tmp_path), "--study_name", "sweep", "--arms", "full,lora"),
        *("--lora_ranks", "2", "--learning_rates", "full=1e-3,3e-3", "lora=3e-3,1e-2", "--seeds", "1,2"),
        *("--max_steps", "2", "--eval_examples", "2"),
    ]
    capfd.readouterr()
    assert cli.main([*argv, "--list"]) == 0
    listed = [line.split("\t") for line in capfd.readouterr().out.splitlines() if "\t" in line]
    assert [name for _, name, _ in listed][:3] == ["full-lr1e-3-s1", "full-lr1e-3-s2", "full-lr3e-3-s1"]
    assert len(listed) == 8 and all(command.startswith("python main.py ") for _, _, command in listed)
    for pair in (listed[i : i + 2] for i in range(0, 8, 2)):  # an array of one run per task, two tasks at a time
        tasks = [subprocess.Popen([sys.executable, "main.py", *argv, "--only", i], cwd=ROOT) for i, _, _ in pair]
        assert [task.wait() for task in tasks] == [0, 0]

    assert cli.main([*argv, "--jobs", "2"]) == 0
    study_dir = tmp_path / "sweep"
    trained = {name: results(study_dir / name) for _, name, _ in listed}
    chosen = {}
    for arm in ("full", "lora-r2"):  # the lowest mean final validation loss over the two seeds
        rates = {r["config"]["learning_rate"] for n, r in trained.items() if n.startswith(arm)}
        mean = {rate: sum(r["val_loss"] for n, r in trained.items() if n.startswith(arm) and
                          r["config"]["learning_rate"] == rate) / 2 for rate in rates}  # fmt: skip
        chosen[arm] = min(mean, key=mean.get)
    record = json.loads((study_dir / "study.json").read_text())
    assert {a["arm"]: a["chosen_learning_rate"] for a in record["arms"]} == chosen
    generated = sorted(p.name for p in study_dir.glob("*-generation"))
    expected = [f"{arm}-lr{rate_text(rate)}-s{seed}-generation" for arm, rate in chosen.items() for seed in (1, 2)]
    assert generated == sorted(expected)
    for name in generated:  # the chosen run's own model, generating beside another run
        generation = results(study_dir / name)
        assert generation["metrics"]["num_examples"] == 2 and generation["concurrent_runs"] == 2
        assert generation["test_loss"] == trained[name.removesuffix("-generation")]["test_loss"]
    assert all(r["metrics"] is None for r in trained.values())
    report = (study_dir / "report.md").read_text()
    assert "Generation and its scores ran only for each arm's chosen rate (every seed)" in report
    assert "(n=2)" in report and "paired by seed" in report

    capfd.readouterr()
    assert cli.main([*argv, "--jobs", "2"]) == 0
    assert "python main.py" not in capfd.readouterr().out
    assert (study_dir / "report.md").read_text() == report


def test_a_stopped_study_says_how_to_go_on_and_the_same_command_finishes_it(common_flags, tmp_path):
    argv = [sys.executable, "main.py", "study", *common_flags, "--output_dir", str(tmp_path), "--study_name", "s"]
    # 60 steps: the run is still going (tens of ms a step) when the signal lands after the first checkpoint
    argv += ["--arms", "full", "--max_steps", "60", "--save_steps", "3", "--eval_examples", "0"]
    study = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    record = tmp_path / "s" / "full" / "results.json"
    while study.poll() is None and "checkpoint" not in (record.read_text() if record.is_file() else ""):
        time.sleep(0.05)
    study.send_signal(signal.SIGTERM)
    assert study.wait(timeout=120) == 130
    assert "stopped during full; rerun the same command with --study_name s to continue" in study.stderr.read()
    assert results(tmp_path / "s" / "full")["status"] == "interrupted"

    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--resume" in done.stdout
    finished = results(tmp_path / "s" / "full")
    assert finished["status"] == "finished" and finished["optimizer_steps"] == 60
