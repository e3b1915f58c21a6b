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
    ("Evaluation time (s)", "eval_time_s"),
    ("Checkpoint time (s)", "checkpoint_time_s"),
    ("Peak GPU memory (MB)", "peak_gpu_memory_mb"),
    ("Peak CPU memory (MB)", "peak_cpu_memory_mb"),
    ("Best training loss", "best_train_loss"),
    ("Best validation loss", "best_val_loss"),
    ("Validation perplexity", "val_perplexity"),
    ("Test perplexity", "test_perplexity"),
    ("Training tokens/s", "train_tokens_per_s"),
    ("BLEU", "metrics.bleu"),
    ("SacreBLEU", "metrics.sacrebleu"),
    ("ROUGE-1", "metrics.rouge1"),
    ("ROUGE-2", "metrics.rouge2"),
    ("ROUGE-L", "metrics.rougeL"),
    ("TER", "metrics.ter"),
    ("chrF", "metrics.chrf"),
    ("METEOR", "metrics.meteor"),
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


def print_run_summary(results: dict[str, Any], file: TextIO = sys.stdout) -> None:
    rows = [(label, format_value(lookup(results, key))) for label, key in TABLE_ROWS]
    print(f"\n{results['mode']} run: {results['run_dir']}", file=file)
    print(tabulate(rows, tablefmt="simple"), file=file)
    reason = lookup(results, "metrics.meteor_unavailable_reason")
    if reason:
        print(f"METEOR not computed: {reason}", file=file)


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
