"""The command line: bad input, unreachable sources, and the comparison table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import main as cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["full", "--data_fraction", "0"],
        ["full", "--data_fraction", "1.5"],
        ["full", "--epochs", "0"],
        ["lora", "--batch_size", "-1"],
        ["lora", "--lora_rank", "0"],
        ["full", "--block_size", "0"],
        ["lora", "--lora_dropout", "1"],
        ["evaluate", "--num_beams", "0"],
        ["evaluate", "--block_size", "32", "--eval_stride", "33"],
        ["qlora"],
        ["study", "--arms", "base,qlora"],
        ["study", "--lora_ranks", "4,0"],
        ["study", "--run_name", "x"],
        ["lora", "--report_to", "neptune"],
        [],
    ],
)
def test_bad_flags_exit_2_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_bad_flag_from_a_real_shell_has_no_traceback():
    done = subprocess.run(
        [sys.executable, "main.py", "lora", "--data_fraction", "2"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "--data_fraction: must be in (0, 1]" in done.stderr and "Traceback" not in done.stderr


def run_and_capture(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and the tool's own error line (progress bars may also go to stderr)."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    return code, line


def test_unknown_hub_model_offline_says_how_to_use_local_files(capsys, tmp_path):
    code, err = run_and_capture(["full", "--model", "no-such-org/no-such-model", "--output_dir", str(tmp_path)], capsys)
    assert code == 1
    assert "could not load tokenizer 'no-such-org/no-such-model'" in err and "--model DIR" in err


def test_missing_local_model_path_fails_at_once(capsys, tmp_path):
    code, err = run_and_capture(["lora", "--model", str(tmp_path / "missing"), "--output_dir", str(tmp_path)], capsys)
    assert code == 1
    assert "does not exist" in err


def test_unreachable_hub_dataset_points_to_data_dir(tiny_model_dir, capsys, tmp_path):
    argv = ["full", "--model", str(tiny_model_dir), "--dataset", "nobody/no-such-data", "--output_dir", str(tmp_path)]
    code, err = run_and_capture(argv, capsys)
    assert code == 1
    assert "could not load dataset 'nobody/no-such-data'" in err and "--data_dir" in err


def test_missing_data_dir_and_missing_split_are_named(tiny_model_dir, data_dir, capsys, tmp_path):
    base = ["full", "--model", str(tiny_model_dir), "--output_dir", str(tmp_path)]
    code, err = run_and_capture([*base, "--data_dir", str(tmp_path / "nowhere")], capsys)
    assert code == 1 and "is not a directory" in err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train.txt").write_text((data_dir / "train.txt").read_text())
    code, err = run_and_capture([*base, "--data_dir", str(partial)], capsys)
    assert code == 1 and "has no validation.txt or validation.parquet" in err


def test_a_fraction_too_small_for_one_block_is_explained(common_flags, capsys, tmp_path):
    argv = ["full", *common_flags, "--output_dir", str(tmp_path), "--data_fraction", "0.01", "--block_size", "128"]
    code, err = run_and_capture(argv, capsys)
    assert code == 1
    assert "holds no full block of 128 tokens" in err and "--data_fraction" in err


def test_compare_prints_both_runs_and_writes_markdown_and_csv(trained_runs, capsys):
    out = trained_runs["output_dir"]
    assert cli.main(["compare", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "full (full-run)" in printed and "lora (lora-run)" in printed
    for label in ("Model size (MB)", "Trainable parameters", "Peak CPU memory (MB)", "Test perplexity", "chrF"):
        assert label in printed
    lora = json.loads((trained_runs["lora"] / "results.json").read_text())
    assert f"{lora['trainable_params']:,}" in printed
    assert (out / "comparison.md").read_text().strip() == printed.strip()
    assert "- learning_rate: full (full-run) 0.003; lora (lora-run) 0.01" in printed
    assert (out / "comparison.csv").read_text().startswith("Metric,full (full-run),lora (lora-run)")


def test_compare_names_and_skips_a_damaged_results_file(trained_runs, capsys):
    out = trained_runs["output_dir"]
    damaged = out / "zz-damaged" / "results.json"
    damaged.parent.mkdir(exist_ok=True)
    damaged.write_text('{"mode": "full", "train_time_s": ')
    try:
        assert cli.main(["compare", "--output_dir", str(out), "--all"]) == 0
        captured = capsys.readouterr()
        assert f"skipping {damaged}" in captured.err
        assert "full (full-run)" in captured.out
    finally:
        damaged.unlink()


def test_a_precision_this_machine_lacks_is_refused_before_anything_is_claimed(common_flags, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 runs on this machine")
    assert cli.main(["full", *common_flags, "--output_dir", str(tmp_path / "out"), "--precision", "fp16"]) == 1
    assert "--precision fp16 needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_run_records_its_paths_resolved_and_compare_elsewhere_keeps_them(
    tiny_model_dir, data_dir, tmp_path, monkeypatch
):
    """Relative paths mean the directory the run started in, wherever `compare` runs later."""
    work = tmp_path / "work"
    (work / "elsewhere").mkdir(parents=True)
    monkeypatch.chdir(work)
    relative_data = os.path.relpath(data_dir, work)
    flags = ["--model", str(tiny_model_dir), "--data_dir", relative_data, "--block_size", "32", "--eval_examples", "0"]
    flags += ["--cache_dir", str(tmp_path / "cache"), "--output_dir", "out"]
    assert cli.main(["evaluate", *flags, "--run_name", "base"]) == 0
    record = json.loads((work / "out" / "base" / "results.json").read_text())
    assert record["config"]["data_dir"] == str(Path(data_dir).resolve())
    assert record["paths_as_typed"]["data_dir"] == relative_data
    monkeypatch.chdir(work / "elsewhere")
    assert cli.main(["compare", "--output_dir", str(work / "out")]) == 0
    report = (work / "out" / "report.md").read_text()
    (row,) = [line.split("|") for line in report.splitlines() if line.startswith("| data_dir ")]
    assert row[2].strip() == relative_data
