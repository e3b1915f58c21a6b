"""The fine-tuning flow both recipes share: data, Trainer, measurements, evaluation, saved artifacts."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments, default_data_collator

from data import PackedBlocks, load_text_splits, prepare_lm_splits, prompt_reference_pairs
from generation import evaluate_generation
from modeling import count_parameters
from report import plot_loss_curves, print_run_summary
from utils import MIB, ToolError, atomic_write_json, environment_info, timestamp


class PeakMemoryTracker:
    """Peak resident memory of this process, and peak CUDA memory torch allocated, inside a `with` block."""

    def __enter__(self) -> PeakMemoryTracker:
        self.peak_cpu_mb: float | None = None
        self.peak_gpu_mb: float | None = None
        self._sampler = None
        try:  # Linux: reset the kernel's high-water mark, then read it at the end (exact, no sampling)
            Path("/proc/self/clear_refs").write_text("5")
            self._exact = True
        except OSError:
            self._exact = False
            self._sampled_peak = psutil.Process().memory_info().rss
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.02):
            self._sampled_peak = max(self._sampled_peak, process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self._exact:
            status = Path("/proc/self/status").read_text()
            kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
            self.peak_cpu_mb = kib * 1024 / MIB
        else:
            self._stop.set()
            self._sampler.join()
            self.peak_cpu_mb = self._sampled_peak / MIB
        if torch.cuda.is_available():
            self.peak_gpu_mb = torch.cuda.max_memory_allocated() / MIB


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def resolve_precision(choice: str) -> str:
    """auto: bf16 on GPUs that support it, else fp16 on CUDA, else fp32."""
    cuda = torch.cuda.is_available()
    if choice == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if choice == "fp16" and not cuda:
        raise ToolError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")
    return choice


def new_run_dir(output_dir: str, run_name: str) -> Path:
    """A fresh directory for the run; one that already holds a run is never reused."""
    run_dir = Path(output_dir) / run_name
    if (run_dir / "results.json").exists():
        raise ToolError(f"{run_dir} already holds a run; choose another --run_name or move it away")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_model(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, target: Path) -> float:
    """Save the model (or adapter) with its tokenizer, appearing at `target` whole or not at all.

    Returns the size of the saved weights in MiB.
    """
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    tokenizer.save_pretrained(str(staging))
    if trainer.is_world_process_zero():
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle of our flags; results.json has them
        staging.rename(target)
    return sum(f.stat().st_size for f in target.glob("*.safetensors")) / MIB


def build_trainer(args: argparse.Namespace, model: PreTrainedModel, data: dict[str, PackedBlocks], run_dir: Path):
    precision = resolve_precision(args.precision)
    training_args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        eval_strategy="steps" if args.eval_steps else "epoch",
        eval_steps=args.eval_steps,
        logging_steps=args.logging_steps,
        save_strategy="no",
        seed=args.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        include_num_input_tokens_seen="all",  # packed blocks hold no padding: all are real tokens
        report_to="none",
    )
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=default_data_collator,
    )


def final_validation_loss(trainer: Trainer, validation: PackedBlocks) -> float:
    """Validation loss of the model as it is now; the Trainer's own end-of-training evaluation when it ran one."""
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if trainer.state.global_step > 0 and evals and evals[-1]["step"] == trainer.state.global_step:
        return evals[-1]["eval_loss"]
    return trainer.evaluate(validation)["eval_loss"]


def best(log_history: list[dict], key: str) -> float | None:
    values = [entry[key] for entry in log_history if key in entry]
    return min(values) if values else None


def evaluation_trainer(args: argparse.Namespace, model: PreTrainedModel, run_dir: Path) -> Trainer:
    """A Trainer that only evaluates, for models this tool did not train."""
    precision = resolve_precision(args.precision)
    training_args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_eval_batch_size=args.batch_size,
        bf16_full_eval=precision == "bf16",
        fp16_full_eval=precision == "fp16",
        report_to="none",
    )
    return Trainer(model=model, args=training_args, data_collator=default_data_collator)


def run_record(args: argparse.Namespace, mode: str, run_dir: Path, model: PreTrainedModel) -> dict[str, Any]:
    """The fields of results.json every run has, before anything is measured."""
    trainable, total = count_parameters(model)
    return {
        "status": "running",
        "mode": mode,
        "model": args.model,
        "run_dir": str(run_dir),
        "started_at": timestamp(),
        "config": vars(args),
        "environment": environment_info(),
        "precision": resolve_precision(args.precision),
        "trainable_params": trainable if mode != "base" else 0,
        "total_params": total,
    }


def evaluate_and_save_results(
    args: argparse.Namespace,
    results: dict[str, Any],
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    splits: dict,
    data: dict[str, PackedBlocks],
) -> dict[str, Any]:
    """Validation and test loss, generation scores; then results.json, the loss plot and the summary."""
    run_dir = Path(results["run_dir"])
    val_loss = final_validation_loss(trainer, data["validation"])
    test_loss = trainer.evaluate(data["test"], metric_key_prefix="test")["test_loss"]
    history = trainer.state.log_history
    results.update(
        best_train_loss=best(history, "loss"),
        best_val_loss=best(history, "eval_loss"),
        val_loss=val_loss,
        val_perplexity=perplexity(val_loss),
        test_loss=test_loss,
        test_perplexity=perplexity(test_loss),
        metrics=None,
    )
    if args.eval_examples:
        pairs = prompt_reference_pairs(splits["test"], args.eval_examples)
        results["metrics"] = evaluate_generation(
            trainer.model,
            tokenizer,
            pairs,
            num_beams=args.num_beams,
            batch_size=args.eval_batch_size,
            tokens_per_word=args.tokens_per_word,
            csv_path=run_dir / "generations.csv",
        )
    results.update(status="finished", finished_at=timestamp(), log_history=history)
    atomic_write_json(run_dir / "results.json", results)
    plot_loss_curves(history, run_dir / "loss_curve.png", title=run_dir.name)
    print_run_summary(results, file=sys.stdout)
    return results


def finetune(
    args: argparse.Namespace, mode: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> dict[str, Any]:
    """Train `model` on the packed splits, measure the run, evaluate it, save it; return results.json's content."""
    run_dir = new_run_dir(args.output_dir, args.run_name or f"{mode}-{timestamp()}")
    splits = load_text_splits(args.dataset, args.dataset_config, args.data_dir)
    data = prepare_lm_splits(splits, tokenizer, args.block_size, args.data_fraction, args.seed, args.cache_dir)
    trainer = build_trainer(args, model, data, run_dir)
    results = run_record(args, mode, run_dir, model)

    with PeakMemoryTracker() as memory:
        start = time.perf_counter()
        trainer.train()
        train_time = time.perf_counter() - start

    train_tokens = int(trainer.state.num_input_tokens_seen)
    results.update(
        model_size_mb=save_model(trainer, tokenizer, run_dir / ("adapter" if mode == "lora" else "model")),
        train_time_s=train_time,
        peak_gpu_memory_mb=memory.peak_gpu_mb,
        peak_cpu_memory_mb=memory.peak_cpu_mb,
        train_tokens=train_tokens,
        train_tokens_per_s=train_tokens / train_time,
        optimizer_steps=trainer.state.global_step,
    )
    return evaluate_and_save_results(args, results, trainer, tokenizer, splits, data)
