"""Perplexity as published: sliding windows (--eval_stride), each token scored once with its window's context."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import main as cli
from pipeline.data import PackedBlocks, pack_into_blocks, tokenize_rows
from pipeline.modeling import load_tokenizer
from study.report import comparable_sets

BLOCK, STRIDE = 32, 12


def evaluate(model_dir: Path, common_flags: list[str], out: Path, name: str, *flags: str) -> dict:
    argv = ["evaluate", *common_flags, "--model", str(model_dir), "--eval_examples", "0", "--output_dir", str(out)]
    assert cli.main([*argv, "--run_name", name, *flags]) == 0
    return json.loads((out / name / "results.json").read_text())


def token_by_token_loss(model: torch.nn.Module, stream: torch.Tensor, block: int, stride: int) -> float:
    """Mean negative log-likelihood of every token but the first, each predicted from the context the
    sliding-window protocol gives it: the window ending at the first end past it (ends at block, block + stride,
    ..., and the stream's end), which starts `block` tokens before that end. The model is causal, so a forward
    pass over a window gives every token in it the prediction from its own context there."""
    n = len(stream)
    total = 0.0
    with torch.no_grad():
        log_probs = functools.cache(lambda start: model(input_ids=stream[None, start : start + block]).logits[0])
        for t in range(1, n):
            end = block if t < block else min(block + math.ceil((t + 1 - block) / stride) * stride, n)
            start = end - block
            total -= log_probs(start)[t - start - 1].double().log_softmax(-1)[stream[t]].item()
    return total / (n - 1)


def test_strided_perplexity_equals_a_token_by_token_computation(trained_runs, common_flags, tmp_path):
    model_dir = trained_runs["full"] / "model"
    results = evaluate(model_dir, common_flags, tmp_path, "strided", "--eval_stride", str(STRIDE))
    assert results["config"]["eval_stride"] == STRIDE
    tokenizer = load_tokenizer(str(model_dir))
    rows = (Path(results["config"]["data_dir"]) / "test.txt").read_text().splitlines(keepends=True)
    stream = torch.from_numpy(pack_into_blocks(tokenize_rows(rows, tokenizer), BLOCK).reshape(-1)).long()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected = token_by_token_loss(model, stream, BLOCK, STRIDE)
    assert math.isclose(results["test_loss"], expected, rel_tol=1e-5)
    assert math.isclose(results["test_perplexity"], math.exp(expected), rel_tol=1e-5)


def test_stride_equal_to_the_block_size_gives_the_blocks_figure_exactly(trained_runs, common_flags, tmp_path):
    recorded = json.loads((trained_runs["full"] / "results.json").read_text())
    results = evaluate(trained_runs["full"] / "model", common_flags, tmp_path, "blocks", "--eval_stride", str(BLOCK))
    assert results["test_loss"] == recorded["test_loss"]
    assert results["val_loss"] == recorded["val_loss"]


def test_windows_score_every_token_but_the_first_once():
    stream = torch.arange(100).numpy()
    blocks = pack_into_blocks(stream, 32)  # 3 blocks: tokens 0..95
    for stride in (1, 7, 31):
        windows = PackedBlocks(blocks, stride=stride)
        scored = [int(w["input_ids"][i]) for w in windows for i in range(1, 32) if w["labels"][i] != -100]
        assert sorted(scored) == list(range(1, 96))
        assert sum(windows.scored) == 95
    blocks_as_windows, plain = PackedBlocks(blocks, stride=32), PackedBlocks(blocks)
    assert len(blocks_as_windows) == len(plain) == 3
    for a, b in zip(blocks_as_windows, plain, strict=True):  # each block's first token has no context in it
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels"))
        assert (b["labels"][1:] == b["input_ids"][1:]).all() and b["labels"][0] == -100


def test_runs_share_a_table_only_with_the_same_stride(tmp_path):
    """Unset (or a run recorded before the flag) means the blocks, as --eval_stride equal to the block size does."""

    def run(name: str, *flags: str, drop_stride: bool = False) -> dict:
        config = vars(cli.build_parser().parse_args(["evaluate", "--block_size", "32", *flags]))
        if drop_stride:
            del config["eval_stride"]
        return {"mode": "base", "config": config, "precision": "fp32", "environment": {"device": "cpu"},
                "run_dir": str(tmp_path / name), "finished_at": name}  # fmt: skip

    runs = [run("a"), run("b", "--eval_stride", "32"), run("c", drop_stride=True), run("d", "--eval_stride", "8")]
    sets = comparable_sets(runs)
    # a, b and c are one setting: one set, showing the latest of them; d stands apart
    assert [[Path(r["run_dir"]).name for r in s] for s in sets] == [["c"], ["d"]]
