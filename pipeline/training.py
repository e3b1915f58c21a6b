"""The fine-tuning flow both recipes share: data, Trainer, measurements, evaluation, saved artifacts."""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments, default_data_collator

from pipeline import hub
from pipeline.adapters import adapter_config
from pipeline.compilation import compile_chosen, use_cache_under
from pipeline.data import PackedBlocks, load_text_splits, prepare_lm_splits, prompt_reference_pairs
from pipeline.forgetting import Forgetting, forgetting_blocks
from pipeline.generation import evaluate_generation
from pipeline.measurement import MachineLoad, PeakMemoryTracker, best, max_over_processes, perplexity
from pipeline.modeling import count_parameters
from pipeline.run_control import CheckedTrainer, StopAtShare, StopOnSignal
from pipeline.run_directory import (
    RunDirectory,
    mark_failed,
    open_run,
    same_model,
    write_checkpoint_figures,
    write_results,
)
from pipeline.settings import TRAINING, RunSettings
from pipeline.summary import method_name, plot_loss_curves, print_run_summary
from utils import (
    CONCURRENT_RUNS_VARIABLE,
    MIB,
    RunInterrupted,
    ToolError,
    environment_info,
    make_durable,
    timestamp,
)

PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_runnable(settings: RunSettings) -> None:
    """What this machine and launch cannot run as asked, as a ToolError before anything is claimed or prepared."""
    resolve_precision(settings.precision)
    processes = int(os.environ.get("WORLD_SIZE", "1")) * max(1, torch.cuda.device_count())
    if settings.eval_stride and settings.eval_stride < settings.block_size and processes > 1:
        # The Trainer rescales each process's evaluation loss by tokens counted over all of them, and pads the last
        # batch with repeated windows: exact for equal blocks, not for windows that score different counts.
        raise ToolError("--eval_stride below --block_size is exact on one process and one GPU only; run it so")


def resolve_precision(choice: str) -> str:
    """--precision for this machine (see choose_precision)."""
    cuda = torch.cuda.is_available()
    # Native only: by default torch also counts bf16 that pre-Ampere GPUs (T4, V100) emulate, at emulated speed.
    return choose_precision(choice, cuda, cuda and torch.cuda.is_bf16_supported(including_emulation=False))


def choose_precision(choice: str, cuda_available: bool, bf16_native: bool) -> str:
    """auto: bf16 on GPUs that run it natively, else fp16 on CUDA, else fp32; an explicit choice as given."""
    if choice == "auto":
        return ("bf16" if bf16_native else "fp16") if cuda_available else "fp32"
    if choice == "fp16" and not cuda_available:
        raise ToolError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")
    return choice


def process_state() -> PartialState:
    """This process's place among the launched ones (torchrun, accelerate launch; alone otherwise)."""
    # accelerate only forms a multi-process CPU group (gloo) when told the run is CPU-only.
    return PartialState(cpu=cpu_only())


def cpu_only() -> bool:
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def claim_run(settings: RunSettings, mode: str) -> RunDirectory:
    """Open the run (a new directory or an unfinished one to continue) on the main process; the others learn
    its directory, checkpoint and figures from it, and every process raises the same error if it fails."""
    state = process_state()
    run, shared = None, [None]
    if state.is_main_process:
        try:
            run = open_run(Path(settings.output_dir), settings.run_name, settings.resume, mode)
            shared = [(run.path, run.checkpoint, run.figures)]
        except ToolError as e:
            shared = [str(e)]
    if state.num_processes > 1:
        broadcast_object_list(shared)
    if isinstance(shared[0], str):
        raise ToolError(shared[0])
    return run or RunDirectory(*shared[0])


def save_model(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, target: Path) -> float | None:
    """Save the model (or adapter) with its tokenizer, appearing at `target` whole or not at all; an earlier
    save there (a run killed before it finished) is replaced.

    Every process takes part (sharded models are gathered); the main one writes and returns the weights' MiB.
    """
    staging = target.with_name(f".{target.name}.partial")
    replaced = target.with_name(f".{target.name}.replaced")
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if not main:
        return None
    tokenizer.save_pretrained(str(staging))
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle of our flags; results.json has them
    make_durable(staging)
    shutil.rmtree(replaced, ignore_errors=True)
    if target.exists():
        target.rename(replaced)
    staging.rename(target)
    make_durable(target.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    return sum(f.stat().st_size for f in target.glob("*.safetensors")) / MIB


def training_arguments(settings: RunSettings, run_dir: Path, **training: Any) -> TrainingArguments:
    """The Trainer's arguments for this run: evaluation and precision as every run shares them, plus `training`."""
    precision = resolve_precision(settings.precision)
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_eval_batch_size=settings.batch_size,
        seed=settings.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=cpu_only(),
        report_to=settings.report_to or "none",  # evaluate has no tracker flag
        run_name=settings.run_name,
        logging_nan_inf_filter=False,  # a non-finite loss must show, not be dropped from a mean
        **training,
    )


def build_trainer(
    settings: RunSettings, model: PreTrainedModel, data: dict[str, PackedBlocks], run_dir: Path
) -> CheckedTrainer:
    training_args = training_arguments(
        settings,
        run_dir,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=settings.warmup_steps,
        eval_strategy="steps" if settings.eval_steps else "epoch",
        eval_steps=settings.eval_steps,
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_steps else "epoch",
        save_steps=settings.save_steps,
        save_total_limit=None,  # CheckedTrainer rotates, once a new checkpoint is marked complete
        activation_checkpointing=settings.activation_checkpointing,
        # Non-reentrant: gradients reach LoRA's adapters even though the frozen layers' inputs need none.
        activation_checkpointing_kwargs={"use_reentrant": False},
        fsdp=settings.fsdp or None,
        fsdp_config=settings.fsdp_config,
        deepspeed=settings.deepspeed,
        include_num_input_tokens_seen="all",  # packed blocks hold no padding: all are real tokens
    )
    compiled = compile_chosen(settings.compile, model, planned_steps(training_args, len(data["train"])))
    if compiled:
        use_cache_under(settings.cache_dir)
    return CheckedTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=default_data_collator,
        checkpoints_kept=settings.save_total_limit,
        compiled=compiled,
    )


def planned_steps(training_args: TrainingArguments, blocks: int) -> int:
    """Optimizer steps the run will take: --max_steps, else the epochs over `blocks` training blocks."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    per_step = training_args.train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
    return math.ceil(math.ceil(blocks / per_step) * training_args.num_train_epochs)


def final_validation(trainer: Trainer, validation: PackedBlocks) -> dict[str, float]:
    """The validation of the model as it is now (eval_loss, and forgetting_loss when measured); the Trainer's own
    end-of-training evaluation when it ran one."""
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if trainer.state.global_step > 0 and evals and evals[-1]["step"] == trainer.state.global_step:
        return evals[-1]
    return trainer.evaluate(validation)


def evaluation_trainer(settings: RunSettings, model: PreTrainedModel, run_dir: Path) -> CheckedTrainer:
    """A Trainer that only evaluates, for models this tool did not train: at the precision training runs use."""
    return CheckedTrainer(model=model, args=training_arguments(settings, run_dir), data_collator=default_data_collator)


def load_packed_splits(settings: RunSettings, tokenizer: PreTrainedTokenizerBase) -> tuple[dict, dict, Forgetting]:
    """The text splits, each packed into blocks (from the cache when it has them), and the forgetting blocks."""
    splits = load_text_splits(settings.dataset, settings.dataset_config, settings.data_dir)
    data = prepare_lm_splits(
        splits,
        tokenizer,
        settings.block_size,
        settings.data_fraction,
        settings.seed,
        settings.eval_seed,
        settings.cache_dir,
        settings.eval_stride,
    )
    forgetting = forgetting_blocks(settings, tokenizer)
    if forgetting.unavailable_reason and process_state().is_main_process:
        print(f"note: forgetting not measured: {forgetting.unavailable_reason}", file=sys.stderr)
    return splits, data, forgetting


def run_record(
    settings: RunSettings,
    mode: str,
    run: RunDirectory,
    model: PreTrainedModel,
    trainer: Trainer,
    checkpoint_dtype: str,
    forgetting: Forgetting,
    revision: str | None = None,
) -> dict[str, Any]:
    """The fields of results.json every run has, before anything is measured; `revision`: the Hub commit the model
    was loaded at, when the run chose one."""
    trainable, total = count_parameters(model)
    config, paths_as_typed = settings.recorded_config()
    adapter = adapter_config(model)
    return {
        "status": "running",
        "mode": mode,
        "method": method_name(mode, config, adapter),
        "peft_type": adapter and adapter["peft_type"],
        "adapter_config": adapter,
        "model": config["model"],
        # what `analyze` reloads the starting weights from
        "model_revision": revision or model_revision(run, config["model"]),
        "run_dir": str(run.path),
        "started_at": run.started_at or timestamp(),
        "resumed_from": str(run.checkpoint) if run.checkpoint else None,
        "config": config,
        "paths_as_typed": paths_as_typed,
        "environment": environment_info(),
        "hub_unreachable_reason": hub.unreachable_reason,  # set when the run read the local cache instead
        "precision": resolve_precision(settings.precision),
        "checkpoint_dtype": checkpoint_dtype,  # the weights are trained (and evaluated) in float32 whatever it is
        "compiled": trainer.compiled,  # --compile as resolved (auto: compilation.compile_chosen)
        "world_size": trainer.args.world_size,
        "peak_memory_is_max_over_processes": trainer.args.world_size > 1,
        "gpus_per_process": trainer.args.n_gpu,
        # train_batch_size counts every GPU a single process drives (the Trainer's DataParallel); none untrained
        "global_batch_size": trainer.args.train_batch_size
        * trainer.args.gradient_accumulation_steps
        * trainer.args.world_size
        if mode in TRAINING
        else None,
        "trainable_params": trainable if mode != "base" else 0,
        "total_params": total,
        # `study --jobs N` runs up to N runs at once and says so here: their times are not a lone run's
        "concurrent_runs": int(os.environ.get(CONCURRENT_RUNS_VARIABLE, "1")),
        "forgetting_unavailable_reason": forgetting.unavailable_reason,
        "forgetting_eval_tokens": forgetting.blocks.blocks.size if forgetting.blocks else None,
    }


def model_revision(run: RunDirectory, model: str) -> str | None:
    """The Hub model's commit the run started from: on --resume the one its first session recorded for this model,
    which it loaded (run_directory.starting_revision), even if the Hub's default branch has moved since;
    hub.model_revision for a new run, or one that recorded none yet or another model."""
    if "model_revision" in run.earlier and same_model(run.earlier.get("model"), model):
        return run.earlier["model_revision"]
    return hub.model_revision(model)


def evaluate_and_save_results(
    settings: RunSettings,
    results: dict[str, Any],
    trainer: CheckedTrainer,
    tokenizer: PreTrainedTokenizerBase,
    splits: dict,
    data: dict[str, PackedBlocks],
    load: MachineLoad,
) -> dict[str, Any]:
    """Validation and test loss (every process), then on the main process alone: generation scores,
    results.json, the loss plot and the summary. `load` has sampled the machine since the run's work began."""
    run_dir = Path(results["run_dir"])
    validation = final_validation(trainer, data["validation"])
    val_loss, forgetting_loss = validation["eval_loss"], validation.get("forgetting_loss")
    test_loss = trainer.evaluate(data["test"], metric_key_prefix="test")["test_loss"]
    history = trainer.state.log_history
    results.update(
        eval_time_s=trainer.clock.seconds["eval_time_s"],
        best_train_loss=best(history, "loss"),
        best_val_loss=best(history, "eval_loss"),
        val_loss=val_loss,
        val_perplexity=perplexity(val_loss),
        test_loss=test_loss,
        test_perplexity=perplexity(test_loss),
        forgetting_loss=forgetting_loss,
        forgetting_perplexity=None if forgetting_loss is None else perplexity(forgetting_loss),
        metrics=None,
        generation_precision=None,
    )
    if not trainer.is_world_process_zero():
        return results
    pairs = prompt_reference_pairs(splits["test"], settings.eval_examples)
    if pairs:
        # Without the autocast wrapper accelerate put on the forward: it would hold for full and base but not for
        # the forward PEFT's generate calls, and in bf16 batched and one-at-a-time beams part ways. Every arm
        # generates with its weights as they are: float32 (load_causal_lm).
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        results["generation_precision"] = PRECISION_NAMES[model.dtype]
        results["metrics"], generation_figures = evaluate_generation(
            model,
            tokenizer,
            pairs,
            num_beams=settings.num_beams,
            batch_size=settings.eval_batch_size,
            tokens_per_word=settings.tokens_per_word,
            csv_path=run_dir / "generations.csv",
        )
        results.update(generation_figures)
    results.update(machine_load=load.summary(), status="finished", finished_at=timestamp(microseconds=True))
    results["log_history"] = history
    write_results(run_dir, results)
    plot_loss_curves(history, run_dir / "loss_curve.png", title=run_dir.name)
    print_run_summary(results, file=sys.stdout)
    return results


def figures_so_far(
    trainer: CheckedTrainer, memory: PeakMemoryTracker, load: MachineLoad, previous: dict[str, Any]
) -> dict[str, Any]:
    """What the run has measured up to now, over every session it ran (every process takes part)."""
    cpu, gpu = memory.peaks()
    peaks = {"peak_cpu_memory_mb": max_over_processes(cpu), "peak_gpu_memory_mb": max_over_processes(gpu)}
    for key, value in peaks.items():  # a resumed run's peak covers the sessions before it too
        peaks[key] = max((v for v in (value, previous.get(key)) if v is not None), default=None)
    tokens = int(trainer.state.num_input_tokens_seen)  # every process's tokens, restored on resume
    clock = trainer.clock
    return {
        **clock.seconds,
        **peaks,
        "optimizer_steps": trainer.state.global_step,
        "total_steps": trainer.state.max_steps,  # the whole run's, which its schedule spans
        "train_tokens": tokens,
        "first_step_tokens": clock.first_step_tokens,
        "train_tokens_per_s": clock.tokens_per_s(tokens),
        "machine_load": load.summary(),
    }


def finetune(
    settings: RunSettings,
    mode: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    checkpoint_dtype: str,
) -> dict[str, Any]:
    """Train `model` (loaded from a checkpoint of `checkpoint_dtype`) on the packed splits, measure the run,
    evaluate it, save it; return results.json's content."""
    with claim_run(settings, mode) as run:
        try:
            return train_evaluate_save(settings, mode, model, tokenizer, checkpoint_dtype, run)
        except RunInterrupted:
            raise
        except Exception as e:
            if process_state().is_main_process:
                mark_failed(run.path, e)
            raise


def train_evaluate_save(
    settings: RunSettings,
    mode: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    checkpoint_dtype: str,
    run: RunDirectory,
) -> dict[str, Any]:
    """finetune() inside the run directory it holds."""
    state = process_state()
    settings.run_name = run.path.name
    with state.main_process_first():  # one process prepares the data; the others read its cache
        splits, data, forgetting = load_packed_splits(settings, tokenizer)
    trainer = build_trainer(settings, model, data, run.path)
    trainer.forgetting = forgetting.blocks
    trainer.clock.start_from(run.figures)
    stop = StopOnSignal()
    trainer.add_callback(stop)
    rung = StopAtShare(settings.stop_at_share) if settings.stop_at_share else None
    if rung:
        trainer.add_callback(rung)
    results = run_record(settings, mode, run, model, trainer, checkpoint_dtype, forgetting)
    main = trainer.is_world_process_zero()

    with MachineLoad(main, run.figures.get("machine_load")) as load:
        with PeakMemoryTracker() as memory, stop:

            def record_checkpoint(checkpoint: Path) -> None:
                figures = figures_so_far(trainer, memory, load, run.figures)
                if main:
                    write_checkpoint_figures(checkpoint, figures)  # last: it marks the checkpoint complete
                    results.update(figures, checkpoint=str(checkpoint), log_history=trainer.state.log_history)
                    write_results(run.path, results)

            trainer.checkpoint_saved = record_checkpoint
            if main:
                write_results(run.path, results | run.figures)
            try:
                trainer.train_from(run.checkpoint)
            except torch.OutOfMemoryError as e:
                raise ToolError(
                    f"out of GPU memory at --batch_size {settings.batch_size} (blocks of {settings.block_size} "
                    "tokens); use a smaller --batch_size with more --gradient_accumulation_steps, or a smaller "
                    "--block_size"
                ) from e
            results.update(figures_so_far(trainer, memory, load, run.figures))

        if stop.received:
            raise interrupted(trainer, results, stop.received, mode)
        if rung and rung.stopped(trainer.state):
            return stopped_early(trainer, results, rung)
        results["model_size_mb"] = save_model(trainer, tokenizer, run.path / ("model" if mode == "full" else "adapter"))
        return evaluate_and_save_results(settings, results, trainer, tokenizer, splits, data, load)


def stopped_early(trainer: Trainer, results: dict[str, Any], rung: StopAtShare) -> dict[str, Any]:
    """Record a run stopped at --stop_at_share's step: its validation there and the checkpoint to resume from. It
    has no final or test figures: it did not finish."""
    run_dir = Path(results["run_dir"])
    history = trainer.state.log_history
    validation = next(e for e in reversed(history) if "eval_loss" in e and e["step"] == rung.step)
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{rung.step}"
    if trainer.is_world_process_zero():
        results.update(
            status="stopped_early",
            stopped_early={
                "step": rung.step,
                "max_steps": trainer.state.max_steps,
                "share": rung.share,
                "val_loss": validation["eval_loss"],
                "forgetting_loss": validation.get("forgetting_loss"),
                "checkpoint": str(checkpoint),
            },
            best_train_loss=best(history, "loss"),
            best_val_loss=best(history, "eval_loss"),
            log_history=history,
        )
        write_results(run_dir, results)
        print(
            f"stopped early at step {rung.step} of {trainer.state.max_steps} (--stop_at_share {rung.share:g}), "
            f"validation loss {validation['eval_loss']:.4f}; continue it with --resume --run_name {run_dir.name}"
        )
    return results


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
        write_results(run_dir, results)
    return RunInterrupted(
        f"interrupted by {signal_name} at step {step}; checkpoint saved in {run_dir / 'checkpoints'}. "
        f"Resume with: python main.py {mode} --resume --run_name {run_dir.name} --output_dir {run_dir.parent} "
        "(and the same other flags)"
    )
