"""End-to-end full and LoRA runs on a tiny GPT-2, the figures they record, and what they save."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import main as cli
from lora_finetuning import add_lora_adapters
from pipeline.data import PackedBlocks, pack_into_blocks, packed_blocks_cached, tokenize_rows, tokenizer_fingerprint
from pipeline.modeling import count_parameters, load_tokenizer

RESULT_KEYS = {
    "mode", "model", "config", "environment", "trainable_params", "total_params", "model_size_mb", "train_time_s",
    "peak_gpu_memory_mb", "peak_cpu_memory_mb", "best_train_loss", "best_val_loss", "val_perplexity", "test_loss",
    "test_perplexity", "train_tokens", "train_tokens_per_s", "metrics", "status", "eval_time_s", "checkpoint_time_s",
    "optimizer_steps", "global_batch_size", "world_size",
}  # fmt: skip


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def mean_test_loss(model: torch.nn.Module, blocks: PackedBlocks) -> float:
    """Per-token cross-entropy over the test blocks: what results.json's test_loss says the model scores."""
    model.eval()
    with torch.no_grad():
        ids = torch.stack([blocks[i]["input_ids"] for i in range(len(blocks))])
        return model(input_ids=ids, labels=ids).loss.item()


def packed_test_split(results: dict) -> PackedBlocks:
    """The run's test split, tokenized and packed again here, independently of the run's cache."""
    config = results["config"]
    tokenizer = load_tokenizer(config["model"])
    rows = (Path(config["data_dir"]) / "test.txt").read_text().splitlines(keepends=True)
    return PackedBlocks(pack_into_blocks(tokenize_rows(rows, tokenizer), config["block_size"]))


def test_results_json_has_every_figure_with_sane_values(trained_runs):
    for mode in ("full", "lora"):
        results = read_results(trained_runs[mode])
        assert results.keys() >= RESULT_KEYS
        assert results["mode"] == mode and results["status"] == "finished"
        assert results["config"]["batch_size"] == 4 and results["config"]["block_size"] == 32
        assert 0 < results["trainable_params"] <= results["total_params"]
        assert results["model_size_mb"] > 0 and results["train_time_s"] > 0
        assert results["eval_time_s"] > 0 and results["checkpoint_time_s"] > 0  # measured apart from training
        assert results["world_size"] == 1 and results["global_batch_size"] == 4
        assert results["peak_gpu_memory_mb"] is None  # no CUDA here
        assert results["peak_cpu_memory_mb"] > 50
        assert results["train_tokens"] == 40 * 4 * 32  # steps x batch x block: every trained position is a token
        assert 0 < results["first_step_s"] < results["train_time_s"] and results["first_step_tokens"] == 4 * 32
        assert results["compiled"] is False and results["compile_time_s"] == 0  # auto: a tiny model is not compiled
        steady = (results["train_tokens"] - 4 * 32) / (results["train_time_s"] - results["first_step_s"])
        assert math.isclose(results["train_tokens_per_s"], steady)  # the steps after the first
        assert math.isclose(results["test_perplexity"], math.exp(results["test_loss"]), rel_tol=1e-9)
        assert results["best_val_loss"] <= results["val_loss"] + 1e-9
        assert (trained_runs[mode] / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    full, lora = read_results(trained_runs["full"]), read_results(trained_runs["lora"])
    assert lora["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert lora["model_size_mb"] < full["model_size_mb"]


def test_full_model_reloads_with_transformers_and_scores_the_recorded_test_loss(trained_runs, tiny_model_dir):
    results = read_results(trained_runs["full"])
    model = AutoModelForCausalLM.from_pretrained(trained_runs["full"] / "model")
    blocks = packed_test_split(results)
    assert math.isclose(mean_test_loss(model, blocks), results["test_loss"], rel_tol=1e-4)


def test_lora_adapter_reloads_with_peft_and_scores_the_recorded_test_loss(trained_runs, tiny_model_dir):
    results = read_results(trained_runs["lora"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    blocks = packed_test_split(results)
    base_loss = mean_test_loss(base, blocks)
    model = PeftModel.from_pretrained(base, trained_runs["lora"] / "adapter")
    adapted_loss = mean_test_loss(model, blocks)
    assert math.isclose(adapted_loss, results["test_loss"], rel_tol=1e-4)
    assert adapted_loss < base_loss - 0.01  # the adapter is really applied, and it lowered the loss


def test_packing_keeps_every_token_in_order_without_padding(tiny_model_dir, data_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = (data_dir / "test.txt").read_text().splitlines(keepends=True)
    ids = tokenize_rows(rows, tokenizer)
    blocks = pack_into_blocks(ids, 32)
    assert blocks.shape == (len(ids) // 32, 32)
    assert (blocks.reshape(-1) == ids[: blocks.size]).all()  # in order, nothing dropped but the tail
    assert len(ids) - blocks.size < 32
    assert tokenizer.pad_token_id not in set(ids.tolist())  # no padding (here: EOS) token enters any block


def test_training_loss_falls_on_repetitive_text(trained_runs):
    history = read_results(trained_runs["full"])["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 1.0


def test_gpt2_small_trainable_counts_match_the_study():
    with torch.device("meta"):  # the real architecture, without allocating its weights
        model = GPT2LMHeadModel(GPT2Config())
    assert count_parameters(model) == (124_439_808, 124_439_808)
    args = cli.build_parser().parse_args(["lora", "--lora_rank", "4"])
    trainable, total = count_parameters(add_lora_adapters(model, args))
    assert trainable == 405_504
    assert total == 124_439_808 + 405_504


def test_cached_blocks_are_read_back_instead_of_tokenizing_again(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = [" = Valley = \n", " The river was built in 1900 . \n" * 20]
    first = packed_blocks_cached(texts, tokenizer, 16, tmp_path, tokenizer_key="k")
    (cache_file,) = tmp_path.glob("*.npy")
    marked = first.copy()
    marked[0, 0] = 7
    np.save(cache_file, marked)
    again = packed_blocks_cached(texts, tokenizer, 16, tmp_path, tokenizer_key="k")
    assert again[0, 0] == 7  # came from the cache file, not from the tokenizer
    other = packed_blocks_cached(texts, tokenizer, 8, tmp_path, tokenizer_key="k")
    assert other.shape[1] == 8  # another block size is another cache entry


def test_tokenizer_fingerprint_ignores_padding_and_truncation_left_by_earlier_calls(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["The river was built"], padding="max_length", truncation=True, max_length=4)
    assert tokenizer_fingerprint(tokenizer) == before


def test_a_finished_run_is_never_overwritten(trained_runs, common_flags, capsys):
    before = (trained_runs["full"] / "results.json").read_bytes()
    flags = [*common_flags, "--output_dir", str(trained_runs["output_dir"]), "--run_name", "full-run"]
    assert cli.main(["full", *flags, "--max_steps", "1"]) == 1
    assert "holds another run" in capsys.readouterr().err
    assert (trained_runs["full"] / "results.json").read_bytes() == before


# Training losses of the shared fixture's runs (fixed seed, one thread): a refactor that moves them has changed what the
# tool computes. Pinned from the code before the settings were typed (commit 4896fa6).
GOLDEN_LOSSES = {
    "full": {5: 5.490362167358398, 10: 5.072579956054687, 15: 4.7397613525390625, 20: 4.482852554321289},
    "lora": {5: 5.652821731567383, 10: 5.6324504852294925, 15: 5.632235336303711, 20: 5.622174835205078},
}
# CPUs round float sums differently (torch's kernel sets, MKL's code paths, thread counts). `python
# bench/pinned_loss_spread.py` measured the largest gap to these losses at 6.2e-6 relative (LoRA on AVX2 kernels; full
# 1.6e-7), the same on 1 and 2 threads and with MKL's other code path; on an AVX-512 CPU issue 23 saw 2.5e-6. The
# tolerance is 8x that gap, and each real change it measured moves both methods' losses at least 9.9x past it: a
# learning rate 1% higher 4.9e-4 (LoRA) and 1.7e-3 (full), one warm-up step 2.7e-3, residual dropout 0.1 -> 0.11
# 6.2e-4, the loss counting one more token a block 3.1e-2.
GOLDEN_RELATIVE_TOLERANCE = 5e-5


@pytest.mark.pinned
@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_fixed_seed_losses_of_a_few_steps_stay_where_they_were_on_any_cpu(trained_runs, method):
    history = json.loads((trained_runs[method] / "results.json").read_text())["log_history"]
    losses = {e["step"]: e["loss"] for e in history if "loss" in e and e["step"] <= 20}
    assert losses == pytest.approx(GOLDEN_LOSSES[method], rel=GOLDEN_RELATIVE_TOLERANCE, abs=0)
