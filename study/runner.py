"""`study`: every arm at each learning rate and seed asked, each an ordinary run, then the report.

Each run is a fresh process (`python main.py <mode> ...`), so its peak memory and time are its own, as a standalone
run measures them; `--jobs N` runs N at once, each on its own share of the CPUs or its own GPUs. Running the same
command again continues the study: finished runs are skipped, an unfinished one is resumed, a missing one is run,
and one that another process holds (its lock) is waited for. An arm with several rates trains every rate without
generation; once every rate has finished, generation runs for the chosen rate's runs only (an `evaluate` of each
saved model, named `<run>-generation`), and the report takes its figures from there.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.run_directory import is_locked
from study.report import canonical, study_report
from study.statistics import arm_name, choose_rates, learning_rate, rate_text, seed
from utils import CONCURRENT_RUNS_VARIABLE, RunInterrupted, ToolError, timestamp

MAIN = Path(__file__).resolve().parents[1] / "main.py"
LORA_VARIANT_FLAGS = {"lora": [], "dora": ["--use_dora"], "rslora": ["--use_rslora"]}
NOT_PASSED = ("command", "run_name", "resume", "output_dir")  # the study sets these for each run
HALF_DECADE = 10**0.5
POLL_S = 1.0  # how often the study looks at runs it waits for
DIVERGED = "the training loss became"  # how a run that stopped on a non-finite loss records its error


@dataclass
class Planned:
    """One run of the study: its directory name, arm, command and flags (without where it is written), the
    learning rate and seed it runs with, and for a generation run the trained run whose model it continues with."""

    name: str
    arm: str
    flags: list[str]
    rate: float | None
    seed: int
    generation_of: str | None = None

    def argv(self, study_dir: Path) -> list[str]:
        """The arguments of `python main.py` for this run."""
        return [*self.flags, "--output_dir", str(study_dir), "--run_name", self.name]


def arms(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(arm, command, the arm's own flags) of every arm, in the order they run."""
    planned = []
    for arm in args.arms:
        if arm == "base":
            planned.append(("base", "evaluate", []))
        elif arm == "full":
            planned.append(("full", "full", []))
        else:
            planned += [
                (f"{arm}-r{r}", "lora", ["--lora_rank", str(r), *LORA_VARIANT_FLAGS[arm]]) for r in args.lora_ranks
            ]
    return planned


def rate_grid(args: argparse.Namespace, method: str, default: float) -> list[float]:
    """A method's learning rates: its --learning_rates list, else the plain list, else --lr_sweep's N rates half a
    decade apart centred on its default, else the one rate (--learning_rate, or its default)."""
    if args.lr_sweep:
        n = args.lr_sweep
        return [float(f"{default * HALF_DECADE ** (i - (n - 1) / 2):.3g}") for i in range(n)]
    lists = dict(args.learning_rates or [])
    return lists.get(method) or lists.get(None) or [args.learning_rate or default]


def shared_flags(args: argparse.Namespace, defaults: dict) -> list[str]:
    """The study's settings that the run's command takes, as flags; a setting left at the command's default
    (or unset, like the per-method weight decay) is not passed, so the command's own default applies."""
    flags = []
    for key, default in defaults.items():
        value = getattr(args, key, None)
        if key in NOT_PASSED or value is None or value == default or value is False:
            continue
        flags.append(f"--{key}")
        if value is not True:
            flags.append(",".join(map(str, value)) if isinstance(value, list) else str(value))
    return flags


def command_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str, **settings) -> list[str]:
    """The one place a run's command line is built: the study's settings with `settings` replaced."""
    run_args = argparse.Namespace(**(vars(args) | settings))
    return [command, *shared_flags(run_args, vars(parser.parse_args([command])))]


def plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Planned]:
    """Every (arm, rate, seed) run. Names say the rate and seed only where the study has several (`full`,
    `lora-r8-lr3e-4`, `lora-r8-lr3e-4-s2025`); an arm with several rates trains them without generation."""
    seeds = args.seeds or [args.seed]
    planned = []
    for arm, command, own_flags in arms(args):
        default = parser.parse_args([command]).learning_rate if command != "evaluate" else None
        rates = [None] if command == "evaluate" else rate_grid(args, arm.split("-r")[0], default)
        swept = len(rates) > 1
        for rate in rates:
            for s in seeds:
                name = arm + (f"-lr{rate_text(rate)}" if swept else "") + (f"-s{s}" if len(seeds) > 1 else "")
                settings = {"seed": s} | ({"learning_rate": rate} if rate else {})
                settings |= {"eval_examples": 0} if swept else {}  # generation only at the chosen rate, later
                flags = command_flags(args, parser, command, **settings) + own_flags
                planned.append(Planned(name, arm, flags, rate, s))
    return planned


def recorded(run_dir: Path) -> dict:
    """The run's results.json; empty when it has none that can be read."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def match_existing(study_dir: Path, planned: list[Planned]) -> None:
    """Give each planned run the directory of a run already in the study with its arm, rate and seed, whatever it
    is named: a study that gains rates or seeds (and so longer names) keeps the runs it has."""
    existing = {}
    for path in sorted(study_dir.glob("*/results.json")):
        results = recorded(path.parent)
        if results.get("mode") in ("base", "full", "lora"):
            existing.setdefault((arm_name(results), learning_rate(results), seed(results)), path.parent.name)
    for run in planned:
        run.name = existing.get((run.arm, run.rate, run.seed), run.name)


# Flags that change how a run is logged, checkpointed or batched for generation, not what it measures; and
# eval_examples, since a swept run's generation is its own run.
NOT_RESULTS = (
    "cache_dir",
    "logging_steps",
    "eval_batch_size",
    "report_to",
    "save_steps",
    "save_total_limit",
    "eval_examples",
)


def changed_settings(config: dict, expected: argparse.Namespace) -> list[str]:
    """The flags whose recorded value differs from what this study command would run the run with."""
    return [
        f"--{key} {config.get(key)} -> {value}"
        for key, value in vars(expected).items()
        if key in config
        and key not in (*NOT_PASSED, *NOT_RESULTS)
        and json.dumps(canonical(key, config[key])) != json.dumps(canonical(key, value))
    ]


def check_settings(study_dir: Path, name: str, planned: list[Planned], parser: argparse.ArgumentParser) -> None:
    """Before any run starts: a run (finished or not) recorded with other settings than this command gives it."""
    for run in planned:
        changed = changed_settings(recorded(study_dir / run.name).get("config", {}), parser.parse_args(run.flags))
        if changed:
            raise ToolError(
                f"study {name}: {run.name} was started with other settings ({', '.join(changed)}); "
                "give this study another --study_name"
            )


def done(results: dict) -> bool:
    """Finished, or stopped on a non-finite loss: a result either way, never run again."""
    return results.get("status") == "finished" or (
        results.get("status") == "failed" and DIVERGED in str(results.get("error"))
    )


def generation_runs(
    args: argparse.Namespace, parser: argparse.ArgumentParser, study_dir: Path, planned: list[Planned]
) -> list[Planned] | None:
    """Generation for each arm's chosen rate (every seed) where its runs trained without it: an `evaluate` of the
    saved model (with the adapter on the same base for LoRA). None until every trained run is done."""
    records = trained_results(study_dir, planned)
    if not all(done(r) for r in records):
        return None
    if args.eval_examples == 0:
        return []
    by_dir = {r["run_dir"]: run for run, r in zip(planned, records, strict=True)}
    found = []
    for arm in choose_rates(records):
        for results in arm.chosen.runs if arm.chosen and arm.name != "base" else []:
            trained = by_dir[results["run_dir"]]
            if results.get("metrics") is not None:
                continue  # it generated while training
            saved = study_dir / trained.name
            if results["mode"] == "full":  # the saved model, not a fresh init from its config
                model = {"model": str(saved / "model"), "from_scratch": False}
            else:
                model = {"adapter": str(saved / "adapter")}
            flags = command_flags(args, parser, "evaluate", seed=trained.seed, **model)
            name = f"{trained.name}-generation"
            found.append(Planned(name, arm.name, flags, trained.rate, trained.seed, generation_of=trained.name))
    return found


def visible_gpus() -> list[str]:
    """The GPUs runs may use, without importing torch: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() not in ("", "-1")]
    if not shutil.which("nvidia-smi"):
        return []
    listed = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
    )
    return listed.stdout.split() if listed.returncode == 0 else []


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


class Launcher:
    """Starts runs in job slots: on a GPU host with --jobs or --gpus_per_run above 1, each slot has its own
    --gpus_per_run GPUs (CUDA_VISIBLE_DEVICES, and torchrun for more than one); on a CPU host with --jobs above 1,
    its own share of the CPUs (affinity, and as many torch threads). With --jobs above 1 each run records
    concurrent_runs."""

    def __init__(self, args: argparse.Namespace, gpus: list[str]) -> None:
        self.jobs, self.per_run, self.gpus = args.jobs, args.gpus_per_run, gpus
        cpus = usable_cpus()
        share = len(cpus) // self.jobs
        self.cpus = [cpus[i * share : (i + 1) * share] for i in range(self.jobs)]

    def start(self, argv: list[str], slot: int) -> subprocess.Popen:
        env, affinity = dict(os.environ), None
        prefix = [sys.executable, str(MAIN)]
        if self.gpus and (self.jobs > 1 or self.per_run > 1):  # one run alone sees every GPU, as a run by hand does
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[slot * self.per_run : (slot + 1) * self.per_run])
            if self.per_run > 1:
                torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(self.per_run)]
                prefix = [sys.executable, *torchrun, str(MAIN)]
        elif self.jobs > 1:
            env["OMP_NUM_THREADS"] = str(len(self.cpus[slot]))
            affinity = self.cpus[slot]
        if self.jobs > 1:
            env[CONCURRENT_RUNS_VARIABLE] = str(self.jobs)
        # Its own session: a terminal's Ctrl-C reaches the run once (forwarded by the study), not twice.
        return subprocess.Popen(
            [*prefix, *argv],
            env=env,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None,
        )


def execute(runs: list[Planned], study_dir: Path, name: str, launcher: Launcher) -> None:
    """Run every run not done, up to --jobs at once; wait for those another process holds. Ctrl-C or SIGTERM (a
    closed terminal's SIGHUP as SIGTERM) goes to every running run, which checkpoints and stops; then the study
    stops. A run that fails other than by diverging stops the study once the running ones end."""
    again = f"rerun the same command with --study_name {name} to continue"
    pending, running, slots = list(runs), {}, list(range(launcher.jobs))
    stopped, failed, waiting = [], [], set()
    forward = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}

    def stop(signum: int, _frame: object) -> None:
        stopped.extend(run.name for run, _ in running.values() if run.name not in stopped)
        for child in running:
            child.send_signal(forward[signum])
        stopped.append("")  # stopped, even between runs

    previous = {s: signal.signal(s, stop) for s in forward}
    try:
        while pending or running:
            for child, (run, slot) in list(running.items()):
                code = child.poll()
                if code is None:
                    continue
                del running[child]
                slots.append(slot)
                if code != 0 and not stopped and not done(recorded(study_dir / run.name)):
                    failed.append(f"{run.name} (exit status {code})")
            if stopped or failed:
                pending.clear()  # start nothing more; wait for the running ones to stop
            for run in list(pending):
                if not slots:
                    break
                run_dir = study_dir / run.name
                if done(recorded(run_dir)):
                    pending.remove(run)
                    if run.name not in waiting:
                        print(f"study {name}: {run.name} finished already, skipped", flush=True)
                    continue
                if run_dir.exists() and is_locked(run_dir):
                    if run.name not in waiting:
                        waiting.add(run.name)
                        print(f"study {name}: {run.name} is running in another process; waiting for it", flush=True)
                    continue
                pending.remove(run)
                argv = run.argv(study_dir) + (["--resume"] if run_dir.exists() else [])
                print(f"study {name}: {run.name}: python main.py {shlex.join(argv)}", flush=True)
                slot = slots.pop(0)
                running[launcher.start(argv, slot)] = (run, slot)
            if pending or running:
                time.sleep(POLL_S)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped:
        during = ", ".join(n for n in stopped if n)
        raise RunInterrupted(f"study {name} stopped" + (f" during {during}" if during else "") + f"; {again}")
    if failed:
        raise ToolError(f"study {name}: {', '.join(failed)} failed (the error is above); {again}")


def check_resources(args: argparse.Namespace, parser: argparse.ArgumentParser, gpus: list[str]) -> None:
    """More runs at once than the host can hold is a flag error, before anything runs."""
    if gpus and args.jobs * args.gpus_per_run > len(gpus):
        parser.error(
            f"--jobs {args.jobs} x --gpus_per_run {args.gpus_per_run} needs {args.jobs * args.gpus_per_run} GPUs; "
            f"this host has {len(gpus)}"
        )
    if not gpus and args.gpus_per_run > 1:
        parser.error(f"--gpus_per_run {args.gpus_per_run} needs GPUs; this host has none")
    if not gpus and args.jobs > len(usable_cpus()):
        parser.error(f"--jobs {args.jobs}: more runs at once than the {len(usable_cpus())} CPUs here")


def list_runs(runs: list[Planned], generation: list[Planned] | None, study_dir: Path) -> None:
    for index, run in enumerate(runs + (generation or [])):
        print(f"{index}\t{run.name}\tpython {MAIN.name} {shlex.join(run.argv(study_dir))}")
    if generation is None:
        print(
            f"then generation for each arm's chosen rate: listed from index {len(runs)} once every run above is done",
        )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Run the study's runs that are not done (or with --only, one; with --list, none), then generation for the
    chosen rates, then print the results and write the report in the study's directory."""
    name = args.study_name or f"study-{timestamp()}"
    study_dir = Path(args.output_dir) / name
    planned = plan(args, parser)
    match_existing(study_dir, planned)
    generation = generation_runs(args, parser, study_dir, planned)
    if args.list:
        return list_runs(planned, generation, study_dir)
    every = planned + (generation or [])
    if args.only is not None and args.only >= len(every):
        later = "" if generation is not None else " (generation runs are listed once the others are done)"
        parser.error(f"--only {args.only}: the study has runs 0 to {len(every) - 1} now{later}")
    gpus = visible_gpus()
    check_resources(args, parser, gpus)
    check_settings(study_dir, name, every, parser)
    launcher = Launcher(args, gpus)
    if args.only is not None:
        return execute([every[args.only]], study_dir, name, launcher)
    print(f"study {name}: {len(planned)} runs ({', '.join(r.name for r in planned)}) in {study_dir}", flush=True)
    execute(planned, study_dir, name, launcher)
    generation = generation_runs(args, parser, study_dir, planned)
    check_settings(study_dir, name, generation, parser)
    execute(generation, study_dir, name, launcher)
    print(study_report(study_dir, report_runs(study_dir, planned, generation)))
    print(f"\nreport: {study_dir / 'report.md'}")


def trained_results(study_dir: Path, planned: list[Planned]) -> list[dict]:
    """Each planned run's results.json, with where it is now."""
    return [recorded(study_dir / run.name) | {"run_dir": str(study_dir / run.name)} for run in planned]


def report_runs(study_dir: Path, planned: list[Planned], generation: list[Planned]) -> list[dict]:
    """The trained runs' results, each chosen one with the generation figures of its generation run."""
    runs = {run.name: results for run, results in zip(planned, trained_results(study_dir, planned), strict=True)}
    for run in generation:
        generated = recorded(study_dir / run.name)
        trained = runs[run.generation_of]
        trained.update({k: generated.get(k) for k in ("metrics", "generated_tokens", "generation_time_s")})
        trained["generation_tokens_per_s"] = generated.get("generation_tokens_per_s")
        trained["generations_csv"] = str(study_dir / run.name / "generations.csv")
        trained["generation_run"] = run.name
        trained["config"] = trained["config"] | {"eval_examples": generated["config"]["eval_examples"]}
    return list(runs.values())
