"""What a person reads about many runs: `compare`'s comparable sets of runs side by side with the report."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from tabulate import tabulate

from analysis.update_shape import update_shape_text
from pipeline.hub import canonical_id
from pipeline.settings import EVALUATE, SETTING_KINDS, TRAINING, is_local, names_of_kind
from pipeline.summary import (
    BUSY_MARK,
    BUSY_NOTE,
    UNAVAILABLE,
    busy,
    format_value,
    lookup,
    method_name,
    table_rows,
)
from study import statistics
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
STUDY_RECORD = "study.json"  # in a study's directory: its choices, intervals and cost
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
    if key in ("model", "dataset", "data_dir", "adapter", "forgetting_data_dir", "peft_config") and isinstance(
        value, str
    ):
        return str(Path(value).resolve()) if is_local(value) else canonical_id(value)
    return value


# Adapter config keys that say where or how the adapter was loaded, not what it is.
NOT_ADAPTER_SETTINGS = ("base_model_name_or_path", "revision", "inference_mode", "peft_version")


def settings(run: Run) -> dict[str, Any]:
    """What the run is: every setting but bookkeeping (and the Hub dataset when --data_dir replaced it, the epochs
    when --max_steps did, the evaluation seed when no fraction was drawn; the evaluation stride as the tokens it is;
    a --peft_config file's content rather than its path), its method, the precision it ran at, on how many
    processes and GPUs, and on what."""
    config = run.get("config", {})
    if run["mode"] in TRAINING:
        config = UNRECORDED_DEFAULTS | config
    config = config | {"eval_stride": config.get("eval_stride") or config.get("block_size")}  # unset: the blocks
    unused = ("dataset", "dataset_config") if config.get("data_dir") else ()
    unused += ("epochs",) if config.get("max_steps") else ()
    unused += ("eval_seed",) if config.get("data_fraction", 1) >= 1 else ()  # every row is scored: nothing drawn
    if config.get("forgetting_data_dir"):  # local files replace the Hub dataset, as --data_dir does
        unused += ("forgetting_dataset",)
    elif not config.get("forgetting_dataset"):  # off (or recorded before it existed): its budget means nothing
        unused += ("forgetting_tokens",)
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
        "checkpoint_dtype": run.get("checkpoint_dtype"),
        "model_revision": run.get("model_revision"),  # a Hub model's commit; unrecorded (local, older runs): left out
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
    return sorted((with_forgetting_change(columns(s)) for s in sets), key=lambda s: max(finished_at(r) for r in s))


def with_forgetting_change(runs: list[Run]) -> list[Run]:
    """Each run with `forgetting_loss_change`: its forgetting loss minus the base column's (the model it started
    from, measured on the same blocks: the base of its own seed, which a --from_scratch start depends on), when
    both were measured."""
    bases = {r["config"].get("seed"): r for r in runs if r["mode"] == "base" and r.get("forgetting_loss") is not None}
    for run in runs:
        base = bases.get(run["config"].get("seed")) or next(iter(bases.values()), None)
        if base and run.get("forgetting_loss") is not None:
            run["forgetting_loss_change"] = run["forgetting_loss"] - base["forgetting_loss"]
    return runs


def finished_at(run: Run) -> str:
    return str(run.get("finished_at", ""))


def columns(runs: list[Run]) -> list[Run]:
    latest = {json.dumps(settings(r), sort_keys=True, default=str): r for r in sorted(runs, key=finished_at)}
    order = {m: i for i, m in enumerate(COLUMN_ORDER)}
    return sorted(
        latest.values(),
        key=lambda r: (order.get(method(r), len(order)), r["config"].get("lora_rank", 0), Path(r["run_dir"]).name),
    )


def replicate_columns(runs: list[Run]) -> list[list[Run]]:
    """A set's columns: its runs that differ only in a replicate setting (the seed) pooled into one, in order."""
    pooled: dict[str, list[Run]] = {}
    for run in runs:
        what = {k: v for k, v in settings(run).items() if SETTING_KINDS.get(k) != "replicate"}
        pooled.setdefault(json.dumps(what, sort_keys=True, default=str), []).append(run)
    return list(pooled.values())


def column_label(column: list[Run]) -> str:
    """`full (full-s1, full-s2)`: the method and every run the column pools."""
    return f"{method(column[0])} ({', '.join(Path(r['run_dir']).name for r in column)})"


def shared_and_differing_settings(columns: list[list[Run]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The settings every column that has them shares, and per differing setting each column's value, its runs'
    values as a list where they differ (their seeds); compared as recorded, paths shown as they were typed."""
    shared: dict[str, Any] = {}
    differ: dict[str, dict[str, Any]] = {}
    for key in sorted({k for column in columns for r in column for k in settings(r)}):
        recorded, shown = {}, {}
        for column in columns:
            having = [r for r in column if key in settings(r)]
            if not having:
                continue
            values = [settings(r)[key] for r in having]
            alike = len({json.dumps(v, default=str) for v in values}) == 1
            if not alike:  # a replicate setting (the seed): in its values' order, not that of the run folders' names
                having = sorted(having, key=lambda r: settings(r)[key])
                values = sorted(values)
            typed = [(r.get("paths_as_typed") or {}).get(key, value) for r, value in zip(having, values, strict=True)]
            recorded[column_label(column)] = values[0] if alike else values
            shown[column_label(column)] = typed[0] if alike else typed
        if len({json.dumps(v, default=str) for v in recorded.values()}) > 1:
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
    """A column per setting, its seed replicates pooled (statistics.pooled_text), a row per figure."""
    columns = replicate_columns(runs)
    headers = ["Metric"] + [column_label(c) for c in columns]
    rows = [[name] + [statistics.pooled_text(c, key) for c in columns] for name, key in table_rows(runs)]
    return headers, rows


def paired_table(runs: list[Run]) -> str | None:
    """Where a column pools seed replicates: every column against each full fine-tuning and base column, paired by
    seed (statistics.paired_differences, as a study's arms are); None where no column pools replicates or none pairs."""
    columns = {column_label(c): c for c in replicate_columns(runs)}
    if all(len(c) == 1 for c in columns.values()):
        return None
    references = [name for kind in ("full", "base") for name, c in columns.items() if method(c[0]) == kind]
    found = statistics.paired_differences(columns, references)
    return difference_table(found) if found else None


def set_text(runs: list[Run], paired: bool = True) -> str:
    """The table in Markdown, below it what differs between its columns, and with `paired` the paired differences."""
    headers, rows = comparison_table(runs)
    _, differ = shared_and_differing_settings(replicate_columns(runs))
    lines = [tabulate(rows, headers=headers, tablefmt="github")] + busy_note(runs)
    if differ:
        lines += ["", "Differs between columns:"]
        lines += [
            f"- {key}: " + "; ".join(f"{who} {setting_text(v)}" for who, v in values.items())
            for key, values in differ.items()
        ]
    table = paired_table(runs) if paired else None
    lines += ["", "Differences, paired by seed:", "", table] if table else []
    return "\n".join(lines)


def busy_note(runs: list[Run]) -> list[str]:
    """The line below a table that explains its (busy) marks, when it has any."""
    return ["", BUSY_NOTE + "."] if any(busy(r) for r in runs) else []


def compare(output_dir: Path, include_all: bool = False) -> str:
    """Print the latest comparable set of finished runs (every set with `include_all`), and write
    comparison.md/.csv/.json and report.md with its figures; in a study's directory (study.json), only print: its
    report is the study's (pooled seeds, chosen rates), which the study command writes again."""
    output_dir = Path(output_dir)
    sets = comparable_sets([r for r in read_runs(output_dir) if r.get("status") == "finished"])
    if not include_all:
        sets = sets[-1:]
    if not sets:
        return f"no finished runs under {output_dir}"
    if (output_dir / STUDY_RECORD).is_file():
        note = (
            "(a study's directory: its report.md is left as the study wrote it; rerun the study command to rewrite it)"
        )
        return f"{sets_text(sets)}\n\n{note}"
    return write_comparison(output_dir, sets)


def sets_text(sets: list[list[Run]], paired: bool = True) -> str:
    """Each set's table with what differs below it (and the paired differences), numbered when there are several."""
    texts = [set_text(s, paired) for s in sets]
    if len(sets) > 1:
        texts = [f"Set {i} of {len(sets)}\n\n{text}" for i, text in enumerate(texts, 1)]
    return "\n\n".join(texts)


def write_comparison(output_dir: Path, sets: list[list[Run]], preface: list[str] | None = None) -> str:
    """Write comparison.md/.csv/.json and report.md (`preface`, Markdown lines, after its title) for `sets`;
    return the tables' text. A study's preface holds its own paired differences (of its arms): not repeated."""
    text = sets_text(sets, paired=not preface)
    atomic_write_text(output_dir / "comparison.md", text + "\n")
    buffer = io.StringIO()
    for i, runs in enumerate(sets):
        headers, rows = comparison_table(runs)
        csv.writer(buffer).writerows([[]] * (i > 0) + [headers, *rows])
    atomic_write_text(output_dir / "comparison.csv", buffer.getvalue())
    atomic_write_json(output_dir / "comparison.json", {"sets": [comparison_record(s) for s in sets]})
    write_report(output_dir, sets, preface or [])
    return text


def comparison_record(runs: list[Run]) -> dict[str, Any]:
    columns = replicate_columns(runs)
    shared, differ = shared_and_differing_settings(columns)
    # Each run's own results.json keeps the long lists: the log, and the per-matrix spectra (~1 MB for GPT-2 small)
    figures = [
        {k: v for k, v in r.items() if k not in ("log_history", "update_shape")}
        | {"label": label(r), "column": column_label(c)}
        for c in columns
        for r in c
    ]
    return {"runs": figures, "shared_settings": shared, "differing_settings": differ}


def write_report(output_dir: Path, sets: list[list[Run]], preface: list[str]) -> None:
    """report.md with its PNG figures beside it: `preface`, then for each set the table, loss, cost, quality and
    trade-off figures (and learning against forgetting when a run measured forgetting), three example
    continuations, and the settings the runs share and those that differ."""
    from study import figures

    title = f"# Report: {output_dir.name}"
    sections = [
        title,
        "",
        "Written by `python main.py compare` (or `study`); every figure's definition is in the README.",
        *preface,
    ]
    if preface:
        sections += ["", "# Every run at its chosen learning rate"]
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
        shared, differ = shared_and_differing_settings(replicate_columns(runs))
        h = "###" if len(sets) > 1 else "##"
        if len(sets) > 1:
            sections += ["", f"## Set {i} of {len(sets)}"]
        sections += ["", f"{h} Comparison", "", tabulate(rows, headers=headers, tablefmt="github"), *busy_note(runs)]
        for what, key in UNAVAILABLE:
            reasons = {lookup(r, key) for r in runs} - {None}
            sections += [f"\n{what}: {reason}." for reason in sorted(reasons)]
        sections += ["", measured_on(runs, labels)]
        drawn = FIGURES
        if any(r.get("forgetting_loss") is not None for r in runs):
            figures.plot_learning_forgetting(runs, names, output_dir / f"{prefix}learning_forgetting.png")
            drawn += (("Learning and forgetting", "learning_forgetting"),)
        for name, stem in drawn:
            sections += ["", f"{h} {name}", "", f"![{name}]({prefix}{stem}.png)"]
        spectrum = f"{prefix}update_spectrum.png"
        if not figures.plot_update_spectrum(runs, names, lora_ranks(runs), output_dir / spectrum):
            spectrum = None
        update_shape = update_shape_section(runs, names, spectrum)
        sections += ["", f"{h} Shape of the weight update", "", *update_shape] if update_shape else []
        sections += ["", f"{h} Example continuations", "", example_continuations(runs, labels)]
        sections += ["", f"{h} Settings", "", "Shared by every run that has the setting (unset ones left out):", ""]
        rows = [(k, setting_text(v)) for k, v in shared.items() if v is not None]
        sections += [tabulate(rows, ["setting", "value"], "github")]
        if differ:
            shown = [column_label(c) for c in replicate_columns(runs)]
            rows = [[k] + [setting_text(values.get(who)) for who in shown] for k, values in differ.items()]
            sections += ["", "Different between the columns:", "", tabulate(rows, ["setting", *shown], "github")]
        paired = None if preface else paired_table(runs)
        sections += ["", f"{h} Differences, paired by seed", "", paired] if paired else []
    atomic_write_text(output_dir / "report.md", "\n".join(sections) + "\n")


def lora_ranks(runs: list[Run]) -> list[int]:
    """The LoRA ranks of the set's LoRA-family runs."""
    return sorted({r["config"]["lora_rank"] for r in runs if r["mode"] == "lora" and r["config"].get("lora_rank")})


def update_shape_section(runs: list[Run], names: list[str], figure: str | None) -> list[str]:
    """The report's update-shape table (each analysed run by module type) and figure, when any run has them."""
    analysed = [(run, name) for run, name in zip(runs, names, strict=True) if run.get("update_shape")]
    if not analysed:
        return []
    ranks = lora_ranks(runs)
    tables = [
        update_shape_text(run["update_shape"], f"{method(run)} ({name})", ranks if run["mode"] == "full" else [])
        for run, name in analysed
    ]
    shape = analysed[0][0]["update_shape"]
    lines = [
        f"Each run's weight update against the weights it started from, per weight matrix (`python main.py analyze`,"
        f" definitions in the README): the rank holding {shape['energy_share']:.0%} of the update's energy, for full"
        f" fine-tuning the energy kept at the set's LoRA ranks, and intruder dimensions among the top"
        f" {shape['intruder_top_k']} singular vectors (|cosine| below {shape['intruder_threshold']} with every"
        " pre-trained one).",
    ]
    for table in tables:
        lines += ["", table]
    if figure:
        lines += ["", f"![Update spectrum]({figure})"]
    return lines


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
        path = Path(run.get("generations_csv") or Path(run["run_dir"]) / "generations.csv")  # a study's own run
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


def study_report(
    study_dir: Path,
    runs: list[Run],
    share: float | None = None,
    widenings: dict[str, statistics.Widening] | None = None,
) -> str:
    """The report of one study's runs (they differ only in arm, learning rate and seed): the verdict, each arm at
    the rate chosen on mean validation loss over seeds, figures pooled over seeds, paired differences against full
    fine-tuning and the base model, the learning-rate figure and the study's cost; then the chosen runs side by
    side as `compare` shows runs. `share`: halving's rung (a share of the steps); `widenings`: what widening added
    to each arm's grid. Writes report.md, study.json and the comparison files; returns the text printed."""
    from study import figures

    arms = statistics.choose_rates(with_forgetting_change(runs), share, widenings)
    chosen = [r for a in arms if a.chosen for r in a.chosen.runs]
    figures.plot_learning_rates(arms, study_dir / "learning_rates.png")
    sections = study_sections(arms, runs, share)
    atomic_write_json(study_dir / STUDY_RECORD, study_record(arms, runs, share))
    table = write_comparison(study_dir, [columns(chosen)], sections) if chosen else ""
    if not chosen:
        atomic_write_text(study_dir / "report.md", "\n".join([f"# Report: {study_dir.name}", *sections]) + "\n")
    return "\n".join([*sections, "", "# Every run at its chosen learning rate", "", table]).strip()


def chosen_rate_text(arm: statistics.Arm) -> str:
    if arm.failed:
        return "failed: every rate diverged"
    if arm.chosen is None or arm.chosen.rate is None:
        return "-"
    grid = [statistics.rate_text(r.rate) for r in arm.rates]
    return statistics.rate_text(arm.chosen.rate) + (f" of {', '.join(grid)}" if len(grid) > 1 else "")


def pooled_cell(arm: statistics.Arm, key: str) -> str:
    if arm.failed:
        return "diverged"
    if arm.chosen is None:
        return "-"
    return statistics.pooled_text(arm.chosen.runs, key)


def pooled_table(arms: list[statistics.Arm]) -> str:
    """Every figure of every arm at its chosen rate: mean ± sample SD over seeds (n), or the value of one seed."""
    rows = [["Learning rate (chosen on validation)"] + [chosen_rate_text(a) for a in arms]]
    rows += [["Seeds"] + [str(len(a.chosen.runs)) if a.chosen else "-" for a in arms]]
    chosen = [r for a in arms if a.chosen for r in a.chosen.runs]
    rows += [[name] + [pooled_cell(a, key) for a in arms] for name, key in table_rows(chosen)]
    return tabulate(rows, headers=["Metric", *[a.name for a in arms]], tablefmt="github", disable_numparse=True)


# What a study's runs must share for their figures to be pooled and paired: what groups runs in `compare` (but the
# generation examples, which a swept run trains without), and what they were measured on.
MEASURED_ALIKE = (
    *(k for k in GROUPED if k != "eval_examples"),
    "model_revision",
    "world_size",
    "gpus_per_process",
    *HARDWARE,
)


def mixed_measurement_note(runs: list[Run]) -> list[str]:
    """A warning when the study's runs were not all measured alike (a study continued on another machine, or array
    tasks on different nodes): its pooled figures, choices and intervals then mix them."""
    differ = [k for k in MEASURED_ALIKE if len({json.dumps(settings(r).get(k), default=str) for r in runs}) > 1]
    if not differ:
        return []
    return [
        "",
        f"**Warning: this study's runs differ in {', '.join(differ)}** (see the settings below): the pooled figures, "
        "the chosen rates and the intervals mix runs that were not measured alike.",
    ]


def study_sections(arms: list[statistics.Arm], runs: list[Run], share: float | None = None) -> list[str]:
    """The study's own part of the report, as Markdown lines."""
    seeds = sorted({statistics.seed(r) for r in runs} - {None})
    trained = [a for a in arms if a.name != "base"]
    swept = any(len(a.rates) > 1 for a in trained)
    lines = ["", "## Verdict", "", *verdict(arms)]
    lines += ["", "## Each arm at its chosen learning rate", "", pooled_table(arms)]
    lines += busy_note([r for a in arms if a.chosen for r in a.chosen.runs])
    lines += mixed_measurement_note(runs)
    lines += ["", evaluation_rows_note(runs)] if len(seeds) > 1 else []
    lines += [
        "",
        f"Each trained arm's learning rate is the one with the lowest final validation loss (`val_loss`), the mean "
        f"over {len(seeds)} seed{'s' * (len(seeds) > 1)} ({', '.join(map(str, seeds))}); the test split never "
        "takes part in the choice."
        + (" Figures are mean ± sample standard deviation over seeds, with n." if len(seeds) > 1 else ""),
    ]
    chosen = [r for a in trained if a.chosen for r in a.chosen.runs]
    others = [r for r in runs if r["mode"] != "base" and r not in chosen]
    if swept and chosen and all(r.get("metrics") for r in chosen) and not any(r.get("metrics") for r in others):
        lines += [
            "",
            "Generation and its scores ran only for each arm's chosen rate (every seed); the other rates' "
            f"{len(others)} runs were trained and scored on loss only.",
        ]
    notes = [f"- **{a.name}**: {note}" for a in arms for note in a.notes]
    lines += ["", *notes] if notes else []
    lines += ["", "## Learning rates", "", "![Learning rates](learning_rates.png)", "", rate_table(trained, share)]
    multiples = statistics.rate_multiples(arms)
    if multiples:
        lines += [
            "",
            "Chosen rate as a multiple of full fine-tuning's: "
            + "; ".join(f"{name} {value:.3g}x" for name, value in multiples.items())
            + ".",
        ]
    lines += ["", "## Differences, paired by seed", "", difference_table(statistics.arm_differences(arms))]
    lines += ["", "## Cost of the study", "", cost_text(statistics.study_cost(runs, arms))]
    return lines


def rate_table(arms: list[statistics.Arm], share: float | None = None) -> str:
    """Every rate of every trained arm: its final validation loss, and with halving its loss at the rung."""
    rows = []
    for arm in arms:
        for rate in arm.rates:
            if rate.diverged:
                loss = "diverged"
            elif rate.stopped_at:
                loss = f"stopped at step {rate.stopped_at}"
            elif rate.val_loss is None:
                loss = "unfinished"
            else:
                loss = rate.val_loss.text()
            row = [arm.name, statistics.rate_text(rate.rate) + (" (added)" if rate.added else "")]
            row += [rate.rung_loss.text() if rate.rung_loss else "-"] if share else []
            rows.append([*row, loss, "chosen" if rate is arm.chosen else ""])
    rung = [f"validation loss at the rung ({share:.3g} of the steps)"] if share else []
    headers = ["arm", "learning rate", *rung, "final validation loss", ""]
    table = tabulate(rows, headers, "github", disable_numparse=True)
    if share:
        table += (
            "\n\nSuccessive halving: every rate trained to the rung on the schedule of the whole run, and only the "
            f"best ceil(n x {share:.3g}) of each arm's n rates (by mean validation loss over seeds at the rung, never "
            "test) went on; the others stopped there, each with a checkpoint that `--resume` continues."
        )
    if any(r.added for a in arms for r in a.rates):
        table += (
            "\n\n(added): a rate the study added by widening (`--widen`), outward from an edge where the best rate was."
        )
    return table


def signed(value: float) -> str:
    """A difference as the difference table and the verdict write it."""
    return f"{value:+,.4f}"


def interval_text(d: statistics.Difference) -> str:
    return "-" if d.low is None else f"[{signed(d.low)}, {signed(d.high)}]"


def unsettled(arm: statistics.Arm) -> list[str]:
    """Why an arm's figures may not be its settled answer: its best rate not bracketed (at an edge of its grid, or
    its one rate, not tuned), or one seed."""
    reasons = [f"{arm.name}'s best rate is at the edge of its grid"] if arm.at_edge else []
    reasons += [f"{arm.name} ran one rate, not tuned"] if arm.one_rate else []
    return reasons + ([f"{arm.name} ran one seed"] if arm.chosen and len(arm.chosen.runs) < 2 else [])


def ratio(arm: statistics.Arm, reference: statistics.Arm, key: str) -> str | None:
    """The arm's pooled figure over the reference's, as `0.85x`; None when either is missing."""
    mine, theirs = (statistics.pooled_figure(a.chosen.runs, key) for a in (arm, reference))
    return f"{mine.mean / theirs.mean:#.3g}x" if mine and theirs and theirs.mean else None


def verdict(arms: list[statistics.Arm]) -> list[str]:
    """A sentence per adapter arm against full fine-tuning, from the figures of the tables below: the paired test
    perplexity difference with its 95% interval, trainable parameters, peak memory and training time as ratios,
    and the forgetting of both."""
    full = next((a for a in arms if a.name == "full" and a.chosen), None)
    adapters = [a for a in arms if a.name not in ("base", "full")]
    if full is None or not adapters:
        return ["No adapter arm and full fine-tuning arm with results to set against each other."]
    paired = {
        d.arm: d for d in statistics.arm_differences(arms) if d.reference == "full" and d.key == "test_perplexity"
    }
    chosen = [r for a in arms if a.chosen for r in a.chosen.runs]
    memory = "peak_gpu_memory_mb" if any(r.get("peak_gpu_memory_mb") for r in chosen) else "peak_cpu_memory_mb"
    lines = []
    for arm in adapters:
        if arm.chosen is None:
            lines.append(f"- **{arm.name}**: no figures ({'every rate diverged' if arm.failed else 'unfinished'}).")
            continue
        d = paired.get(arm.name)
        if d is None:
            quality = "test perplexity not paired with full fine-tuning's by seed"
        elif d.beyond_noise is None:
            quality = f"test perplexity {signed(d.mean)} (n={d.n}, no interval: the noise is unknown)"
        else:
            side = "within noise" if not d.beyond_noise else "higher" if d.mean > 0 else "lower"
            quality = f"test perplexity {signed(d.mean)} (95% CI {interval_text(d)}, n={d.n}): {side}"
        time = ratio(arm, full, "train_time_s")
        marked = any(busy(r) for r in arm.chosen.runs + full.chosen.runs)
        costs = [
            f"{text} {what}"
            for text, what in (
                (ratio(arm, full, "trainable_params"), "the trainable parameters"),
                (ratio(arm, full, memory), "the peak memory"),
                (time, "the training time" + (BUSY_MARK if marked else "")),
            )
            if text
        ]
        forgetting = [statistics.pooled_figure(a.chosen.runs, "forgetting_loss_change") for a in (arm, full)]
        forgot = (
            f"; forgetting (loss change vs base) {format_value(forgetting[0].mean)}, full fine-tuning's "
            f"{format_value(forgetting[1].mean)}"
            if all(forgetting)
            else ""
        )
        why = unsettled(arm) + unsettled(full)
        prefix = f"**Unsettled** ({'; '.join(why)}): " if why else ""
        lines.append(f"- {prefix}**{arm.name}** against full fine-tuning: {quality}; {', '.join(costs)}{forgot}.")
    lines += [
        "",
        "Differences are arm minus full fine-tuning, paired by seed (the table of differences below); ratios are "
        "the arm's mean over full fine-tuning's (the table below); within noise: the interval holds 0.",
    ]
    return lines


def evaluation_rows_note(runs: list[Run]) -> str:
    """What a seed varies: the training only, where every seed is scored on the same validation and test rows (the
    whole splits, or one fraction drawn with one recorded --eval_seed); else the rows too."""
    configs = [r.get("config", {}) for r in runs]
    fractions = {c.get("data_fraction", 1) for c in configs}
    eval_seeds = {c.get("eval_seed") for c in configs}
    if fractions == {1}:
        rows = "the whole validation and test splits"
    elif len(fractions) == 1 and len(eval_seeds) == 1 and None not in eval_seeds:
        rows = f"the same validation and test rows (--eval_seed {next(iter(eval_seeds))})"
    else:
        return (
            "A seed varies the training (data order, initialisation, dropout) and here also the validation and test "
            "rows: not every run drew them alike (another --data_fraction or --eval_seed, or, recorded before "
            "--eval_seed, with its own --seed), so the intervals also hold the sampling of those rows."
        )
    return (
        "A seed varies the training (data order, initialisation, dropout); every seed is scored on "
        f"{rows}, so the intervals measure training noise, not the sampling of the test set."
    )


def difference_table(found: list[statistics.Difference]) -> str:
    if not found:
        return "No arm pairs with full fine-tuning or the base model by seed."
    rows = [[d.arm, d.reference, d.key, signed(d.mean), interval_text(d), str(d.n), d.verdict()] for d in found]
    headers = ["arm", "reference", "figure", "difference (arm - reference)", "95% CI", "seeds", "verdict"]
    lines = [tabulate(rows, headers, "github", disable_numparse=True), ""]
    lines.append(
        "Each difference is the mean over seeds of (arm - reference) on the same seed (same data order and sample); "
        "the interval is Student's t with n - 1 degrees of freedom (scipy.stats.t). A difference is larger than "
        "the noise when its interval excludes 0."
    )
    return "\n".join(lines)


def cost_text(cost: dict[str, Any]) -> str:
    text = (
        f"{cost['runs']} runs"
        + (f" and {cost['generation_runs']} generation runs at the chosen rates" if cost["generation_runs"] else "")
        + f": {cost['train_time_s']:,.1f} s of training and {cost['generation_time_s']:,.1f} s of "
        + (
            f"generation, {cost['device_hours']:,.4f} {cost['device_hours_unit']}"
            if cost["device_hours"] is not None
            else "generation, on different kinds of device: "
            + " and ".join(f"{h:,.4f} {unit}" for unit, h in cost["device_hours_by_unit"].items())
        )
        + " (training and generation time x the GPUs, or the CPU threads, each run used)."
    )
    if cost["device_hours_without_halving"]:
        saved = cost["device_hours_without_halving"] - cost["device_hours"]
        text += (
            f" Successive halving stopped {cost['stopped_early_runs']} runs at the rung: trained to the end, the same "
            f"runs would have taken about {cost['device_hours_without_halving']:,.4f} {cost['device_hours_unit']}, "
            f"so it saved {saved:,.4f} ({saved / cost['device_hours_without_halving']:.0%}; each stopped run's "
            "first step paid once where it recorded one, its other steps scaled to those its whole run has)."
        )
    if cost["sweep_factor"]:
        text += f" The learning-rate sweep multiplied the device-hours by {cost['sweep_factor']:.2f}"
        text += f" and the seeds by {cost['seeds_factor']:.2f}" if cost["seeds_factor"] else ""
        text += " (all runs over the chosen rates' runs; those over the chosen rates' runs of one seed)."
    return text


def study_record(arms: list[statistics.Arm], runs: list[Run], share: float | None = None) -> dict[str, Any]:
    """study.json: each arm's grid and choice, the paired differences and the cost."""
    return {
        "halving_share": share,
        "arms": [
            {
                "arm": a.name,
                "chosen_learning_rate": a.chosen.rate if a.chosen else None,
                "failed": a.failed,
                "at_edge_of_grid": a.at_edge,
                "one_rate": a.one_rate,
                "bracketed_by": [r.rate for r in a.bracket] if a.bracket else None,
                "unsettled": unsettled(a),
                "notes": a.notes,
                "rates": [
                    {
                        "learning_rate": r.rate,
                        "runs": [Path(run["run_dir"]).name for run in r.runs],
                        "val_loss_mean": r.val_loss.mean if r.val_loss else None,
                        "val_loss_std": r.val_loss.std if r.val_loss else None,
                        "diverged": r.diverged,
                        "added_by_widening": r.added,
                        "stopped_at_step": r.stopped_at,
                        "rung_val_loss_mean": r.rung_loss.mean if r.rung_loss else None,
                    }
                    for r in a.rates
                ],
            }
            for a in arms
        ],
        "rate_multiples_of_full": statistics.rate_multiples(arms),
        "differences": [vars(d) | {"beyond_noise": d.beyond_noise} for d in statistics.arm_differences(arms)],
        "cost": statistics.study_cost(runs, arms),
    }
