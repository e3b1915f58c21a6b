"""The default Hub ids: legacy ids, a warm Hugging Face cache read offline, and an unreachable Hub said at once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, load_dataset

import main as cli
from pipeline.hub import NAMESPACED_IDS, hub_id

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0" * 40  # the snapshot a warm cache's refs/main names
SMALL_RUN = ["--block_size", "32", "--eval_examples", "4", "--num_beams", "2", "--eval_batch_size", "4"]


@pytest.fixture(scope="module")
def warm_hf_home(tmp_path_factory, tiny_model_dir: Path, data_dir: Path) -> Path:
    """A Hugging Face home as the default ids leave it: the model in the hub cache under openai-community/gpt2, and
    Salesforce/wikitext's wikitext-2-raw-v1 config in the datasets cache, the one place datasets 5.2 reads offline."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--openai-community--gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)

    # A dataset repository laid out like the Hub's (a config in the card, parquet files), prepared by datasets itself,
    # then filed under the Hub id: datasets names its cache folder after the repository.
    source = tmp_path_factory.mktemp("repos") / "wikitext"
    for split in ("train", "validation", "test"):
        rows = (data_dir / f"{split}.txt").read_text().splitlines(keepends=True)
        Dataset.from_dict({"text": rows}).to_parquet(source / "wikitext-2-raw-v1" / f"{split}.parquet")
    splits = "".join(
        f"    - split: {s}\n      path: wikitext-2-raw-v1/{s}.parquet\n" for s in ("train", "validation", "test")
    )
    (source / "README.md").write_text(
        f"---\nconfigs:\n  - config_name: wikitext-2-raw-v1\n    data_files:\n{splits}---\n"
    )
    load_dataset(str(source), "wikitext-2-raw-v1", cache_dir=str(home / "datasets"))
    (home / "datasets" / "wikitext").rename(home / "datasets" / "Salesforce___wikitext")
    return home


def run_tool(argv: list[str], hf_home: Path, **env: str) -> subprocess.CompletedProcess:
    """The tool in a fresh process whose Hugging Face files all live in `hf_home`."""
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_CACHE", "HF_HUB_CACHE")}
    return subprocess.run(
        [sys.executable, "main.py", *argv],
        cwd=ROOT,
        env={**base, "HF_HOME": str(hf_home), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def unreachable_endpoint() -> str:
    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_help_shows_the_namespaced_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps help at the terminal's width
    with pytest.raises(SystemExit):
        cli.main(["full", "-h"])
    help_text = capsys.readouterr().out
    assert "(default: openai-community/gpt2)" in help_text
    assert "(default: Salesforce/wikitext)" in help_text and "(default: wikitext-2-raw-v1)" in help_text


def test_legacy_ids_map_to_namespaced_ones_with_a_note(capsys):
    assert hub_id("model", "gpt2") == "openai-community/gpt2"
    assert hub_id("model", "distilgpt2") == "distilbert/distilgpt2"
    assert hub_id("dataset", "wikitext") == "Salesforce/wikitext"
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        f"note: --{k} {n} is {NAMESPACED_IDS[k][n]} on the Hub; using {NAMESPACED_IDS[k][n]}"
        for k, n in (("model", "gpt2"), ("model", "distilgpt2"), ("dataset", "wikitext"))
    ]
    assert (
        hub_id("model", "someone/gpt2") == "someone/gpt2"
        and hub_id("model", "bert-base-uncased") == "bert-base-uncased"
    )


def test_a_dataset_id_without_namespace_fails_in_one_line(tiny_model_dir, capsys, tmp_path):
    argv = ["full", "--model", str(tiny_model_dir), "--dataset", "ptb_text_only", "--output_dir", str(tmp_path)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "namespace/name" in err[0] and "--data_dir" in err[0]


def test_default_model_and_dataset_train_evaluate_and_score_from_a_warm_cache_offline(warm_hf_home, tmp_path):
    out = tmp_path / "results"
    argv = ["lora", "--max_steps", "2", *SMALL_RUN, "--cache_dir", str(tmp_path / "blocks"), "--output_dir", str(out)]
    done = run_tool([*argv, "--run_name", "warm"], warm_hf_home, HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "warm" / "results.json").read_text())
    assert results["status"] == "finished" and results["optimizer_steps"] == 2
    assert results["model"] == "openai-community/gpt2" and results["config"]["dataset"] == "Salesforce/wikitext"
    assert results["test_loss"] > 0 and results["metrics"]["num_examples"] == 4 and "chrf" in results["metrics"]
    assert results["model_revision"] == COMMIT  # the commit the run loaded, as the cache's refs/main named it

    # The Hub moves on: main now names another commit with other weights. `analyze` reloads the one the run used.
    import torch
    from transformers import AutoModelForCausalLM

    moved = tmp_path / "hf_home_moved"
    shutil.copytree(warm_hf_home, moved)
    repo, later = moved / "hub" / "models--openai-community--gpt2", "1" * 40
    shutil.copytree(repo / "snapshots" / COMMIT, repo / "snapshots" / later)
    other = AutoModelForCausalLM.from_pretrained(repo / "snapshots" / later)
    with torch.no_grad():
        for weight in other.parameters():
            weight.mul_(1.5)
    other.save_pretrained(repo / "snapshots" / later)
    (repo / "refs" / "main").write_text(later)
    done = run_tool(["analyze", str(out / "warm")], moved, HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr[-2000:]
    again = json.loads((out / "warm" / "results.json").read_text())["update_shape"]["matrices"]
    for name, matrix in results["update_shape"]["matrices"].items():
        assert again[name]["relative_update_norm"] == pytest.approx(matrix["relative_update_norm"], rel=1e-3)
    # A LoRA run stopped before the Hub moved resumes on the commit it started from (its checkpoint holds only the
    # adapter): it ends as the run that was never stopped
    done = run_tool([*argv, "--run_name", "stopped", "--stop_at_share", "0.5"], warm_hf_home, HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr[-2000:]
    done = run_tool([*argv, "--run_name", "stopped", "--resume"], moved, HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((out / "stopped" / "results.json").read_text())
    assert resumed["model_revision"] == COMMIT and resumed["test_loss"] == results["test_loss"]
    # So does the adapter put on its base later (a study's generation run of its chosen arm)
    argv = ["evaluate", "--adapter", str(out / "warm" / "adapter"), *SMALL_RUN, "--output_dir", str(out)]
    done = run_tool([*argv, "--cache_dir", str(tmp_path / "blocks"), "--run_name", "later"], moved, HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr[-2000:]
    later = json.loads((out / "later" / "results.json").read_text())
    assert later["model_revision"] == COMMIT and later["test_loss"] == pytest.approx(results["test_loss"], rel=1e-6)


def test_an_unreachable_hub_falls_back_to_the_warm_cache_and_legacy_ids_find_it(warm_hf_home, tmp_path):
    argv = ["evaluate", "--model", "gpt2", "--dataset", "wikitext", *SMALL_RUN, "--eval_examples", "2"]
    argv += ["--cache_dir", str(tmp_path / "blocks"), "--output_dir", str(tmp_path), "--run_name", "base"]
    done = run_tool(argv, warm_hf_home, HF_ENDPOINT=unreachable_endpoint())
    assert done.returncode == 0, done.stderr[-2000:]
    assert "note: --model gpt2 is openai-community/gpt2" in done.stderr
    assert "note: --dataset wikitext is Salesforce/wikitext" in done.stderr
    assert "Retrying" not in done.stderr  # the client's retries were never started
    assert json.loads((tmp_path / "base" / "results.json").read_text())["status"] == "finished"


def test_an_unreachable_hub_without_a_cache_is_one_line_at_once(tmp_path):
    done = run_tool(
        ["full", "--output_dir", str(tmp_path)], tmp_path / "empty_hf_home", HF_ENDPOINT=unreachable_endpoint()
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr and "Retrying" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "'openai-community/gpt2': the Hugging Face Hub could not be reached" in line and "--model DIR" in line


def test_without_the_hub_a_cache_warmed_under_the_legacy_ids_still_serves(tmp_path, monkeypatch, capsys):
    import datasets
    from huggingface_hub import constants

    from pipeline.hub import cached_id

    legacy = tmp_path / "hub" / "models--gpt2"
    (legacy / "refs").mkdir(parents=True)
    (legacy / "refs" / "main").write_text(COMMIT)
    (legacy / "snapshots" / COMMIT).mkdir(parents=True)
    (legacy / "snapshots" / COMMIT / "config.json").write_text("{}")
    (tmp_path / "datasets" / "wikitext" / "wikitext-2-raw-v1").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    assert cached_id("model", "openai-community/gpt2") == "gpt2"
    assert cached_id("dataset", "Salesforce/wikitext") == "wikitext"
    assert "holds model openai-community/gpt2 under its legacy id gpt2" in capsys.readouterr().err
    assert cached_id("model", "openai-community/gpt2-medium") == "openai-community/gpt2-medium"  # not cached either way
