"""A study as processes: a learning-rate sweep with seeds, halving and widening, run piecewise as a job array
would (the rate chosen on validation, generation only at the chosen rates), stopped by a signal and continued. A
file of its own: its many processes then run beside the other study tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import main as cli
from study.runner import recorded
from study.statistics import rate_text

ROOT = Path(__file__).resolve().parents[1]


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_a_sweep_with_seeds_widens_halves_survives_a_kill_chooses_on_validation_and_generates_at_the_chosen_rates(
    common_flags, tmp_path, capfd
):
    """Two rates per method, two seeds, halving 2 and widening 1: `--list`/`--only` run the first round (every rate
    to the rung) as a job array would, two at a time; the plain command with --jobs 2 goes on (the best rate of each
    arm to the end, a rate added outward from the edge it is at, at the rung first), is killed in the middle and run
    again: it trains no finished run again, generates at each arm's chosen rate and writes the report; again, it
    runs nothing and writes the same report."""
    argv = [
        *("study", *common_flags, "--output_dir", str(tmp_path), "--study_name", "sweep", "--arms", "full,lora"),
        *("--lora_ranks", "2", "--learning_rates", "full=1e-3,3e-3", "lora=3e-3,1e-2", "--seeds", "1,2"),
        *("--max_steps", "4", "--eval_examples", "2", "--halving", "2", "--widen", "1"),
    ]
    capfd.readouterr()
    assert cli.main([*argv, "--list"]) == 0
    listed = [line.split("\t") for line in capfd.readouterr().out.splitlines() if "\t" in line]
    assert [name for _, name, _ in listed][:3] == ["full-lr1e-3-s1", "full-lr1e-3-s2", "full-lr3e-3-s1"]
    assert len(listed) == 8 and all(command.startswith("python main.py ") for _, _, command in listed)
    assert all("--stop_at_share 0.5" in command for _, _, command in listed)  # every rate to the rung first
    for pair in (listed[i : i + 2] for i in range(0, 8, 2)):  # an array of one run per task, two tasks at a time
        tasks = [subprocess.Popen([sys.executable, "main.py", *argv, "--only", i], cwd=ROOT) for i, _, _ in pair]
        assert [task.wait() for task in tasks] == [0, 0]
    study_dir = tmp_path / "sweep"
    rung = {name: results(study_dir / name) for _, name, _ in listed}
    assert all(r["status"] == "stopped_early" and r["stopped_early"]["step"] == 2 for r in rung.values())
    assert all((study_dir / name / "checkpoints" / "checkpoint-2").is_dir() for name in rung)
    capfd.readouterr()
    assert cli.main([*argv, "--list"]) == 0
    printed = capfd.readouterr().out
    (pending,) = [line.removeprefix("not done: ").split(",") for line in printed.splitlines() if "not done" in line]
    assert len(pending) == 4 and "--list again" in printed  # the better rate of each arm, both seeds, to the end

    log = tmp_path / "study.log"  # a file, not a pipe: the runs' progress bars would fill a pipe no one reads yet
    with log.open("w") as stderr:
        study = subprocess.Popen([sys.executable, "main.py", *argv, "--jobs", "2"], cwd=ROOT, stderr=stderr)
    while study.poll() is None and not any(recorded(p).get("status") == "finished" for p in study_dir.glob("*-s?")):
        time.sleep(0.05)
    study.send_signal(signal.SIGTERM)  # in the middle of the round that takes the best rates to the end
    assert study.wait(timeout=120) == 130
    assert "rerun the same command with --study_name sweep to continue" in log.read_text()
    finished = {p.name: (p / "results.json").read_bytes() for p in study_dir.glob("*-s?") if
                results(p)["status"] == "finished"}  # fmt: skip
    assert finished
    capfd.readouterr()
    assert cli.main([*argv, "--jobs", "2"]) == 0
    printed = capfd.readouterr().out
    assert all(f"{name} finished already, skipped" in printed for name in finished)
    assert {name: (study_dir / name / "results.json").read_bytes() for name in finished} == finished

    trained = {p.name: results(p) for p in study_dir.glob("*-s?")}
    record = json.loads((study_dir / "study.json").read_text())
    chosen = {}
    for arm in record["arms"]:
        (note,) = [n for n in arm["notes"] if "bracketed by" in n or "still at the edge" in n]
        assert "bracketed by" in note or note.endswith("still at the edge after 1 widening (--widen 1)")
        assert sum(r["added_by_widening"] for r in arm["rates"]) in (1, 2)  # one a side at most
        stopped = [r for r in arm["rates"] if r["stopped_at_step"]]
        assert stopped and all(trained[n]["stopped_early"]["val_loss"] > 0 for r in stopped for n in r["runs"])
        ended = [r for r in arm["rates"] if r["val_loss_mean"] is not None]
        # the lowest mean final validation loss over the two seeds, among the rates that went to the end
        means = {r["learning_rate"]: sum(trained[n]["val_loss"] for n in r["runs"]) / 2 for r in ended}
        chosen[arm["arm"]] = min(means, key=means.get)
    assert {a["arm"]: a["chosen_learning_rate"] for a in record["arms"]} == chosen
    generated = sorted(p.name for p in study_dir.glob("*-generation"))
    expected = [f"{arm}-lr{rate_text(rate)}-s{seed}-generation" for arm, rate in chosen.items() for seed in (1, 2)]
    assert generated == sorted(expected)
    for name in generated:  # the chosen run's own model, generating beside another run
        generation = results(study_dir / name)
        assert generation["metrics"]["num_examples"] == 2 and generation["concurrent_runs"] == 2
        assert generation["test_loss"] == trained[name.removesuffix("-generation")]["test_loss"]
    assert all(r.get("metrics") is None for r in trained.values())
    report = (study_dir / "report.md").read_text()
    assert "Generation and its scores ran only for each arm's chosen rate (every seed)" in report
    assert "(n=2)" in report and "paired by seed" in report and "same validation and test rows" not in report
    assert "Successive halving stopped" in report and "so it saved" in report
    verdict = report.split("## Verdict")[1].split("\n## ")[0]
    (row,) = [line for line in report.splitlines() if line.startswith("| lora-r2 | full        | test_perplexity")]
    difference, interval = [c.strip() for c in row.split("|")[4:6]]
    assert f"**lora-r2** against full fine-tuning: test perplexity {difference} (95% CI {interval}, n=2)" in verdict

    capfd.readouterr()
    assert cli.main([*argv, "--jobs", "2"]) == 0
    assert "python main.py" not in capfd.readouterr().out
    assert (study_dir / "report.md").read_text() == report
