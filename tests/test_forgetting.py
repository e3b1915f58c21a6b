"""Forgetting: the loss on general English that is not WikiText, at every validation and at the end, from local
files or a warm Hub cache, null with the reason when it cannot be measured, and in the study's report."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_dataset
from PIL import Image
from transformers import AutoModelForCausalLM

import command_line
import main as cli
from pipeline.data import PackedBlocks, pack_into_blocks, tokenize_rows
from pipeline.forgetting import FROM_SCRATCH, forgetting_blocks
from pipeline.modeling import load_tokenizer

TOKENS = 1000  # --forgetting_tokens: 31 blocks of 32 tokens
OWT_ID, OWT_REVISION = command_line.FORGETTING_DATASET.split("@")
QUICK = ["--eval_examples", "0", "--forgetting_tokens", str(TOKENS)]


def prose_rows(n: int, seed: int) -> list[str]:
    """Paragraphs of everyday English, unlike the WikiText rows the tiny model trains on."""
    rng = random.Random(seed)
    people = ["Mrs. Weston", "her brother", "the doctor", "my neighbour", "a young clerk", "the old farmer"]
    doings = ["walked slowly home", "wrote a long letter", "laughed at the idea", "could not decide", "said nothing"]
    whens = ["that evening", "before breakfast", "all summer", "when the rain stopped", "without a word"]
    return [
        " ".join(
            f"{rng.choice(people).capitalize()} {rng.choice(doings)} {rng.choice(whens)}, and nobody asked why."
            for _ in range(rng.randint(3, 6))
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def prose_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few KB of prose as --forgetting_data_dir takes it: a .txt file, a paragraph per line."""
    root = tmp_path_factory.mktemp("general-english")
    (root / "prose.txt").write_text("\n".join(prose_rows(40, seed=3)) + "\n")
    return root


@pytest.fixture(scope="module")
def study(common_flags: list[str], prose_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("forgetting-study")
    argv = ["study", *common_flags, *QUICK, "--forgetting_data_dir", str(prose_dir), "--output_dir", str(out)]
    argv += ["--study_name", "s", "--arms", "base,full", "--max_steps", "4", "--eval_steps", "2"]
    assert cli.main([*argv, "--logging_steps", "2", "--learning_rate", "3e-3"]) == 0
    return out / "s"


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_forgetting_is_measured_at_every_validation_and_is_the_models_loss_on_the_first_tokens(study, prose_dir):
    full = results(study / "full")
    evals = [e for e in full["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4] and all(e["forgetting_loss"] > 0 for e in evals)
    assert full["forgetting_loss"] == evals[-1]["forgetting_loss"] and full["val_loss"] == evals[-1]["eval_loss"]
    assert full["forgetting_perplexity"] == pytest.approx(math.exp(full["forgetting_loss"]))
    assert full["forgetting_eval_tokens"] == TOKENS // 32 * 32 and full["forgetting_unavailable_reason"] is None

    # The same figure computed directly: the saved model's mean loss over the first TOKENS tokens, packed as WikiText.
    model = AutoModelForCausalLM.from_pretrained(study / "full" / "model").eval()
    rows = (prose_dir / "prose.txt").read_text().splitlines(keepends=True)
    blocks = PackedBlocks(
        pack_into_blocks(tokenize_rows(rows, load_tokenizer(str(study / "full" / "model")))[:TOKENS], 32)
    )
    with torch.no_grad():
        losses = [model(**{k: v[None] for k, v in blocks[i].items()}).loss.item() for i in range(len(blocks))]
    assert full["forgetting_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_the_report_shows_forgetting_rows_and_the_learning_forgetting_figure(study):
    base, full = results(study / "base"), results(study / "full")
    assert base["forgetting_loss"] > 0 and full["forgetting_loss"] != base["forgetting_loss"]
    report = (study / "report.md").read_text()
    change = next(line for line in report.splitlines() if line.startswith("| Forgetting loss change vs base"))
    assert [cell.strip() for cell in change.split("|")[2:4]] == [
        "0.0000",
        f"{full['forgetting_loss'] - base['forgetting_loss']:.4f}",
    ]
    assert "| Forgetting perplexity" in report and "![Learning and forgetting](learning_forgetting.png)" in report
    with Image.open(study / "learning_forgetting.png") as image:
        image.verify()
        assert image.format == "PNG" and min(image.size) > 200


def run_evaluate(common_flags: list[str], tmp_path: Path, *flags: str) -> dict:
    argv = ["evaluate", *common_flags, *QUICK, "--output_dir", str(tmp_path), "--run_name", "base", *flags]
    assert cli.main(argv) == 0
    return results(tmp_path / "base")


@pytest.fixture
def hf_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty datasets cache for this test (the Hub is off in tests: HF_HUB_OFFLINE=1)."""
    import datasets

    cache = tmp_path / "hf_datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def test_without_a_cached_copy_the_run_goes_on_with_a_note_and_null_figures(
    common_flags, tmp_path, hf_datasets_cache, capsys
):
    run = run_evaluate(common_flags, tmp_path, "--forgetting_dataset")
    notes = [line for line in capsys.readouterr().err.splitlines() if "forgetting" in line]
    assert len(notes) == 1 and notes[0].startswith("note: forgetting not measured: could not load dataset")
    assert run["status"] == "finished" and run["val_loss"] > 0
    assert run["forgetting_loss"] is None and run["forgetting_perplexity"] is None
    assert (
        OWT_ID in run["forgetting_unavailable_reason"]
        and "--forgetting_data_dir" in run["forgetting_unavailable_reason"]
    )
    assert cli.main(["compare", "--output_dir", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Forgetting not measured: could not load dataset" in report and "learning_forgetting" not in report

    assert cli.main(["evaluate", *common_flags, "--forgetting_data_dir", str(tmp_path / "nowhere")]) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert line == f"error: --forgetting_data_dir {tmp_path / 'nowhere'} is not a directory"


def test_a_model_from_scratch_has_nothing_to_forget(tiny_model_dir, prose_dir):
    args = cli.build_parser().parse_args(["evaluate", "--from_scratch", "--forgetting_data_dir", str(prose_dir)])
    assert forgetting_blocks(args, load_tokenizer(str(tiny_model_dir))).unavailable_reason == FROM_SCRATCH


def test_the_default_dataset_is_read_from_a_warm_hub_cache_offline(common_flags, tmp_path, hf_datasets_cache):
    # Laid out as the Hub's parquet conversion of the default id at its pinned revision, prepared by datasets itself,
    # then filed under the Hub id: datasets names its cache folder after the repository.
    source = tmp_path / "openwebtext-10k"
    Dataset.from_dict({"text": prose_rows(40, seed=5)}).to_parquet(source / "plain_text" / "train" / "0000.parquet")
    load_dataset(str(source), cache_dir=str(hf_datasets_cache))
    (hf_datasets_cache / "openwebtext-10k").rename(hf_datasets_cache / OWT_ID.replace("/", "___"))
    run = run_evaluate(common_flags, tmp_path, "--forgetting_dataset", f"{OWT_ID}@{OWT_REVISION}")
    assert run["forgetting_unavailable_reason"] is None and run["forgetting_loss"] > 0
    assert run["forgetting_eval_tokens"] == TOKENS // 32 * 32


def test_measuring_forgetting_does_not_change_the_training(common_flags, prose_dir, study, tmp_path):
    """The study's full run measured forgetting at steps 2 and 4; the same run without it trains the same model."""
    argv = ["full", *common_flags, *QUICK, "--output_dir", str(tmp_path), "--run_name", "plain", "--max_steps", "4"]
    assert cli.main([*argv, "--eval_steps", "2", "--logging_steps", "2", "--learning_rate", "3e-3"]) == 0
    plain, measured = results(tmp_path / "plain"), results(study / "full")
    assert plain["forgetting_loss"] is None and measured["forgetting_loss"] is not None
    losses = [[e["loss"] for e in r["log_history"] if "loss" in e] for r in (plain, measured)]
    assert losses[0] == losses[1] and plain["test_loss"] == measured["test_loss"]
