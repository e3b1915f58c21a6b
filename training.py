"""The fine-tuning flow both recipes share: data, Trainer, measurements, evaluation, saved artifacts."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments, default_data_collator
from transformers.trainer_utils import get_last_checkpoint

from data import PackedBlocks, load_text_splits, prepare_lm_splits, prompt_reference_pairs
from generation import evaluate_generation
from measurement import PeakMemoryTracker, best, max_over_processes, perplexity
from modeling import count_parameters
from report import plot_loss_curves, print_run_summary, read_runs
from run_control import CheckedTrainer, RunInterrupted, StopOnSignal
from utils import MIB, ToolError, atomic_write_json, environment_info, timestamp


def resolve_precision(choice: str) -> str:
    """auto: bf16 on GPUs that support it, else fp16 on CUDA, else fp32."""
    cuda = torch.cuda.is_available()
    if choice == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if choice == "fp16" and not cuda:
        raise ToolError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")
    return choice


def process_state() -> PartialState:
    """This process's place among the launched ones (torchrun, accelerate launch; alone otherwise)."""
    # accelerate only forms a multi-process CPU group (gloo) when told the run is CPU-only.
    return PartialState(cpu=cpu_only())


def cpu_only() -> bool:
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def open_run_dir(args: argparse.Namespace, mode: str) -> tuple[Path, str | None, dict[str, Any]]:
    """The run's directory, the checkpoint to resume from (None for a fresh run) and what the interrupted
    run recorded so far (empty for a fresh run).

    A fresh run never reuses a directory that holds results; a resumed run continues an unfinished one.
    """
    output_dir = Path(args.output_dir)
    resume = getattr(args, "resume", None)
    if resume is None:
        run_dir = output_dir / args.run_name
        if (run_dir / "results.json").exists():
            raise ToolError(f"{run_dir} already holds a run; choose another --run_name or move it away")
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, None, {}
    if resume == "latest":
        run_dir = output_dir / args.run_name if args.run_name else latest_interrupted_run(output_dir, mode)
        checkpoint = get_last_checkpoint(str(run_dir / "checkpoints")) if (run_dir / "checkpoints").is_dir() else None
    else:
        checkpoint = resume
        run_dir = Path(resume).resolve().parent.parent
    if not checkpoint or not (Path(checkpoint) / "trainer_state.json").is_file():
        raise ToolError(f"no checkpoint to resume from in {run_dir}")
    previous = read_results(run_dir)
    if previous.get("status") == "finished":
        raise ToolError(f"{run_dir} finished already; there is nothing to resume")
    return run_dir, str(checkpoint), previous


def read_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as e:
        raise ToolError(f"{path} is damaged ({e}); resume from a checkpoint path with --resume PATH") from e


def latest_interrupted_run(output_dir: Path, mode: str) -> Path:
    runs = [r for r in read_runs(output_dir) if r.get("status") == "interrupted" and r["mode"] == mode]
    if not runs:
        raise ToolError(f"no interrupted {mode} run under {output_dir} to resume; name one with --run_name")
    return max((Path(r["run_dir"]) for r in runs), key=lambda d: (d / "results.json").stat().st_mtime)


def save_model(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, target: Path) -> float | None:
    """Save the model (or adapter) with its tokenizer, appearing at `target` whole or not at all.

    Every process takes part (sharded models are gathered); the main one writes and returns the weights' MiB.
    """
    staging = target.with_name(f".{target.name}.partial")
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if not main:
        return None
    tokenizer.save_pretrained(str(staging))
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle of our flags; results.json has them
    staging.rename(target)
    return sum(f.stat().st_size for f in target.glob("*.safetensors")) / MIB


def training_arguments(args: argparse.Namespace, run_dir: Path, **training: Any) -> TrainingArguments:
    """The Trainer's arguments for this run: evaluation and precision as every run shares them, plus `training`."""
    precision = resolve_precision(args.precision)
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_eval_batch_size=args.batch_size,
        seed=args.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=cpu_only(),
        report_to="none",
        **training,
    )


def build_trainer(
    args: argparse.Namespace, model: PreTrainedModel, data: dict[str, PackedBlocks], run_dir: Path
) -> CheckedTrainer:
    training_args = training_arguments(
        args,
        run_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        eval_strategy="steps" if args.eval_steps else "epoch",
        eval_steps=args.eval_steps,
        logging_steps=args.logging_steps,
        logging_nan_inf_filter=False,
        save_strategy="steps" if args.save_steps else "epoch",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        torch_compile=args.compile,
        activation_checkpointing=args.activation_checkpointing,
        # Non-reentrant: gradients reach LoRA's adapters even though the frozen layers' inputs need none.
        activation_checkpointing_kwargs={"use_reentrant": False},
        fsdp=args.fsdp or None,
        fsdp_config=args.fsdp_config,
        deepspeed=args.deepspeed,
        include_num_input_tokens_seen="all",  # packed blocks hold no padding: all are real tokens
    )
    return CheckedTrainer(
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


def evaluation_trainer(args: argparse.Namespace, model: PreTrainedModel, run_dir: Path) -> Trainer:
    """A Trainer that only evaluates, for models this tool did not train: at the precision training runs use."""
    return Trainer(model=model, args=training_arguments(args, run_dir), data_collator=default_data_collator)


def load_packed_splits(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> tuple[dict, dict]:
    """The text splits, and each packed into blocks (from the cache when it has them)."""
    splits = load_text_splits(args.dataset, args.dataset_config, args.data_dir)
    data = prepare_lm_splits(splits, tokenizer, args.block_size, args.data_fraction, args.seed, args.cache_dir)
    return splits, data


def run_record(args: argparse.Namespace, mode: str, run_dir: Path, model: PreTrainedModel) -> dict[str, Any]:
    """The fields of results.json every run has, before anything is measured."""
    trainable, total = count_parameters(model)
    world_size = process_state().num_processes
    return {
        "status": "running",
        "mode": mode,
        "model": args.model,
        "run_dir": str(run_dir),
        "started_at": timestamp(),
        "config": vars(args),
        "environment": environment_info(),
        "precision": resolve_precision(args.precision),
        "world_size": world_size,
        "global_batch_size": args.batch_size * getattr(args, "gradient_accumulation_steps", 1) * world_size,
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
    """Validation and test loss (every process), then on the main process alone: generation scores,
    results.json, the loss plot and the summary."""
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
    if not trainer.is_world_process_zero():
        return results
    pairs = prompt_reference_pairs(splits["test"], args.eval_examples)
    if pairs:
        results["metrics"] = evaluate_generation(
            trainer.accelerator.unwrap_model(trainer.model),
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


def shared_run_name(args: argparse.Namespace, mode: str) -> str:
    """The run name, decided by the main process so that every process writes to the same place."""
    name = [args.run_name or f"{mode}-{timestamp()}"]
    if process_state().num_processes > 1:
        broadcast_object_list(name)
    return name[0]


def finetune(
    args: argparse.Namespace, mode: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> dict[str, Any]:
    """Train `model` on the packed splits, measure the run, evaluate it, save it; return results.json's content."""
    state = process_state()
    if args.resume is None:
        args.run_name = shared_run_name(args, mode)
    with state.main_process_first():  # one process prepares the data; the others read its cache
        run_dir, checkpoint, previous = open_run_dir(args, mode)
        args.run_name = run_dir.name
        splits, data = load_packed_splits(args, tokenizer)
    trainer = build_trainer(args, model, data, run_dir)
    stop = StopOnSignal()
    trainer.add_callback(stop)
    results = run_record(args, mode, run_dir, model) | {"resumed_from": checkpoint}

    with PeakMemoryTracker() as memory, stop:
        start = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=checkpoint)
        except torch.OutOfMemoryError as e:
            raise ToolError(
                f"out of GPU memory at --batch_size {args.batch_size} (blocks of {args.block_size} tokens); "
                "use a smaller --batch_size with more --gradient_accumulation_steps, or a smaller --block_size"
            ) from e
        train_time = time.perf_counter() - start + previous.get("train_time_s", 0.0)

    train_tokens = int(trainer.state.num_input_tokens_seen)  # every process's tokens, restored on resume
    results.update(
        train_time_s=train_time,
        peak_gpu_memory_mb=max_over_processes(memory.peak_gpu_mb),
        peak_cpu_memory_mb=max_over_processes(memory.peak_cpu_mb),
        peak_memory_is_max_over_processes=state.num_processes > 1,
        train_tokens=train_tokens,
        train_tokens_per_s=train_tokens / train_time,
        optimizer_steps=trainer.state.global_step,
    )
    for key in ("peak_gpu_memory_mb", "peak_cpu_memory_mb"):  # a resumed run's peak covers every session
        results[key] = max((v for v in (results[key], previous.get(key)) if v is not None), default=None)
    if stop.received:
        raise interrupted(trainer, results, stop.received, mode)
    results["model_size_mb"] = save_model(trainer, tokenizer, run_dir / ("adapter" if mode == "lora" else "model"))
    return evaluate_and_save_results(args, results, trainer, tokenizer, splits, data)


def interrupted(trainer: Trainer, results: dict[str, Any], signal_name: str, mode: str) -> RunInterrupted:
    """Record what was measured before the stop, and say how to go on."""
    run_dir = Path(results["run_dir"])
    step = trainer.state.global_step
    if trainer.is_world_process_zero():
        history = trainer.state.log_history
        results.update(
            status="interrupted",
            interrupted_at_step=step,
            checkpoint=str(run_dir / "checkpoints" / f"checkpoint-{step}"),
            best_train_loss=best(history, "loss"),
            best_val_loss=best(history, "eval_loss"),
            log_history=history,
        )
        atomic_write_json(run_dir / "results.json", results)
    return RunInterrupted(
        f"interrupted by {signal_name} at step {step}; checkpoint saved in {run_dir / 'checkpoints'}. "
        f"Resume with: python main.py {mode} --resume --run_name {run_dir.name} --output_dir {run_dir.parent} "
        "(and the same other flags)"
    )
