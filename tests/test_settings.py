"""Typed settings: every flag declared once with its kind, the command a study runs built from them, and what
makes runs comparable read from those declarations (fast: no training)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import main as cli
from pipeline.settings import KINDS, METHOD_DEFAULTS, SETTING_COMMANDS, SETTING_KINDS, RunSettings
from study.report import (
    canonical,
    comparable_sets,
    compare,
    measured_on,
    replicate_columns,
    shared_and_differing_settings,
)
from study.runner import StudySettings, planned_runs

LEGACY = Path(__file__).with_name("legacy-study")


def flags(command: str) -> set[str]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return {a.dest for a in sub.choices[command]._actions if a.dest != "help"}


@pytest.mark.parametrize("command", ["full", "lora", "peft", "evaluate"])
def test_every_flag_of_a_run_is_a_declared_setting_of_its_command(command):
    assert all(kind in KINDS for kind in SETTING_KINDS.values())
    declared = {name for name, commands in SETTING_COMMANDS.items() if command in commands}
    assert (
        flags(command) | {"command"} == declared
    )  # a new flag without a declaration (or one in the wrong group) fails here


def test_every_study_flag_is_a_run_setting_or_the_studys_own():
    own = {f.name for f in dataclasses.fields(StudySettings)}
    assert flags("study") <= set(SETTING_KINDS) | own
    assert SETTING_KINDS["seed"] == "replicate" and SETTING_KINDS["learning_rate"] == "swept"


def test_a_runs_settings_turn_into_the_command_line_that_gives_them_back():
    parser = cli.build_parser()
    argv = ["lora", "--lora_rank", "8", "--use_dora", "--lora_target_modules", "c_attn,c_fc", "--seed", "3"]
    argv += ["--learning_rate", "0.0003", "--lr_scheduler_type", "cosine", "--warmup_steps", "5"]
    settings = RunSettings.from_flags(parser.parse_args(argv))
    defaults = RunSettings.from_flags(parser.parse_args(["lora"]))
    assert sorted(settings.to_argv(defaults)) == sorted(argv)  # only what differs from the defaults
    assert RunSettings.from_flags(parser.parse_args(settings.to_argv(defaults))) == settings
    assert "epochs" not in RunSettings.from_flags(parser.parse_args(["evaluate"])).to_config()


def test_a_study_plans_each_arm_by_replacing_fields_of_the_shared_settings(tmp_path):
    args = cli.build_parser().parse_args(["study", "--arms", "base,full,dora", "--lora_ranks", "2,8", "--seed", "5"])
    study = StudySettings(args.arms, args.lora_ranks, args.study_name)
    planned = {p.name: p.settings for p in planned_runs(study, RunSettings.from_flags(args), tmp_path).runs}
    assert list(planned) == ["base", "full", "dora-r2", "dora-r8"]
    assert planned["base"].command == "evaluate" and planned["base"].learning_rate is None
    assert (planned["full"].learning_rate, planned["full"].weight_decay) == METHOD_DEFAULTS["full"]
    assert planned["dora-r8"].lora_rank == 8 and planned["dora-r8"].use_dora and not planned["dora-r8"].use_rslora
    assert {s.seed for s in planned.values()} == {5} and planned["dora-r2"].output_dir == str(tmp_path)


def test_compare_on_runs_an_earlier_version_wrote_gives_the_same_table(tmp_path):
    shutil.copytree(LEGACY, tmp_path / "legacy")
    compare(tmp_path / "legacy")
    assert (tmp_path / "legacy" / "comparison.md").read_text() == (LEGACY / "expected-comparison.md").read_text()


def legacy_runs() -> list[dict]:
    return [json.loads(p.read_text()) | {"run_dir": str(p.parent)} for p in sorted(LEGACY.glob("*/results.json"))]


def test_seed_replicates_share_a_table_and_a_new_experiment_setting_does_not():
    runs = legacy_runs()
    replicate = json.loads(json.dumps(runs[1]))  # full, another seed
    replicate["config"]["seed"], replicate["run_dir"] = 7, "/elsewhere/full-s7"
    other = json.loads(json.dumps(runs[1]))
    other["config"]["block_size"], other["run_dir"] = 64, "/elsewhere/full-b64"
    sets = comparable_sets([*runs, replicate, other])
    assert len(sets) == 2
    (with_base,) = [s for s in sets if any(r["mode"] == "base" for r in s)]
    assert "/elsewhere/full-s7" in [r["run_dir"] for r in with_base]
    columns = replicate_columns(with_base)
    assert [len(c) for c in columns] == [1, 2, 1, 1]  # the seed is a replicate: full and full-s7 are one column
    assert shared_and_differing_settings(columns)[1]["seed"]["full (full, full-s7)"] == [7, 2024]


def test_columns_pooling_the_same_seeds_in_another_folder_order_do_not_differ_in_seed():
    base, full, _, _ = legacy_runs()
    runs = []
    for run, folder, seed in ((base, "base-1", 1), (base, "base-2", 2), (full, "full-a", 2), (full, "full-b", 1)):
        runs.append(json.loads(json.dumps(run)) | {"run_dir": f"/elsewhere/{folder}"})
        runs[-1]["config"]["seed"] = seed
    shared, differ = shared_and_differing_settings(replicate_columns(runs))
    assert "seed" not in differ and shared["seed"] == [1, 2]


def test_runs_that_started_from_different_commits_of_a_hub_model_are_not_pooled():
    """Seed 1 before the Hub model's main branch moved, seed 2 after: two columns, the commit listed as differing;
    runs that recorded no commit (local models, earlier versions) pool as before."""
    _, full, _, _ = legacy_runs()
    runs = []
    for folder, seed, commit in (("full-s1", 1, "a" * 40), ("full-s2", 2, "b" * 40), ("old-s1", 1, None)):
        runs.append(json.loads(json.dumps(full)) | {"run_dir": f"/elsewhere/{folder}", "model_revision": commit})
        runs[-1]["config"]["seed"] = seed
    columns = replicate_columns(runs)
    assert [len(c) for c in columns] == [1, 1, 1]
    assert shared_and_differing_settings(columns)[1]["model_revision"]["full (full-s2)"] == "b" * 40
    unrecorded = [r | {"model_revision": None} for r in runs[:2]]
    assert [len(c) for c in replicate_columns(unrecorded)] == [2]


def test_compare_over_runs_that_differ_only_in_seed_prints_one_column_with_mean_sd_and_n(tmp_path):
    """Two plain runs repeated by hand with another --seed (and the base at both seeds): one table, a column per
    setting with mean ± sample SD (n=2), and the paired differences where both sides share seeds."""
    base, full, _, _ = legacy_runs()
    for run, name, seed, change in (
        (base, "base", 1, 0.0),
        (base, "base", 2, 0.5),
        (full, "full", 1, 0.1),
        (full, "full", 2, 0.4),
    ):
        record = json.loads(json.dumps(run))
        record["config"]["seed"] = seed
        record["test_loss"] = 10.0 + change
        record["test_perplexity"] = 20_000.0 + 1000 * change
        (tmp_path / f"{name}-s{seed}").mkdir()
        (tmp_path / f"{name}-s{seed}" / "results.json").write_text(json.dumps(record))
    printed = compare(tmp_path)
    table = printed.split("\n\n")[0].splitlines()
    assert [c.strip() for c in table[0].split("|")[1:-1]] == [
        "Metric",
        "base (base-s1, base-s2)",
        "full (full-s1, full-s2)",
    ]
    (perplexity,) = [line for line in table if line.startswith("| Test perplexity")]
    assert [c.strip() for c in perplexity.split("|")[2:-1]] == ["20,250.0 ± 353.6 (n=2)", "20,250.0 ± 212.1 (n=2)"]
    (trainable,) = [line for line in table if line.startswith("| Trainable parameters")]
    assert "124,439,808 (n=2)" in trainable
    assert "seed" not in printed.split("Differs between columns:")[1].split("Differences, paired by seed:")[0]
    paired = printed.split("Differences, paired by seed:")[1]
    (loss,) = [line for line in paired.splitlines() if "| test_loss" in line]
    # per seed 10.1 - 10.0 and 10.4 - 10.5: mean 0, SD 0.1414, Student's t(1) at 95%: 12.706 x 0.1414 / sqrt(2)
    assert "[-1.2706, +1.2706]" in loss and "| 2 " in loss and "within the noise" in loss
    assert (tmp_path / "comparison.md").read_text() == printed + "\n"


def test_hardware_and_threads_that_differ_are_listed_and_said_per_column():
    base, full, lora, _ = legacy_runs()
    lora["environment"] = lora["environment"] | {"cpu_threads": 1}
    (one,) = comparable_sets([base, full, lora])
    assert set(shared_and_differing_settings(replicate_columns(one))[1]["cpu_threads"].values()) == {1, 2}
    line = measured_on(one, ["b", "f", "l"])
    assert "different hardware" in line and "l: cpu with torch" in line and "1 CPU threads" in line
    assert measured_on([base, full], ["b", "f"]).startswith("Measured on cpu with torch")


def test_an_earlier_run_without_a_recorded_schedule_shares_a_table_with_one_at_the_trainers_defaults():
    base, full, lora, _ = legacy_runs()
    lora["config"] |= {"lr_scheduler_type": "linear", "warmup_steps": 0}
    assert len(comparable_sets([base, full, lora])) == 1
    lora["config"]["warmup_steps"] = 10
    assert len(comparable_sets([base, full, lora])) == 2


def test_values_compare_as_what_they_mean_and_the_latest_of_identical_runs_is_shown():
    assert canonical("epochs", 2.0) == 2 and canonical("model", "gpt2") == "openai-community/gpt2"
    base, full, lora, _ = legacy_runs()
    again = json.loads(json.dumps(full)) | {"finished_at": "99991231-000000", "run_dir": "/elsewhere/full-again"}
    again["config"]["logging_steps"] = 7  # swept: listed, so another column
    same = json.loads(json.dumps(full)) | {"finished_at": "99991231-000001", "run_dir": "/elsewhere/full-same"}
    same["config"]["save_total_limit"] = 9  # bookkeeping: the same run, the latest shown
    (one,) = comparable_sets([base, full, lora, again, same])
    assert [r["run_dir"].rsplit("/", 1)[1] for r in one] == ["base", "full-again", "full-same", "lora-r4"]
