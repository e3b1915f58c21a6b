"""Continuing test rows: the protocol, batched generation, and the `evaluate` command."""

from __future__ import annotations

import csv
import json

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import main as cli
from pipeline.data import prompt_reference_pairs
from pipeline.generation import (
    batch_by_budget_and_length,
    generate_continuations,
    generate_once_per_prompt,
    token_budget,
)
from pipeline.modeling import load_tokenizer


def test_rows_are_cut_at_half_their_words_in_order_skipping_short_rows():
    split = Dataset.from_dict({"text": ["", " = Title = \n", " x \n", " one two three four five \n", "\n", " a b \n"]})
    assert prompt_reference_pairs(split, 2) == [("=", "Title ="), ("one two", "three four five")]
    assert len(prompt_reference_pairs(split, 10)) == 3


def test_token_budget_grows_with_the_reference_and_is_shared_in_steps_of_16():
    assert token_budget("one two three", 1.3) == 16
    assert token_budget(" ".join(["w"] * 13), 1.3) == 32  # 16.9 tokens -> next multiple of 16
    assert token_budget(" ".join(["w"] * 100), 1.5) == 160


def test_batches_share_a_budget_and_pad_prompts_by_at_most_their_new_tokens():
    budgets = [16, 16, 32, 16, 16, 16, 16]
    lengths = [3, 100, 5, 4, 60, 12, 11]
    assert batch_by_budget_and_length(budgets, lengths, batch_size=3, num_beams=1) == [
        (16, [0, 3, 6]), (16, [5]), (16, [4]), (16, [1]), (32, [2])  # 60 beside 12: 48 padded > 2 x 1 x 16 new
    ]  # fmt: skip
    assert batch_by_budget_and_length(budgets, lengths, batch_size=3, num_beams=2) == [
        (16, [0, 3, 6]), (16, [5, 4]), (16, [1]), (32, [2])  # 48 <= 2 x 2 x 16; then 128 > 3 x 2 x 16
    ]  # fmt: skip
    assert batch_by_budget_and_length(budgets, lengths, batch_size=7, num_beams=5) == [
        (16, [0, 3, 6, 5, 4, 1]), (32, [2])
    ]  # fmt: skip
    # a prompt-learning adapter's batches: one length each
    assert batch_by_budget_and_length(budgets, [3, 3, 5, 3, 4, 4, 3], 7, 5, same_length=True) == [
        (16, [0, 1, 3, 6]), (16, [4, 5]), (32, [2])
    ]  # fmt: skip


def test_batched_generation_gives_the_same_hypotheses_as_one_at_a_time(trained_runs, data_dir):
    model = AutoModelForCausalLM.from_pretrained(trained_runs["full"] / "model")
    tokenizer = load_tokenizer(str(trained_runs["full"] / "model"))
    rows = Dataset.from_dict({"text": (data_dir / "test.txt").read_text().splitlines()})
    pairs = prompt_reference_pairs(rows, 10)
    prompts = [p for p, _ in pairs]
    budgets = [16] * len(pairs)  # one budget, so prompts of different lengths share (left-padded) batches
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1
    batched, batched_tokens = generate_continuations(model, tokenizer, prompts, budgets, num_beams=3, batch_size=5)
    alone, alone_tokens = generate_continuations(model, tokenizer, prompts, budgets, num_beams=3, batch_size=1)
    assert batched == alone and batched_tokens == alone_tokens > 0
    assert all(h and not h.startswith(p) for h, p in zip(batched, prompts, strict=True))

    # Prompts encoded once, alone, into the beam cache: transformers' own beam search over its own cache, token for
    # token, also for a one-token prompt beside longer ones (nothing of it encoded ahead)
    tokenizer.padding_side = "left"
    inputs = tokenizer(["=", *prompts[:4]], return_tensors="pt", padding=True)
    assert inputs["attention_mask"][0].sum() == 1 < inputs["attention_mask"].sum(1).max()  # a one-token prompt too
    search = {"no_repeat_ngram_size": 2, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        ours = generate_once_per_prompt(model, inputs, 3, 16, **search)
        library = model.generate(**inputs, num_beams=3, max_new_tokens=16, **search)
    assert torch.equal(ours, library)


def test_training_runs_score_their_generations(trained_runs):
    for mode in ("full", "lora"):
        results = json.loads((trained_runs[mode] / "results.json").read_text())
        metrics = results["metrics"]
        assert metrics["num_examples"] == 6
        assert 0 <= metrics["bleu"] <= 1 and 0 <= metrics["chrf"] <= 100 and metrics["ter"] >= 0
        with (trained_runs[mode] / "generations.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 6 and set(rows[0]) == {"prompt", "reference", "hypothesis"}
        assert results["generated_tokens"] > 0 and results["generation_time_s"] > 0
        assert results["generation_tokens_per_s"] == results["generated_tokens"] / results["generation_time_s"]
        load = results["machine_load"]
        assert load["samples"] >= 1 and 0 <= load["other_cpu_cores_mean"] <= load["other_cpu_cores_max"]
        assert load["busy"] == (load["samples_over_threshold"] >= 0.1 * load["samples"])
        assert load["other_gpu_processes_max"] is None  # no GPU here: unknown, not zero


def test_evaluate_scores_a_base_model_and_compare_shows_it_apart_from_other_settings(
    trained_runs, common_flags, tmp_path, capsys
):
    out = tmp_path / "results"
    assert cli.main(["evaluate", *common_flags, "--output_dir", str(out), "--run_name", "gpt2-base"]) == 0
    results = json.loads((out / "gpt2-base" / "results.json").read_text())
    assert results["mode"] == "base" and results["trainable_params"] == 0
    assert results["metrics"]["num_examples"] == 6 and results["test_perplexity"] > 1
    with (out / "gpt2-base" / "generations.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 6

    adapter = ["--adapter", str(trained_runs["lora"] / "adapter"), "--run_name", "with-adapter"]
    assert cli.main(["evaluate", *common_flags, "--output_dir", str(out), *adapter, "--eval_examples", "0"]) == 0
    with_adapter = json.loads((out / "with-adapter" / "results.json").read_text())
    lora = json.loads((trained_runs["lora"] / "results.json").read_text())
    assert with_adapter["test_loss"] == lora["test_loss"] != results["test_loss"]

    capsys.readouterr()  # the two score different numbers of examples: not comparable, two tables
    assert cli.main(["compare", "--output_dir", str(out)]) == 0
    latest = capsys.readouterr().out
    assert "adapter (with-adapter)" in latest and "gpt2-base" not in latest
    assert cli.main(["compare", "--output_dir", str(out), "--all"]) == 0
    assert "base (gpt2-base)" in capsys.readouterr().out.split("Set 2 of 2")[0]
