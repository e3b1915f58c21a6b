"""The command line: bad input, unreachable sources, and the comparison table."""

from __future__ import annotations

import json
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
