"""Evaluation recipe: score a model this run does not train (GPT-2 from the Hub, a saved run, base + adapter)."""

from __future__ import annotations

import argparse
from typing import Any

from peft import PeftModel

from modeling import load_causal_lm, load_tokenizer
from training import (
    evaluate_and_save_results,
    evaluation_trainer,
    load_packed_splits,
    open_run_dir,
    run_record,
    shared_run_name,
)
from utils import ToolError, one_line


def run(args: argparse.Namespace) -> dict[str, Any]:
    mode = "adapter" if args.adapter else "base"
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    if args.adapter:
        try:
            model = PeftModel.from_pretrained(model, args.adapter)
        except Exception as e:  # peft raises ValueError/OSError/HF errors for a missing or foreign adapter
            raise ToolError(f"could not load LoRA adapter '{args.adapter}' ({one_line(e)})") from e
    args.run_name = shared_run_name(args, mode)
    run_dir, _, _ = open_run_dir(args, mode)
    splits, data = load_packed_splits(args, tokenizer)
    results = run_record(args, mode, run_dir, model)
    return evaluate_and_save_results(args, results, evaluation_trainer(args, model, run_dir), tokenizer, splits, data)
