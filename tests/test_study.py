"""`study`: every arm in one command, continued when run again; the report; honest grouping; LoRA variants."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoModelForCausalLM, integrations

import command_line
import main as cli
from pipeline.adapters import add_lora_adapters
from pipeline.run_directory import take_lock
from study.report import comparable_sets, replicate_columns, shared_and_differing_settings

ARMS = ("base", "full", "lora-r2", "lora-r4", "ia3")
ROOT = Path(__file__).resolve().parents[1]
IA3 = ROOT / "docs" / "peft-configs" / "ia3.json"


@pytest.fixture(scope="module")
def study(common_flags: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("studies")
    argv = [
        *("study", *common_flags, "--output_dir", str(out), "--study_name", "tiny"),
        *("--arms", f"base,full,lora,peft:{IA3}", "--lora_ranks", "2,4", "--max_steps", "4", "--logging_steps", "2"),
        *("--eval_examples", "3"),
    ]
    assert cli.main(argv) == 0
    return {"argv": argv, "dir": out / "tiny"}


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_a_study_runs_every_arm_as_an_ordinary_run_with_each_methods_defaults(study):
    runs = {arm: results(study["dir"] / arm) for arm in ARMS}
    assert all(r["status"] == "finished" for r in runs.values())
    assert [runs[a]["mode"] for a in ARMS] == ["base", "full", "lora", "lora", "peft"]
    assert runs["ia3"]["method"] == "ia3" and runs["ia3"]["adapter_config"]["feedforward_modules"] == ["mlp.c_proj"]
    assert (runs["lora-r2"]["config"]["lora_rank"], runs["lora-r4"]["config"]["lora_rank"]) == (2, 4)
    assert runs["full"]["config"]["learning_rate"] == 1e-5 and runs["lora-r2"]["config"]["learning_rate"] == 1e-4
    assert runs["ia3"]["config"]["learning_rate"] == 1e-4  # LoRA's default, for every adapter
    assert runs["full"]["config"]["weight_decay"] == 0.01 and runs["lora-r4"]["config"]["weight_decay"] == 0
    assert all(r["optimizer_steps"] == 4 and r["metrics"]["num_examples"] == 3 for a, r in runs.items() if a != "base")
    assert runs["lora-r4"]["trainable_params"] == 2 * runs["lora-r2"]["trainable_params"]
    table = (study["dir"] / "comparison.md").read_text()
    assert all(f"({arm})" in table for arm in ARMS)
    assert "- lora_rank: lora (lora-r2) 2; lora (lora-r4) 4" in table


def test_the_report_names_valid_png_figures_beside_it(study):
    report = (study["dir"] / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert len(figures) == 6 and "update_spectrum.png" in figures  # the full arm's update, LoRA's ranks beside it
    for name in figures:
        with Image.open(study["dir"] / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 200
    examples = report.split("## Example continuations")[1].split("##")[0]
    assert "| prompt " in examples and all(f"({arm})" in examples.splitlines()[2] for arm in ARMS)
    assert "Different between the columns:" in report and "learning_rate" in report
    every = json.loads((study["dir"] / "comparison.json").read_text())
    (one_set,) = every["sets"]
    labels = ["base (base)", "full (full)", "lora (lora-r2)", "lora (lora-r4)", "ia3 (ia3)"]
    assert [r["label"] for r in one_set["runs"]] == labels
    assert one_set["runs"][1]["test_perplexity"] == results(study["dir"] / "full")["test_perplexity"]


def test_the_report_opens_with_a_verdict_whose_numbers_are_those_of_its_tables(study):
    report = (study["dir"] / "report.md").read_text()
    assert report.index("## Verdict") < report.index("## Each arm at its chosen learning rate")
    verdict = report.split("## Verdict")[1].split("\n## ")[0]
    full = results(study["dir"] / "full")
    for arm in ("lora-r2", "lora-r4", "ia3"):
        (row,) = [r for r in report.splitlines() if r.startswith(f"| {arm} ") and "| full " in r and "perplexity" in r]
        (line,) = [v for v in verdict.splitlines() if f"**{arm}**" in v]
        why = f"{arm} ran one rate, not tuned; {arm} ran one seed; full ran one rate, not tuned; full ran one seed"
        assert line.startswith(f"- **Unsettled** ({why}): **{arm}** against full")  # no sweep: nothing bracketed
        assert f"test perplexity {row.split('|')[4].strip()} (n=1, no interval" in line
        params = results(study["dir"] / arm)["trainable_params"] / full["trainable_params"]
        assert f"{params:#.3g}x the trainable parameters" in line and "x the peak memory" in line


def test_the_same_study_again_trains_nothing_and_changes_no_finished_arm(study, capfd):
    before = {arm: (study["dir"] / arm / "results.json").read_bytes() for arm in ARMS}
    capfd.readouterr()
    assert cli.main(study["argv"]) == 0
    printed = capfd.readouterr().out
    assert printed.count("finished already, skipped") == len(ARMS) and "python main.py" not in printed
    assert {arm: (study["dir"] / arm / "results.json").read_bytes() for arm in ARMS} == before

    assert cli.main([*study["argv"], "--max_steps", "5"]) == 1  # the same study, other settings: refused
    captured = capfd.readouterr()
    assert "finished already" not in captured.out  # every arm is checked before any runs
    assert "full was started with other settings (--max_steps 4 -> 5)" in captured.err
    assert "--study_name" in captured.err


def test_runs_recorded_before_eval_seed_that_drew_a_fraction_are_refused_and_whole_splits_are_not(tmp_path, capsys):
    """A study of --data_fraction 0.5 made before --eval_seed scored each seed on rows drawn with its own --seed:
    rerun now (rows of --eval_seed 0) it is refused in one line before anything runs, its runs left as they are;
    with every row scored (--data_fraction 1) an old run is this study's."""
    from pipeline.settings import RunSettings
    from study.runner import StudySettings, changed_settings, planned_runs

    argv = ["study", "--output_dir", str(tmp_path), "--study_name", "s", "--arms", "full", "--seeds", "1,2"]
    argv += ["--eval_examples", "0"]
    args = cli.build_parser().parse_args([*argv, "--data_fraction", "0.5"])
    for run in planned_runs(StudySettings.from_flags(args), RunSettings.from_flags(args), tmp_path / "s").runs:
        config = {k: v for k, v in run.settings.to_config().items() if k != "eval_seed"}  # as runs recorded it then
        (tmp_path / "s" / run.name).mkdir(parents=True)
        (tmp_path / "s" / run.name / "results.json").write_text(
            json.dumps({"status": "finished", "mode": "full", "method": "full", "config": config, "val_loss": 2.0})
        )
    before = {p: p.read_bytes() for p in (tmp_path / "s").glob("*/results.json")}
    capsys.readouterr()
    assert cli.main([*argv, "--data_fraction", "0.5"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].endswith(
        "full-s1 was started with other settings (--eval_seed unrecorded: rows drawn with --seed 1 -> 0); "
        "give this study another --study_name"
    )
    assert {p: p.read_bytes() for p in (tmp_path / "s").glob("*/results.json")} == before
    args = cli.build_parser().parse_args(argv)
    whole = planned_runs(StudySettings.from_flags(args), RunSettings.from_flags(args), tmp_path / "new").runs[0]
    config = {k: v for k, v in whole.settings.to_config().items() if k != "eval_seed"}
    assert config["data_fraction"] == 1 and changed_settings(config, whole.settings) == []
    assert changed_settings(config | {"data_fraction": 0.5}, whole.settings)[-1].startswith("--eval_seed unrecorded")
    seeded_alike = dataclasses.replace(whole.settings, seed=whole.settings.eval_seed, data_fraction=0.5)
    assert changed_settings(config | {"data_fraction": 0.5, "seed": seeded_alike.seed}, seeded_alike) == []  # same rows


def test_runs_of_other_settings_get_their_own_table_and_a_saved_model_is_no_base(study, common_flags, capsys):
    flags = [*common_flags, "--output_dir", str(study["dir"]), "--eval_examples", "3"]
    # another experiment (block size): a table of its own; another seed would be a replicate in the study's table
    assert cli.main(["full", *flags, "--run_name", "other-block", "--block_size", "16", "--max_steps", "4"]) == 0
    assert cli.main(["evaluate", *flags, "--model", str(study["dir"] / "full" / "model"), "--run_name", "again"]) == 0
    capsys.readouterr()
    assert cli.main(study["argv"]) == 0
    printed = capsys.readouterr().out
    assert "other-block" not in printed and "(again)" not in printed and "base (base)" in printed

    study_report = (study["dir"] / "report.md").read_text()
    assert cli.main(["compare", "--output_dir", str(study["dir"]), "--all"]) == 0
    printed = capsys.readouterr().out
    tables = printed.split("Set ")[1:]
    assert len(tables) == 3
    (other,) = [t for t in tables if "other-block" in t]
    (saved,) = [t for t in tables if "(again)" in t]
    assert "full (full)" not in other and "base (base)" not in other
    assert "saved (again)" in saved and "base (" not in saved
    # in a study's directory compare only prints: the study's report (pooled, rates chosen) stays as it wrote it
    assert "its report.md is left as the study wrote it" in printed
    assert (study["dir"] / "report.md").read_text() == study_report


def test_a_dora_arm_on_all_linear_layers_trains_and_counts_parameters_as_peft(common_flags, tmp_path):
    argv = ["lora", *common_flags, "--output_dir", str(tmp_path), "--run_name", "dora", "--use_dora"]
    argv += ["--lora_target_modules", "all-linear", "--max_steps", "3", "--logging_steps", "1", "--eval_examples", "0"]
    assert cli.main(argv) == 0
    run = results(tmp_path / "dora")
    assert run["method"] == "dora" and run["optimizer_steps"] == 3 and run["best_train_loss"] > 0
    args = cli.build_parser().parse_args(argv)
    peft_model = add_lora_adapters(AutoModelForCausalLM.from_pretrained(args.model), args)
    assert run["trainable_params"] == peft_model.get_nb_trainable_parameters()[0]
    adapter = json.loads((tmp_path / "dora" / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] and {m.rsplit(".")[-1] for m in adapter["target_modules"]} == {
        "c_attn",
        "c_proj",
        "c_fc",
    }


def test_a_tracker_that_is_not_installed_is_named_before_anything_runs(capsys):
    missing = [t for t in command_line.TRACKERS[1:] if not getattr(integrations, f"is_{t}_available")()]
    if not missing:
        pytest.skip("every tracker is installed here")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["study", "--report_to", missing[0]])
    assert exit_info.value.code == 2
    assert f"{missing[0]} is not installed; pip install {missing[0]}" in capsys.readouterr().err


def test_the_quick_start_runs_share_one_table_however_their_flags_were_typed(tmp_path):
    """`full --epochs 2` records 2.0 and `lora` the default 2; `--model gpt2` is openai-community/gpt2."""
    runs = []
    for argv in (["full", "--epochs", "2", "--model", "gpt2"], ["lora", "--lora_alpha", "32"], ["evaluate"]):
        args = cli.build_parser().parse_args(argv)
        mode = {"evaluate": "base"}.get(argv[0], argv[0])
        runs.append(
            {"mode": mode, "config": vars(args), "precision": "fp32", "environment": {"device": "cpu"},
             "world_size": 1, "global_batch_size": 4, "run_dir": str(tmp_path / argv[0]), "finished_at": argv[0]}
        )  # fmt: skip
    (only,) = comparable_sets(runs)
    assert [r["mode"] for r in only] == ["base", "full", "lora"]
    differ = shared_and_differing_settings(replicate_columns(only))[1]
    assert "epochs" not in differ and "model" not in differ and "lora_alpha" not in differ
    assert set(differ) == {"method", "learning_rate", "weight_decay"}


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--learning_rates", "full=0,1e-5"], "must be positive, got 0"),
        (["--learning_rates", "dora=1e-4"], "dora is not a trained arm of --arms base,full,lora"),
        (["--learning_rates", "1e-4,1e-4"], "each value once"),
        (["--seeds", "1,2,1"], "each value once"),
        (["--learning_rate", "1e-4", "--lr_sweep", "3"], "give one of --learning_rate and --lr_sweep"),
        (["--jobs", "4096"], "--jobs 4096: more runs at once than"),
        (["--only", "3"], "--only 3: the study has runs 0 to 2 now"),
        (["--learning_rates", "full=1.001e-4,1.002e-4"], "equal to 3 significant digits would share a run"),
        (["--halving", "3"], "--halving 3 chooses among rates: give --learning_rates, --lr_sweep or --widen"),
        (["--halving", "1", "--lr_sweep", "3"], "--halving: must be 2 or more, got 1"),
    ],
)
def test_bad_study_input_is_one_error_line_before_anything_runs(flags, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CPU host, whatever this one has
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["study", "--output_dir", str(tmp_path), "--study_name", "s", "--eval_examples", "0", *flags])
    assert exit_info.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_run_another_process_holds_is_waited_for_not_run_twice(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    run_dir = tmp_path / "s" / "full"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"status": "running", "mode": "full"}))
    lock = take_lock(run_dir)  # as a run started by `--only 0` elsewhere holds it

    def finish() -> None:
        (run_dir / "results.json").write_text(json.dumps({"status": "finished", "mode": "full"}))
        lock.close()

    timer = threading.Timer(1.5, finish)
    timer.start()
    assert cli.main(["study", "--output_dir", str(tmp_path), "--study_name", "s", "--arms", "full", "--only", "0"]) == 0
    timer.join()
    printed = capsys.readouterr().out
    assert "full is running in another process; waiting for it" in printed and "python main.py" not in printed


def test_a_study_part_without_a_name_and_a_run_stopped_before_its_settings_were_recorded(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["study", "--output_dir", str(tmp_path), "--list"])
    assert exit_info.value.code == 2 and "--list and --only need --study_name" in capsys.readouterr().err
    stopped = tmp_path / "s" / "lora-r4"  # killed while its data was prepared: no config yet
    stopped.mkdir(parents=True)
    (stopped / "results.json").write_text(json.dumps({"status": "running", "mode": "lora", "started_at": "t"}))
    assert cli.main(["study", "--output_dir", str(tmp_path), "--study_name", "s", "--list"]) == 0
    assert "lora-r4" in capsys.readouterr().out
