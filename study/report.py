"""What a person reads about many runs: `compare`'s comparable sets of runs side by side with the report."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from tabulate import tabulate

from pipeline.hub import canonical_id
from pipeline.settings import EVALUATE, SETTING_KINDS, TRAINING, is_local, names_of_kind
from pipeline.summary import TABLE_ROWS, format_value, lookup, method_name
from utils import atomic_write_json, atomic_write_text

Run = dict[str, Any]


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


# Runs share a table only when the experiment's settings match: those an untrained run has too (and the device),
# and those of training, which with the global batch say how long a run trained (`length`).
GROUPED = (*names_of_kind("experiment", EVALUATE), "device")
LENGTH = tuple(n for n in names_of_kind("experiment", TRAINING) if n not in GROUPED)
# What earlier versions ran without recording it: the Trainer's defaults then.
UNRECORDED_DEFAULTS = {"lr_scheduler_type": "linear", "warmup_steps": 0}
# What the run was measured on: time and memory compare only where these match, so a column that differs says so.
HARDWARE = ("gpu", "gpu_count", "cpu_threads", "torch", "transformers", "peft")
COLUMN_ORDER = ("base", "full", "lora", "rslora", "dora")
FIGURES = (("Loss curves", "loss_curves"), ("Cost", "cost"), ("Quality", "quality"), ("Trade-off", "tradeoff"))


def method(run: Run) -> str:
    return run.get("method") or method_name(run["mode"], run.get("config", {}), run.get("adapter_config"))


def label(run: Run) -> str:
    return f"{method(run)} ({Path(run['run_dir']).name})"


def canonical(key: str, value: Any) -> Any:
    """One spelling per setting: 2 and 2.0 alike, a path however it was typed, a Hub id however it was typed."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if key in ("model", "dataset", "data_dir", "adapter", "peft_config") and isinstance(value, str):
        return str(Path(value).resolve()) if is_local(value) else canonical_id(value)
    return value


# Adapter config keys that say where or how the adapter was loaded, not what it is.
NOT_ADAPTER_SETTINGS = ("base_model_name_or_path", "revision", "inference_mode", "peft_version")


def settings(run: Run) -> dict[str, Any]:
    """What the run is: every setting but bookkeeping (and the Hub dataset when --data_dir replaced it, the epochs
    when --max_steps did; a --peft_config file's content rather than its path), its method, the precision it ran
    at, on how many processes and GPUs, and on what."""
    config = run.get("config", {})
    if run["mode"] in TRAINING:
        config = UNRECORDED_DEFAULTS | config
    unused = ("dataset", "dataset_config") if config.get("data_dir") else ()
    unused += ("epochs",) if config.get("max_steps") else ()
    if config.get("peft_config"):
        adapter = run.get("adapter_config") or {}
        config = config | {"peft_config": {k: v for k, v in adapter.items() if k not in NOT_ADAPTER_SETTINGS}}
    environment = run.get("environment") or {}
    measured = {
        "method": method(run),
        "precision": run.get("precision"),
        "device": environment.get("device"),
        "world_size": run.get("world_size"),
        "global_batch_size": run.get("global_batch_size"),
        "gpus_per_process": run.get("gpus_per_process"),
    } | {key: environment.get(key) for key in HARDWARE}
    return {
        k: canonical(k, v)
        for k, v in config.items()
        if k not in unused and SETTING_KINDS.get(k, "swept") != "bookkeeping"
    } | {k: v for k, v in measured.items() if v is not None}


def length(run: Run) -> tuple | None:
    """How long a run trained (None for an untrained model; a model evaluated again stands on its own)."""
    config = run.get("config", {})
    if run["mode"] == "base":
        return None
    if "epochs" not in config:
        return ("evaluated", config.get("adapter") or config.get("model"))
    recorded = settings(run)
    return (*((k, recorded.get(k)) for k in LENGTH), "global batch", run.get("global_batch_size"))


def comparable_sets(runs: list[Run]) -> list[list[Run]]:
    """Finished runs in sets that may share a table, oldest set first; each set's base column is the untrained
    model with the same settings, and of runs with identical settings only the latest is kept."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = json.dumps([settings(run).get(k) for k in GROUPED], default=str)
        groups.setdefault((key, json.dumps(length(run))), []).append(run)
    bases = {key: members for (key, run_length), members in groups.items() if run_length == "null"}
    trained = [(key, members) for (key, run_length), members in groups.items() if run_length != "null"]
    sets = [bases.get(key, []) + members for key, members in trained]
    sets += [members for key, members in bases.items() if key not in {k for k, _ in trained}]
    return sorted((columns(s) for s in sets), key=lambda s: max(finished_at(r) for r in s))


def finished_at(run: Run) -> str:
    return str(run.get("finished_at", ""))


def columns(runs: list[Run]) -> list[Run]:
    latest = {json.dumps(settings(r), sort_keys=True, default=str): r for r in sorted(runs, key=finished_at)}
    order = {m: i for i, m in enumerate(COLUMN_ORDER)}
    return sorted(
        latest.values(),
        key=lambda r: (order.get(method(r), len(order)), r["config"].get("lora_rank", 0), Path(r["run_dir"]).name),
    )


def differences(runs: list[Run]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The settings every run that has them shares, and per differing setting each run's value (compared as
    recorded; paths shown as they were typed)."""
    shared: dict[str, Any] = {}
    differ: dict[str, dict[str, Any]] = {}
    for key in sorted({k for r in runs for k in settings(r)}):
        having = [r for r in runs if key in settings(r)]
        shown = {label(r): (r.get("paths_as_typed") or {}).get(key, settings(r)[key]) for r in having}
        if len({json.dumps(settings(r)[key], default=str) for r in having}) > 1:
            differ[key] = shown
        else:
            shared[key] = next(iter(shown.values()))
    return shared, differ


def setting_text(value: Any) -> str:
    """A flag's value as a person would type it."""
    if value is None:
        return "-"
    if isinstance(value, dict):  # an adapter's config: its set keys
        return json.dumps({k: v for k, v in value.items() if v not in (None, [], {})}, separators=(",", ":"))
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def comparison_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    headers = ["Metric"] + [label(r) for r in runs]
    rows = [[name] + [format_value(lookup(r, key)) for r in runs] for name, key in TABLE_ROWS]
    return headers, rows


def set_text(runs: list[Run]) -> str:
    """The table in Markdown, and below it what differs between its columns."""
    headers, rows = comparison_table(runs)
    _, differ = differences(runs)
    lines = [tabulate(rows, headers=headers, tablefmt="github"), "", "Differs between columns:"]
    lines += [
        f"- {key}: " + "; ".join(f"{who} {setting_text(v)}" for who, v in values.items())
        for key, values in differ.items()
    ]
    return "\n".join(lines if differ else lines[:-2])


def compare(output_dir: Path, include_all: bool = False, run_names: set[str] | None = None) -> str:
    """Print the latest comparable set of finished runs (every set with `include_all`; the sets holding
    `run_names` when given), and write comparison.md/.csv/.json and report.md with its figures."""
    output_dir = Path(output_dir)
    sets = comparable_sets([r for r in read_runs(output_dir) if r.get("status") == "finished"])
    if run_names:
        sets = [s for s in sets if any(Path(r["run_dir"]).name in run_names for r in s)]
    elif not include_all:
        sets = sets[-1:]
    if not sets:
        return f"no finished runs under {output_dir}"
    texts = [set_text(s) for s in sets]
    if len(sets) > 1:
        texts = [f"Set {i} of {len(sets)}\n\n{text}" for i, text in enumerate(texts, 1)]
    text = "\n\n".join(texts)
    atomic_write_text(output_dir / "comparison.md", text + "\n")
    buffer = io.StringIO()
    for i, runs in enumerate(sets):
        headers, rows = comparison_table(runs)
        csv.writer(buffer).writerows([[]] * (i > 0) + [headers, *rows])
    atomic_write_text(output_dir / "comparison.csv", buffer.getvalue())
    atomic_write_json(output_dir / "comparison.json", {"sets": [comparison_record(s) for s in sets]})
    write_report(output_dir, sets)
    return text


def comparison_record(runs: list[Run]) -> dict[str, Any]:
    shared, differ = differences(runs)
    figures = [{k: v for k, v in r.items() if k != "log_history"} | {"label": label(r)} for r in runs]
    return {"runs": figures, "shared_settings": shared, "differing_settings": differ}


def write_report(output_dir: Path, sets: list[list[Run]]) -> None:
    """report.md with its PNG figures beside it: for each set the table, loss, cost, quality and trade-off
    figures, three example continuations, and the settings the runs share and those that differ."""
    from study import figures

    title = f"# Report: {output_dir.name}"
    sections = [
        title,
        "",
        "Written by `python main.py compare` (or `study`); every figure's definition is in the README.",
    ]
    for i, runs in enumerate(sets, 1):
        prefix = f"set{i}-" if len(sets) > 1 else ""
        labels = [label(r) for r in runs]
        names = [Path(r["run_dir"]).name for r in runs]  # short and unique in a set: the figures' labels
        memory_key = "peak_gpu_memory_mb" if any(r.get("peak_gpu_memory_mb") for r in runs) else "peak_cpu_memory_mb"
        figures.plot_study_loss(runs, names, output_dir / f"{prefix}loss_curves.png")
        figures.plot_cost(runs, names, memory_key, output_dir / f"{prefix}cost.png")
        figures.plot_quality(runs, names, output_dir / f"{prefix}quality.png")
        figures.plot_tradeoff(runs, names, memory_key, output_dir / f"{prefix}tradeoff.png")
        headers, rows = comparison_table(runs)
        shared, differ = differences(runs)
        h = "###" if len(sets) > 1 else "##"
        if len(sets) > 1:
            sections += ["", f"## Set {i} of {len(sets)}"]
        sections += ["", f"{h} Comparison", "", tabulate(rows, headers=headers, tablefmt="github")]
        reasons = {lookup(r, "metrics.meteor_unavailable_reason") for r in runs} - {None}
        sections += [f"\nMETEOR not computed: {reason}." for reason in sorted(reasons)]
        sections += ["", measured_on(runs, labels)]
        for name, stem in FIGURES:
            sections += ["", f"{h} {name}", "", f"![{name}]({prefix}{stem}.png)"]
        sections += ["", f"{h} Example continuations", "", example_continuations(runs, labels)]
        sections += ["", f"{h} Settings", "", "Shared by every run that has the setting (unset ones left out):", ""]
        rows = [(k, setting_text(v)) for k, v in shared.items() if v is not None]
        sections += [tabulate(rows, ["setting", "value"], "github")]
        if differ:
            rows = [[k] + [setting_text(values.get(who)) for who in labels] for k, values in differ.items()]
            sections += ["", "Different between the columns:", "", tabulate(rows, ["setting", *labels], "github")]
    atomic_write_text(output_dir / "report.md", "\n".join(sections) + "\n")


def measured_on(runs: list[Run], labels: list[str]) -> str:
    """The hardware and torch the runs were measured on: one line when they share it, else each column's."""

    def text(run: Run) -> str:
        env = run.get("environment") or {}
        gpus = f"{env.get('gpu_count', 1)} x {env['gpu']}" if env.get("gpu") else env.get("device", "?")
        return f"{gpus} with torch {env.get('torch', '?')}, {env.get('cpu_threads', '?')} CPU threads"

    texts = [text(run) for run in runs]
    if len(set(texts)) == 1:
        return f"Measured on {texts[0]}."
    each = "; ".join(f"{who}: {t}" for who, t in zip(labels, texts, strict=True))
    return f"Measured on different hardware or software, so time and memory compare only with care: {each}."


def example_continuations(runs: list[Run], labels: list[str], count: int = 3) -> str:
    """The first `count` prompts of the runs' generations.csv, with the reference and each run's continuation."""
    continuations: dict[str, dict[str, str]] = {}
    examples: list[dict[str, str]] = []
    for run, who in zip(runs, labels, strict=True):
        path = Path(run["run_dir"]) / "generations.csv"
        if path.is_file():
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            continuations[who] = {row["prompt"]: row["hypothesis"] for row in rows}
            examples = examples or rows[:count]
    if not examples:
        return "No run here scored generations (`--eval_examples 0`)."
    rows = [
        [e["prompt"], e["reference"]] + [texts.get(e["prompt"], "-") for texts in continuations.values()]
        for e in examples
    ]
    cells = [[" ".join(text.split()).replace("|", "\\|") for text in row] for row in rows]
    return tabulate(cells, ["prompt", "reference", *continuations], "github")
