"""What a person reads: the loss-curve plot, a run's summary and the side-by-side comparison table."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from tabulate import tabulate

from utils import atomic_write_bytes, atomic_write_text

# (row label, results.json key): the single list of figures the summary and `compare` show.
TABLE_ROWS = (
    ("Model size (MB)", "model_size_mb"),
    ("Trainable parameters", "trainable_params"),
    ("Training time (s)", "train_time_s"),
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


def plot_loss_curves(log_history: list[dict], path: Path, title: str) -> None:
    """Training and validation loss against optimizer steps, as a PNG (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("loss", "training", "-"), ("eval_loss", "validation", "o-")):
        points = [(e["step"], e[key]) for e in log_history if key in e]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def print_run_summary(results: dict[str, Any], file: TextIO = sys.stdout) -> None:
    rows = [(label, format_value(lookup(results, key))) for label, key in TABLE_ROWS]
    print(f"\n{results['mode']} run: {results['run_dir']}", file=file)
    print(tabulate(rows, tablefmt="simple"), file=file)
    reason = lookup(results, "metrics.meteor_unavailable_reason")
    if reason:
        print(f"METEOR not computed: {reason}", file=file)


def read_runs(output_dir: Path) -> list[dict[str, Any]]:
    """Every readable results.json below `output_dir`; damaged ones are named on stderr and skipped."""
    runs = []
    for path in sorted(Path(output_dir).glob("*/results.json")):
        try:
            results = json.loads(path.read_text())
            if not isinstance(results, dict) or "mode" not in results:
                raise ValueError("no 'mode' key")
        except (OSError, ValueError) as e:
            print(f"skipping {path}: not a complete results.json ({e})", file=sys.stderr)
            continue
        results["run_dir"] = str(path.parent)  # where the run is now, even if it was moved
        runs.append(results)
    return runs


def latest_per_mode(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for run in sorted(runs, key=lambda r: str(r.get("finished_at", ""))):
        latest[run["mode"]] = run
    order = {"base": 0, "full": 1, "lora": 2}
    return sorted(latest.values(), key=lambda r: order.get(r["mode"], 3))


def comparison_table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["Metric"] + [f"{r['mode']} ({Path(r['run_dir']).name})" for r in runs]
    rows = [[label] + [format_value(lookup(r, key)) for r in runs] for label, key in TABLE_ROWS]
    return headers, rows


def compare(output_dir: Path, include_all: bool) -> str:
    """Print the runs side by side, and write the table as comparison.md and comparison.csv."""
    runs = [r for r in read_runs(output_dir) if r.get("status") == "finished"]
    if not include_all:
        runs = latest_per_mode(runs)
    if not runs:
        return f"no finished runs under {output_dir}"
    headers, rows = comparison_table(runs)
    markdown = tabulate(rows, headers=headers, tablefmt="github")
    atomic_write_text(Path(output_dir) / "comparison.md", markdown + "\n")
    buffer = io.StringIO()
    csv.writer(buffer).writerows([headers, *rows])
    atomic_write_text(Path(output_dir) / "comparison.csv", buffer.getvalue())
    return markdown
