"""`study`: every arm of the comparison with one set of shared settings, each an ordinary run, then the report.

Each arm runs in a fresh process (`python main.py <mode> ...`), so its peak memory and time are its own, as a
standalone run measures them. Running the same command again continues the study: finished arms are skipped,
an unfinished one is resumed, a missing one is run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.settings import METHOD_DEFAULTS, SETTING_KINDS, RunSettings
from study.report import NOT_ADAPTER_SETTINGS, canonical, compare
from utils import RunInterrupted, ToolError, peft_config_file, timestamp

MAIN = Path(__file__).resolve().parents[1] / "main.py"
LORA_VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}}


@dataclass
class StudySettings:
    """What `study` is told beyond the settings its runs share."""

    arms: list[str]
    lora_ranks: list[int]
    study_name: str | None


@dataclass
class PlannedRun:
    """One run of the study: its name in the study's directory, and its settings."""

    name: str
    settings: RunSettings


def peft_arm_names(paths: list[str]) -> list[str]:
    """The run name of each `peft:PATH` arm: its folder's name for a folder (or a file named adapter_config.json),
    else the file's stem. ValueError for a path that holds no PEFT config (PEFT itself checks the rest, in the arm)."""
    names = []
    for path in paths:
        file = peft_config_file(path)
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"peft:{path}: not a readable JSON file ({e})") from None
        if not isinstance(config, dict) or not config.get("peft_type"):
            raise ValueError(f"peft:{path}: not a PEFT config (it has no peft_type)")
        names.append(file.parent.name if file.name == "adapter_config.json" else file.stem)
    return names


def planned_runs(study: StudySettings, shared: RunSettings, study_dir: Path) -> list[PlannedRun]:
    """Every run of the study, in the order they run: the shared settings with each arm's own fields replaced
    (command, method, rank or PEFT config, and each method's own learning rate and weight decay unless the study
    set them)."""
    planned = []
    for arm in study.arms:
        if arm.startswith("peft:"):
            path = arm.removeprefix("peft:")
            variants = [(*peft_arm_names([path]), {"command": "peft", "peft_config": path})]
        elif arm == "base":
            variants = [("base", {"command": "evaluate"})]
        elif arm == "full":
            variants = [("full", {"command": "full"})]
        else:
            variants = [
                (f"{arm}-r{r}", {"command": "lora", "lora_rank": r, "use_dora": False, "use_rslora": False})
                for r in study.lora_ranks
            ]
        for name, fields in variants:
            run = replace(shared, **fields, output_dir=str(study_dir), run_name=name, resume=None)
            run = replace(run, **{**method_defaults(run), **LORA_VARIANTS.get(arm, {})})
            planned.append(PlannedRun(name, run))
    names = [p.name for p in planned]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ToolError(
            f"two arms would be named {', '.join(clashes)}: a peft: arm is named after its config's "
            "file or folder; rename one"
        )
    return planned


def method_defaults(run: RunSettings) -> dict:
    """The run's learning rate and weight decay: the study's when it set them, else its method's own; settings
    its command does not take are None."""
    if run.command not in METHOD_DEFAULTS:
        return {name: None for name in dataclasses.asdict(run) if not run.applies(name)}
    rate, decay = METHOD_DEFAULTS[run.command]
    return {
        "learning_rate": run.learning_rate if run.learning_rate is not None else rate,
        "weight_decay": run.weight_decay if run.weight_decay is not None else decay,
    }


def recorded(run_dir: Path) -> dict:
    """The run's results.json; empty when it has none that can be read."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def changed_settings(config: dict, expected: RunSettings) -> list[str]:
    """The settings (bookkeeping aside) whose recorded value differs from what this study would run with."""
    return [
        f"--{key} {config.get(key)} -> {value}"
        for key, value in expected.to_config().items()
        if key in config
        and SETTING_KINDS[key] != "bookkeeping"
        and json.dumps(canonical(key, config[key])) != json.dumps(canonical(key, value))
    ]


def changed_adapter(record: dict, expected: RunSettings) -> list[str]:
    """The keys of a peft: arm's config file whose value differs from the adapter config the arm recorded."""
    adapter = record.get("adapter_config")
    if not adapter or not expected.peft_config:
        return []

    def canonical_value(value: object) -> str:  # PEFT keeps module names as a set: written as a sorted list
        return json.dumps(sorted(value, key=str) if isinstance(value, list) else value)

    written = json.loads(peft_config_file(expected.peft_config).read_text())
    return [
        f"{key} {adapter.get(key)} -> {value}"
        for key, value in written.items()
        if key not in (*NOT_ADAPTER_SETTINGS, "task_type")
        and canonical_value(adapter.get(key)) != canonical_value(value)
    ]


def run_arm(argv: list[str]) -> int:
    """Run one arm to its end; a Ctrl-C or SIGTERM to the study goes to the arm, which stops cleanly."""
    # Its own session: a terminal's Ctrl-C reaches the arm once (forwarded here), not twice.
    child = subprocess.Popen(argv, start_new_session=True)
    # A closed terminal (SIGHUP) stops the arm as SIGTERM does, rather than leave it running unseen.
    forward = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}
    previous = {s: signal.signal(s, lambda signum, _: child.send_signal(forward[signum])) for s in forward}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Run the study's runs that are not finished, then print the table and write the report in its directory."""
    study = StudySettings(args.arms, args.lora_ranks, args.study_name)
    name = study.study_name or f"study-{timestamp()}"
    study_dir = Path(args.output_dir) / name
    again = f"rerun the same command with --study_name {name} to continue"
    planned = planned_runs(study, RunSettings.from_flags(args), study_dir)
    print(f"study {name}: arms {', '.join(p.name for p in planned)} in {study_dir}", flush=True)
    records = {}
    for p in planned:  # every run checked before any runs: a study never mixes settings
        records[p.name] = recorded(study_dir / p.name)
        changed = changed_settings(records[p.name].get("config", {}), p.settings)
        changed += changed_adapter(records[p.name], p.settings)
        if changed:
            raise ToolError(
                f"study {name}: {p.name} was started with other settings ({', '.join(changed)}); "
                "give this study another --study_name"
            )
    for p in planned:
        if records[p.name].get("status") == "finished":
            print(f"study {name}: {p.name} finished already, skipped", flush=True)
            continue
        defaults = RunSettings.from_flags(parser.parse_args([p.settings.command]))
        argv = p.settings.to_argv(defaults)
        argv += ["--resume"] if (study_dir / p.name).exists() else []
        print(f"study {name}: {p.name}: python main.py {shlex.join(argv)}", flush=True)
        code = run_arm([sys.executable, str(MAIN), *argv])
        if code == 130 or code < 0:  # stopped by Ctrl-C/SIGTERM cleanly (130), or killed by a signal
            raise RunInterrupted(f"study {name} stopped during {p.name}; {again}")
        if code != 0:
            raise ToolError(f"study {name}: {p.name} failed with exit status {code} (its error is above); {again}")
    print(compare(study_dir, run_names={p.name for p in planned}))
    print(f"\nreport: {study_dir / 'report.md'}")
