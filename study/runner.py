"""`study`: every arm of the comparison with one set of shared settings, each an ordinary run, then the report.

Each arm runs in a fresh process (`python main.py <mode> ...`), so its peak memory and time are its own, as a
standalone run measures them. Running the same command again continues the study: finished arms are skipped,
an unfinished one is resumed, a missing one is run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from study.report import NOT_ADAPTER_SETTINGS, canonical, compare
from utils import RunInterrupted, ToolError, peft_config_file, timestamp

MAIN = Path(__file__).resolve().parents[1] / "main.py"
LORA_VARIANT_FLAGS = {"lora": [], "dora": ["--use_dora"], "rslora": ["--use_rslora"]}
NOT_PASSED = ("command", "run_name", "resume", "output_dir")  # the study sets these for each arm


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


def arms(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(run name, command, the arm's own flags) of every arm, in the order they run."""
    planned = []
    for arm in args.arms:
        if arm.startswith("peft:"):
            path = arm.removeprefix("peft:")
            planned.append((*peft_arm_names([path]), "peft", ["--peft_config", path]))
        elif arm == "base":
            planned.append(("base", "evaluate", []))
        elif arm == "full":
            planned.append(("full", "full", []))
        else:
            planned += [
                (f"{arm}-r{r}", "lora", ["--lora_rank", str(r), *LORA_VARIANT_FLAGS[arm]]) for r in args.lora_ranks
            ]
    names = [name for name, _, _ in planned]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ToolError(
            f"two arms would be named {', '.join(clashes)}: a peft: arm is named after its config's "
            "file or folder; rename one"
        )
    return planned


def shared_flags(args: argparse.Namespace, defaults: dict) -> list[str]:
    """The study's settings that the arm's command takes, as flags; a setting left at the command's default
    (or unset, like the per-method learning rate) is not passed, so the command's own default applies."""
    flags = []
    for key, default in defaults.items():
        value = getattr(args, key, None)
        if key in NOT_PASSED or value is None or value == default or value is False:
            continue
        flags.append(f"--{key}")
        if value is not True:
            flags.append(",".join(map(str, value)) if isinstance(value, list) else str(value))
    return flags


def recorded(run_dir: Path) -> dict:
    """The arm's results.json; empty when it has none that can be read."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


# Flags that change how a run is logged, checkpointed or batched for generation, not what it measures.
NOT_RESULTS = ("cache_dir", "logging_steps", "eval_batch_size", "report_to", "save_steps", "save_total_limit")


def changed_settings(config: dict, expected: argparse.Namespace) -> list[str]:
    """The flags whose recorded value differs from what this study command would run the arm with."""
    return [
        f"--{key} {config.get(key)} -> {value}"
        for key, value in vars(expected).items()
        if key in config
        and key not in (*NOT_PASSED, *NOT_RESULTS)
        and json.dumps(canonical(key, config[key])) != json.dumps(canonical(key, value))
    ]


def changed_adapter(record: dict, expected: argparse.Namespace) -> list[str]:
    """The keys of a peft: arm's config file whose value differs from the adapter config the arm recorded."""
    adapter = record.get("adapter_config")
    if not adapter or not getattr(expected, "peft_config", None):
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
    """Run the arms that are not finished, then print the table and write the report in the study's directory."""
    name = args.study_name or f"study-{timestamp()}"
    study_dir = Path(args.output_dir) / name
    again = f"rerun the same command with --study_name {name} to continue"
    planned = arms(args)
    print(f"study {name}: arms {', '.join(a for a, _, _ in planned)} in {study_dir}", flush=True)
    commands, records = {}, {}
    for arm, command, own_flags in planned:  # every arm checked before any runs: a study never mixes settings
        flags = shared_flags(args, vars(parser.parse_args([command, *own_flags])))
        commands[arm] = [command, *flags, *own_flags, "--output_dir", str(study_dir), "--run_name", arm]
        records[arm] = recorded(study_dir / arm)
        expected = parser.parse_args(commands[arm])
        changed = changed_settings(records[arm].get("config", {}), expected) + changed_adapter(records[arm], expected)
        if changed:
            raise ToolError(
                f"study {name}: {arm} was started with other settings ({', '.join(changed)}); "
                "give this study another --study_name"
            )
    for arm, _, _ in planned:
        run_dir, argv = study_dir / arm, commands[arm]
        if records[arm].get("status") == "finished":
            print(f"study {name}: {arm} finished already, skipped", flush=True)
            continue
        argv += ["--resume"] if run_dir.exists() else []
        print(f"study {name}: {arm}: python main.py {shlex.join(argv)}", flush=True)
        code = run_arm([sys.executable, str(MAIN), *argv])
        if code == 130 or code < 0:  # stopped by Ctrl-C/SIGTERM cleanly (130), or killed by a signal
            raise RunInterrupted(f"study {name} stopped during {arm}; {again}")
        if code != 0:
            raise ToolError(f"study {name}: {arm} failed with exit status {code} (its error is above); {again}")
    print(compare(study_dir, run_names={arm for arm, _, _ in planned}))
    print(f"\nreport: {study_dir / 'report.md'}")
