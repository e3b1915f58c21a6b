"""What a person reads about one run: the figures its summary shows (the single list `compare` shows too), the
printed summary, and its loss-curve PNG. No torch: the study side reads these too."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, TextIO

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from tabulate import tabulate  # noqa: E402

from utils import atomic_write_bytes  # noqa: E402

# (row label, results.json key): the single list of figures the summary and `compare` show.
TABLE_ROWS = (
    ("Model size (MB)", "model_size_mb"),
    ("Trainable parameters", "trainable_params"),
    ("Training time (s)", "train_time_s"),
    ("First-step time (s)", "first_step_s"),
    ("Generation time (s)", "generation_time_s"),
    ("Evaluation time (s)", "eval_time_s"),
    ("Checkpoint time (s)", "checkpoint_time_s"),
    ("Peak GPU memory (MB)", "peak_gpu_memory_mb"),
    ("Peak CPU memory (MB)", "peak_cpu_memory_mb"),
    ("Best training loss", "best_train_loss"),
    ("Best validation loss", "best_val_loss"),
    ("Validation perplexity", "val_perplexity"),
    ("Test perplexity", "test_perplexity"),
    ("Forgetting loss", "forgetting_loss"),
    ("Forgetting perplexity", "forgetting_perplexity"),
    ("Forgetting loss change vs base", "forgetting_loss_change"),
    ("Training tokens/s", "train_tokens_per_s"),
    ("Generated tokens/s", "generation_tokens_per_s"),
    ("Other processes' CPU use (cores)", "machine_load.other_cpu_cores_mean"),
    ("BLEU", "metrics.bleu"),
    ("SacreBLEU", "metrics.sacrebleu"),
    ("ROUGE-1", "metrics.rouge1"),
    ("ROUGE-2", "metrics.rouge2"),
    ("ROUGE-L", "metrics.rougeL"),
    ("TER", "metrics.ter"),
    ("chrF", "metrics.chrf"),
    ("METEOR", "metrics.meteor"),
)

# (what was not measured, the results.json key saying why): said below the table wherever a run has a reason.
UNAVAILABLE = (
    ("METEOR not computed", "metrics.meteor_unavailable_reason"),
    ("Forgetting not measured", "forgetting_unavailable_reason"),
)


# Figures earlier versions did not record: a table none of whose runs has one leaves its row out, so that tables of
# earlier runs stay as they were.
NOT_ALWAYS_RECORDED = (
    "first_step_s",
    "forgetting_loss",
    "forgetting_perplexity",
    "forgetting_loss_change",
    "generation_time_s",
    "generation_tokens_per_s",
    "machine_load.other_cpu_cores_mean",
)


def table_rows(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """TABLE_ROWS for a table of `runs`: those not always recorded only when a run has them."""
    return [
        (label, key)
        for label, key in TABLE_ROWS
        if key not in NOT_ALWAYS_RECORDED or any(lookup(r, key) is not None for r in runs)
    ]


# Figures of time, which other work on the machine slows: marked "(busy)" when the run's machine_load says busy.
TIMED = (
    "train_time_s",
    "first_step_s",
    "eval_time_s",
    "checkpoint_time_s",
    "generation_time_s",
    "train_tokens_per_s",
    "generation_tokens_per_s",
)
BUSY_MARK = " (busy)"
BUSY_NOTE = (
    f"{BUSY_MARK.strip()}: measured while other processes loaded the machine (machine_load.busy) or beside other runs "
    "of a study (concurrent_runs > 1); README, Definitions"
)


def lookup(results: dict[str, Any], dotted_key: str) -> Any:
    value: Any = results
    for part in dotted_key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def busy(results: dict[str, Any]) -> bool:
    """Other processes loaded the machine during the run, or it was one of several runs a study ran at once."""
    return bool(lookup(results, "machine_load.busy")) or (results.get("concurrent_runs") or 1) > 1


def figure_text(results: dict[str, Any], key: str) -> str:
    """A figure of the run as the tables show it, a time figure marked when the machine was busy."""
    value = lookup(results, key)
    return format_value(value) + (BUSY_MARK if key in TIMED and value is not None and busy(results) else "")


def print_run_summary(results: dict[str, Any], file: TextIO = sys.stdout) -> None:
    rows = [(label, figure_text(results, key)) for label, key in table_rows([results])]
    print(f"\n{results['mode']} run: {results['run_dir']}", file=file)
    print(tabulate(rows, tablefmt="simple"), file=file)
    if busy(results):
        print(BUSY_NOTE, file=file)
    for what, key in UNAVAILABLE:
        reason = lookup(results, key)
        if reason:
            print(f"{what}: {reason}", file=file)


# (adapter config key, how the label shows it): the settings that tell one adapter of a PEFT method from another.
KEY_SETTINGS = (("r", "r{}"), ("n_frequency", "n{}"), ("num_virtual_tokens", "{} tokens"))


def method_name(mode: str, config: dict[str, Any], adapter: dict[str, Any] | None = None) -> str:
    """full, base, ...; for LoRA runs its variant: lora, dora, rslora (dora+rslora with both flags); for a
    `peft` run its PEFT type and key settings (`adapter`, its config): ia3, vera r256, prompt_tuning 20 tokens."""
    if mode == "peft":
        adapter = adapter or {}
        name = str(adapter.get("peft_type", "peft")).lower()
        return " ".join([name] + [shown.format(adapter[k]) for k, shown in KEY_SETTINGS if adapter.get(k)])
    if mode != "lora":
        return mode
    return "+".join(v for v in ("dora", "rslora") if config.get(f"use_{v}")) or "lora"


def save_png(fig: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_loss_curves(log_history: list[dict], path: Path, title: str) -> None:
    """One run's training and validation loss against optimizer steps."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("loss", "training", "-"), ("eval_loss", "validation", "o-")):
        points = [(e["step"], e[key]) for e in log_history if key in e]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)
