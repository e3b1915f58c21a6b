"""A learning-rate sweep with seeds, end to end: run piecewise as a job array would, the rate chosen on validation,
generation only at the chosen rates (its own file: its dozen processes then run beside the other study tests)."""

from __future__ import annotations

import json
import subprocess
import sys
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
