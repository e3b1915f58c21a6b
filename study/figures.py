"""The PNG figures of the report: loss, cost, quality, trade-off and learning-forgetting views of several runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from analysis.update_shape import energy_kept  # noqa: E402
from pipeline.summary import BUSY_MARK, BUSY_NOTE, TIMED, busy, save_png  # noqa: E402
from study.statistics import Arm, rate_multiples  # noqa: E402

Run = dict[str, Any]
LOG_SCALE_RATIO = 20  # bars or axes whose values span more than this get a log scale
# (label, results.json key, factor to a 0-100 scale) of the generation scores drawn side by side.
SCORES = (
    ("BLEU x100", "bleu", 100),
    ("ROUGE-1 x100", "rouge1", 100),
    ("ROUGE-2 x100", "rouge2", 100),
    ("ROUGE-L x100", "rougeL", 100),
    ("METEOR x100", "meteor", 100),
    ("chrF", "chrf", 1),
    ("TER (lower is better)", "ter", 1),
)


def spans_orders(values: list[float]) -> bool:
    positive = [v for v in values if v and v > 0]
    return len(positive) > 1 and max(positive) / min(positive) > LOG_SCALE_RATIO


def colors(labels: list[str]) -> dict[str, Any]:
    palette = plt.get_cmap("tab10").colors
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def plot_study_loss(runs: list[Run], labels: list[str], path: Path) -> None:
    """Training (lines) and validation (dashed, dots) loss of every trained run against training tokens;
    an untrained run's validation loss as a dotted horizontal line."""
    fig, ax = plt.subplots(figsize=(8, 5))
    color = colors(labels)
    for run, label in zip(runs, labels, strict=True):
        history = run.get("log_history") or []
        if run["mode"] == "base":
            if run.get("val_loss") is not None:
                ax.axhline(run["val_loss"], color=color[label], linestyle=":", label=f"{label} validation (untrained)")
            continue
        for key, style, kind in (("loss", "-", "training"), ("eval_loss", "o--", "validation")):
            points = [
                (e["num_input_tokens_seen"], e[key]) for e in history if key in e and "num_input_tokens_seen" in e
            ]
            if points:
                ax.plot(*zip(*points, strict=True), style, color=color[label], label=f"{label} {kind}")
    ax.set(xlabel="training tokens", ylabel="cross-entropy loss (nats/token)", title="Loss against training tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    save_png(fig, path)


def bars(
    ax: plt.Axes,
    labels: list[str],
    values: list[float | None],
    title: str,
    fmt: Callable[[float], str],
    marks: list[str] | None = None,
) -> None:
    """One bar per run (a gap, marked n/a, where the run has no value), log-scaled when values span orders; each
    bar's value followed by its mark, if any (e.g. busy)."""
    color = colors(labels)
    marks = marks or [""] * len(labels)
    for i, (label, value, mark) in enumerate(zip(labels, values, marks, strict=True)):
        if value is None or value <= 0:
            ax.text(i, 0.02, "n/a", transform=ax.get_xaxis_transform(), ha="center", fontsize=8, color="grey")
            continue
        ax.bar(i, value, color=color[label])
        ax.text(i, value, fmt(value) + mark, ha="center", va="bottom", fontsize=8)
    if spans_orders(values):
        ax.set_yscale("log")
        title += " (log scale)"
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def plot_cost(runs: list[Run], labels: list[str], memory_key: str, path: Path) -> None:
    """A panel per cost, a bar per run; a time figure measured on a busy machine is marked (busy)."""
    panels = (
        ("Training time (s)", "train_time_s", "{:,.1f}"),
        ("Generation time (s)", "generation_time_s", "{:,.1f}"),
        ("Generated tokens/s", "generation_tokens_per_s", "{:,.1f}"),
        ("Peak GPU memory (MB)" if "gpu" in memory_key else "Peak CPU memory (MB)", memory_key, "{:,.0f}"),
        ("Trainable parameters", "trainable_params", "{:,.0f}"),
        ("Saved weights (MB)", "model_size_mb", "{:,.2f}"),
    )
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (title, key, fmt) in zip(axes.flat, panels, strict=True):
        marks = [BUSY_MARK if key in TIMED and busy(run) else "" for run in runs]
        bars(ax, labels, [run.get(key) for run in runs], title, fmt.format, marks)
    fig.suptitle("Cost per arm" + (f"; {BUSY_NOTE}" if any(busy(run) for run in runs) else ""), fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def plot_quality(runs: list[Run], labels: list[str], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    bars(
        left,
        labels,
        [run.get("test_perplexity") for run in runs],
        "Test perplexity (lower is better)",
        "{:,.1f}".format,
    )
    color = colors(labels)
    width = 0.8 / len(runs)
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        metrics = run.get("metrics") or {}
        for j, (_, key, factor) in enumerate(SCORES):
            x = j + i * width
            if metrics.get(key) is None:  # not computed (e.g. METEOR without its NLTK data): no bar, not a zero
                right.text(x, 0.02, "n/a", transform=right.get_xaxis_transform(), ha="center", fontsize=7, color="grey")
            else:
                right.bar(x, metrics[key] * factor, width, color=color[label], label=label if j == 0 else None)
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(SCORES))], [s[0] for s in SCORES], fontsize=8)
    right.set_title("Generation scores (0-1 metrics x100; TER may exceed 100)", fontsize=10)
    right.grid(axis="y", alpha=0.3)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def plot_tradeoff(runs: list[Run], labels: list[str], memory_key: str, path: Path) -> None:
    """Test perplexity against peak memory and against training time, one labelled point per trained run."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    color = colors(labels)
    memory_label = "peak GPU memory (MB)" if "gpu" in memory_key else "peak CPU memory (MB)"
    for ax, key, xlabel in ((axes[0], memory_key, memory_label), (axes[1], "train_time_s", "training time (s)")):
        points = [(run.get(key), run.get("test_perplexity"), label) for run, label in zip(runs, labels, strict=True)]
        for run, (x, y, label) in zip(runs, points, strict=True):
            if y is None:
                continue
            if run["mode"] == "base":  # untrained: no cost, its perplexity as a reference line
                ax.axhline(y, color=color[label], linestyle=":", label=f"{label} (untrained)")
                continue
            if x is None:  # measured on another kind of device than this axis shows
                continue
            ax.scatter(x, y, color=color[label], s=60, zorder=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
        if spans_orders([p[1] for p in points]):
            ax.set_yscale("log")
        if spans_orders([p[0] for p in points]):
            ax.set_xscale("log")
        ax.margins(0.12)  # room for the labels of the outermost points
        ax.set(xlabel=xlabel, ylabel="test perplexity (lower is better)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Quality against cost (lower left is better)")
    fig.tight_layout()
    save_png(fig, path)


def plot_learning_rates(arms: list[Arm], path: Path) -> None:
    """Final validation loss (mean over seeds, error bars one sample standard deviation) against learning rate on
    a log axis, a line per trained arm, each chosen rate a star, a rate added by widening in a square, a rate
    stopped early (halving) a hollow circle at its loss at the rung, and a rate that diverged an x on the lower
    edge; below, each LoRA-family arm's chosen rate as a multiple of full fine-tuning's."""
    trained = [a for a in arms if a.name != "base"]
    multiples = rate_multiples(arms)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7.5), gridspec_kw={"height_ratios": [3, 1.2]}, squeeze=True)
    color = colors([a.name for a in trained])
    for arm in trained:
        points = [r for r in arm.rates if r.val_loss is not None]
        if points:
            top.errorbar(
                [r.rate for r in points],
                [r.val_loss.mean for r in points],
                yerr=[r.val_loss.std or 0 for r in points],
                fmt="o-",
                capsize=3,
                color=color[arm.name],
                label=arm.name + (" (failed)" if arm.failed else ""),
            )
        if arm.chosen:
            top.scatter(arm.chosen.rate, arm.chosen.val_loss.mean, marker="*", s=260, color=color[arm.name], zorder=4)
        stopped = [r for r in arm.rates if r.stopped_at and r.rung_loss]
        if stopped:  # at the rung, a loss of fewer steps than the line's: drawn apart, hollow
            x, y = [r.rate for r in stopped], [r.rung_loss.mean for r in stopped]
            top.scatter(x, y, marker="o", s=50, facecolors="none", edgecolors=color[arm.name], zorder=3)
        added = [(r.rate, r.val_loss.mean) for r in points if r.added]
        added += [(r.rate, r.rung_loss.mean) for r in stopped if r.added]
        if added:
            x, y = zip(*added, strict=True)
            top.scatter(x, y, marker="s", s=110, facecolors="none", edgecolors=color[arm.name], zorder=3)
        bad = [r.rate for r in arm.rates if r.diverged]
        if bad:
            label = None if points else f"{arm.name} (every rate diverged)"
            top.scatter(bad, [0.02] * len(bad), marker="x", color=color[arm.name], transform=top.get_xaxis_transform())
            if label:
                top.plot([], [], "x", color=color[arm.name], label=label)
    base = next((a for a in arms if a.name == "base" and a.chosen), None)
    if base:
        top.axhline(base.chosen.val_loss.mean, color="grey", linestyle=":", label="base (untrained)")
    top.set_xscale("log")
    every_rate = [r.rate for a in trained for r in a.rates if r.rate]
    if every_rate:  # diverged rates, drawn against the axis rather than the data, must be in view too
        top.set_xlim(min(every_rate) / 1.6, max(every_rate) * 1.6)
    top.set(xlabel="learning rate (log scale)", ylabel="final validation loss (nats/token)")
    title = "Validation loss against learning rate (mean over seeds ± 1 SD; star: chosen; x: diverged"
    if any(r.added for a in trained for r in a.rates):
        title += "; square: added by widening"
    if any(r.stopped_at for a in trained for r in a.rates):
        title += ";\nhollow circle: stopped early, its loss at the rung"
    top.set_title(title + ")", fontsize=10)
    top.grid(alpha=0.3, which="both")
    if top.get_legend_handles_labels()[0]:
        top.legend(fontsize=8)
    if multiples:
        names = list(multiples)
        bottom.barh(range(len(names)), list(multiples.values()), height=0.5, color=[color[n] for n in names])
        for i, value in enumerate(multiples.values()):
            bottom.text(value, i, f" {value:.3g}x", va="center", fontsize=9)
        bottom.axvline(1, color="grey", linestyle=":")
        bottom.set_yticks(range(len(names)), names, fontsize=8)
        bottom.set_xscale("log")
        bottom.set_title("Chosen learning rate as a multiple of full fine-tuning's (log scale)", fontsize=10)
        bottom.margins(x=0.25)
        bottom.set_ylim(-0.75, len(names) - 0.25)
    else:
        bottom.axis("off")
        bottom.text(0.5, 0.5, "no full fine-tuning arm with a chosen rate to compare to", ha="center", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def plot_learning_forgetting(runs: list[Run], labels: list[str], path: Path) -> None:
    """Validation loss (learning) against forgetting loss, as Biderman et al. 2024 plot learning against forgetting:
    the base model as a star, each trained run as a line through its validations from the base (where it started)
    to its end, labelled there."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    color = colors(labels)
    base = next((r for r in runs if r["mode"] == "base" and r.get("forgetting_loss") is not None), None)
    origin = [(base["forgetting_loss"], base["val_loss"])] if base else []
    for run, label in zip(runs, labels, strict=True):
        if run.get("forgetting_loss") is None:
            continue
        if run["mode"] == "base":
            ax.scatter(*origin[0], marker="*", s=220, color=color[label], zorder=4, label=f"{label} (untrained)")
            continue
        history = run.get("log_history") or []
        path_points = origin + [(e["forgetting_loss"], e["eval_loss"]) for e in history if "forgetting_loss" in e]
        ax.plot(*zip(*path_points, strict=True), "o-", color=color[label], markersize=4, label=label)
        ax.annotate(label, path_points[-1], textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.margins(0.12)  # room for the labels of the outermost points
    finish(
        fig,
        ax,
        path,
        xlabel="forgetting loss: general English, not WikiText (nats/token; right = more forgotten)",
        ylabel="validation loss: WikiText (nats/token; down = more learned)",
        title="Learning against forgetting, each run from the base model to its end",
    )


def finish(fig: plt.Figure, ax: plt.Axes, path: Path, **labels: str) -> None:
    """Label a one-panel figure's axes, add its grid and legend, and save it."""
    ax.set(**labels)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def plot_update_spectrum(runs: list[Run], labels: list[str], ranks: list[int], path: Path) -> bool:
    """Cumulative energy of full fine-tuning's weight update against rank, a line per module type (the mean over its
    matrices), the LoRA ranks beside it as vertical lines; False (nothing drawn) without an analysed full run."""
    full = [(run, label) for run, label in zip(runs, labels, strict=True) if run["mode"] == "full"]
    full = [(run["update_shape"], label) for run, label in full if run.get("update_shape")]
    if not full:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", ":", "-."]
    palette = plt.get_cmap("tab10").colors
    for i, (shape, label) in enumerate(full):
        kinds: dict[str, list[list[float]]] = {}
        for matrix in shape["matrices"].values():
            kinds.setdefault(matrix["type"], []).append([k or 0.0 for k in energy_kept(matrix["singular_values"])])
        for j, (kind, curves) in enumerate(kinds.items()):
            mean = [sum(c[r] for c in curves) / len(curves) for r in range(min(map(len, curves)))]
            name = f"{kind} ({len(curves)} matrices)" + (f", {label}" if len(full) > 1 else "")
            ax.plot(range(1, len(mean) + 1), mean, styles[i % len(styles)], color=palette[j % len(palette)], label=name)
    for rank in ranks:
        ax.axvline(rank, color="grey", linewidth=0.8)
        ax.text(rank, 0.02, f" LoRA r={rank}", rotation=90, fontsize=8, color="grey", va="bottom")
    ax.axhline(full[0][0]["energy_share"], color="black", linewidth=0.6, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 2, 4, ... rather than powers of 2
    ax.set_ylim(0, 1.02)
    finish(
        fig,
        ax,
        path,
        xlabel="rank r",
        ylabel="share of the update's energy in its top r directions",
        title="Full fine-tuning's weight update: energy against rank",
    )
    return True
