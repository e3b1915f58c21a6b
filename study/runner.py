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
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from pipeline.run_directory import is_locked
from pipeline.settings import METHOD_DEFAULTS, SETTING_KINDS, RunSettings
from pipeline.summary import busy
from study.grid import ArmGrid, done, grow, next_rate, next_sweep_rate, sweep
from study.report import NOT_ADAPTER_SETTINGS, canonical, study_report
from study.statistics import arm_name, choose_rates, learning_rate, rate_text, seed
from utils import CONCURRENT_RUNS_VARIABLE, RunInterrupted, ToolError, peft_arm_name, peft_config_file, timestamp

MAIN = Path(__file__).resolve().parents[1] / "main.py"
LORA_VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}}
RESERVED_ARM_NAMES = r"base|full|(lora|dora|rslora)(-r\d+)?"  # what a peft: arm may not be named
POLL_S = 1.0  # how often the study looks at runs it waits for
DEFAULT_WIDEN = 2  # rates added per side and arm when a study sweeps rates and --widen is not given


@dataclass
class StudySettings:
    """What `study` is told beyond the settings its runs share."""

    arms: list[str]
    lora_ranks: list[int]
    study_name: str | None
    learning_rates: list[tuple[str | None, list[float]]] | None = None
    lr_sweep: int | None = None
    seeds: list[int] | None = None
    jobs: int = 1
    gpus_per_run: int = 1
    only: int | None = None
    list: bool = False
    widen: int | None = None
    halving: int | None = None

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> StudySettings:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclass
class Planned:
    """One run of the study: its arm, its settings (its name in the study's directory is `settings.run_name`), and
    for a generation run the trained run whose saved model it continues with."""

    arm: str
    settings: RunSettings
    generation_of: str | None = None

    @property
    def name(self) -> str:
        return self.settings.run_name

    @property
    def key(self) -> tuple[str, float | None, int]:
        return self.arm, self.settings.learning_rate, self.settings.seed

    def argv(self, parser: argparse.ArgumentParser) -> list[str]:
        """The one place a run's settings become its command line: the arguments of `python main.py`."""
        return self.settings.to_argv(RunSettings.from_flags(parser.parse_args([self.settings.command])))


def peft_arm_names(paths: list[str]) -> list[str]:
    """The run name of each `peft:PATH` arm (utils.peft_arm_name). ValueError for a path that holds no PEFT config
    (PEFT itself checks the rest, in the arm's own process)."""
    for path in paths:
        try:
            config = json.loads(peft_config_file(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"peft:{path}: not a readable JSON file ({e})") from None
        if not isinstance(config, dict) or not config.get("peft_type"):
            raise ValueError(f"peft:{path}: not a PEFT config (it has no peft_type)")
    names = [peft_arm_name(path) for path in paths]
    for path, name in zip(paths, names, strict=True):
        if re.fullmatch(RESERVED_ARM_NAMES, name):
            raise ValueError(f"peft:{path}: its arm would be named {name}, as the study names its own arms; rename it")
    return names


def arms(study: StudySettings) -> list[tuple[str, str, dict]]:
    """(arm, the method --learning_rates names it by, the fields its runs replace in the study's settings) of every
    arm, in the order they run. Two arms of one name are an error."""
    planned = []
    for arm in study.arms:
        if arm.startswith("peft:"):
            path = arm.removeprefix("peft:")
            (name,) = peft_arm_names([path])
            planned.append((name, name, {"command": "peft", "peft_config": path}))
        elif arm == "base":
            planned.append(("base", "base", {"command": "evaluate"}))
        elif arm == "full":
            planned.append(("full", "full", {"command": "full"}))
        else:
            lora = {"command": "lora", "use_dora": False, "use_rslora": False} | LORA_VARIANTS[arm]
            planned += [(f"{arm}-r{r}", arm, lora | {"lora_rank": r}) for r in study.lora_ranks]
    names = [name for name, _, _ in planned]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ToolError(
            f"two arms would be named {', '.join(clashes)}: a peft: arm is named after its config's file or folder; "
            "rename one"
        )
    return planned


def method_defaults(run: RunSettings) -> dict:
    """The run's learning rate and weight decay: the study's when it set them, else its method's own; none for a
    run that trains nothing (its other training settings are left out of its config and command by its command)."""
    if run.command not in METHOD_DEFAULTS:
        return {"learning_rate": None, "weight_decay": None}
    rate, decay = METHOD_DEFAULTS[run.command]
    return {
        "learning_rate": run.learning_rate if run.learning_rate is not None else rate,
        "weight_decay": run.weight_decay if run.weight_decay is not None else decay,
    }


def run_settings(shared: RunSettings, study_dir: Path, name: str, **fields) -> RunSettings:
    """The study's settings with a run's own fields replaced, in the study's directory under `name`."""
    run = replace(shared, **fields, output_dir=str(study_dir), run_name=name, resume=None)
    return replace(run, **method_defaults(run))


def rate_grid(study: StudySettings, method: str, default: float) -> tuple[list[float], Callable[[str, int], float]]:
    """A method's learning rates, and the k-th rate widening adds outward on a side: its --learning_rates list,
    else the plain list, at that grid's spacing; else --lr_sweep's N rates half a decade apart centred on `default`
    (its own, or --learning_rate), on the sweep's own lattice; else `default` alone, half a decade apart."""
    if study.lr_sweep:
        return sweep(default, study.lr_sweep), partial(next_sweep_rate, default, study.lr_sweep)
    lists = dict(study.learning_rates or [])
    rates = lists.get(method) or lists.get(None) or [default]
    return rates, partial(next_rate, sorted(rates))


@dataclass
class Plan:
    """The study's runs as far as the runs done so far let it see (each arm's grid grown by widening, and with
    halving each rate's target), in the order they were added; and whether nothing is left to run or add."""

    runs: list[Planned]
    grids: dict[str, ArmGrid]
    complete: bool


def widen_limit(study: StudySettings) -> int:
    """--widen, else DEFAULT_WIDEN when the study sweeps rates (--learning_rates, --lr_sweep), else 0."""
    if study.widen is not None:
        return study.widen
    return DEFAULT_WIDEN if study.learning_rates or study.lr_sweep else 0


def planned_runs(study: StudySettings, shared: RunSettings, study_dir: Path) -> Plan:
    """Every (arm, rate, seed) run: the shared settings with each run's own fields replaced (command, method, rank,
    rate, seed; each method's own learning rate and weight decay unless the study set them), each arm's grid grown
    from the runs in the study's directory (study/grid.py). Names say the rate and seed only where the study has
    several (`full`, `lora-r8-lr3e-4`, `lora-r8-lr3e-4-s2025`); a run already in the study keeps its directory,
    whatever it is named. An arm that sweeps rates (several, or one to widen) trains them without generation; with
    --halving, a rate that goes only to the rung trains with --stop_at_share."""
    seeds = study.seeds or [shared.seed]
    existing = existing_runs(study_dir)
    ordered, grids = [], {}
    for order, (arm, method, fields) in enumerate(arms(study)):
        if fields["command"] == "evaluate":
            for s in seeds:
                name = existing.get((arm, None, s), arm + (f"-s{s}" if len(seeds) > 1 else ""))
                run = Planned(arm, run_settings(shared, study_dir, name, **fields, seed=s))
                ordered.append(((0, order, 0, s), run))
            continue
        grids[arm], runs = trained_arm(study, shared, study_dir, existing, arm, method, fields)
        ordered += [((grids[arm].rounds[run.settings.learning_rate], order, *run.key[1:]), run) for run in runs]
    runs = [run for _, run in sorted(ordered, key=lambda pair: pair[0])]
    complete = all(g.complete for g in grids.values()) and all(is_done(study_dir, run) for run in runs)
    return Plan(runs, grids, complete)


def trained_arm(
    study: StudySettings, shared: RunSettings, study_dir: Path, existing: dict, arm: str, method: str, fields: dict
) -> tuple[ArmGrid, list[Planned]]:
    """A trained arm's grid, grown from the runs found, and its runs: each rate once per seed."""
    seeds = study.seeds or [shared.seed]
    widen = widen_limit(study)
    share = 1 / study.halving if study.halving else None
    initial, outward = rate_grid(study, method, shared.learning_rate or METHOD_DEFAULTS[fields["command"]][0])
    swept = len(initial) > 1 or widen > 0

    def planned(rate: float, s: int, to_rung: bool = False) -> Planned:
        name = arm + (f"-lr{rate_text(rate)}" if swept else "") + (f"-s{s}" if len(seeds) > 1 else "")
        own = fields | {"seed": s, "learning_rate": rate, "stop_at_share": share if to_rung else None}
        own |= {"eval_examples": 0} if swept else {}  # generation only at the chosen rate, later
        return Planned(arm, run_settings(shared, study_dir, existing.get((arm, rate, s), name), **own))

    def records(rate: float) -> list[dict]:
        return [recorded(study_dir / planned(rate, s).name) for s in seeds]

    grid = grow(initial, records, widen, study.halving, outward)
    runs = [planned(rate, s, to_rung=bool(share) and rate not in grid.to_end) for rate in grid.rates for s in seeds]
    return grid, runs


def is_done(study_dir: Path, run: Planned) -> bool:
    """Whether the run has reached what it is planned to: the end, or the rung (--stop_at_share)."""
    return done(recorded(study_dir / run.name), to_rung=run.settings.stop_at_share is not None)


def recorded(run_dir: Path) -> dict:
    """The run's results.json; empty when it has none that can be read."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def existing_runs(study_dir: Path) -> dict[tuple[str, float | None, int | None], str]:
    """The directory name of each run already in the study, by arm, rate and seed: a study that gains rates or
    seeds (and so longer names) keeps the runs it has."""
    existing = {}
    for path in sorted(study_dir.glob("*/results.json")):
        results = recorded(path.parent)
        # a run stopped before its settings were recorded has no arm yet: it is found again by its name
        if results.get("mode") in ("base", "full", "lora", "peft") and "config" in results:
            existing.setdefault((arm_name(results), learning_rate(results), seed(results)), path.parent.name)
    return existing


# A swept arm's runs train with --eval_examples 0 and generate in runs of their own: for them, not a difference.
NOT_CHECKED = ("eval_examples",)


def changed_settings(config: dict, expected: RunSettings) -> list[str]:
    """The settings (bookkeeping aside) whose recorded value differs from what this study would run with. A run of
    a fraction recorded before --eval_seed drew its validation and test rows with its --seed: this study's only when
    that seed is this study's --eval_seed."""
    changed = [
        f"--{key} {config.get(key)} -> {value}"
        for key, value in expected.to_config().items()
        if key in config
        and SETTING_KINDS[key] != "bookkeeping"
        and not (key in NOT_CHECKED and expected.eval_examples == 0)
        and json.dumps(canonical(key, config[key])) != json.dumps(canonical(key, value))
    ]
    if config.get("data_fraction", 1) < 1 and "eval_seed" not in config and config.get("seed") != expected.eval_seed:
        changed.append(f"--eval_seed unrecorded: rows drawn with --seed {config.get('seed')} -> {expected.eval_seed}")
    return changed


# Reading a PEFT config as PEFT does needs peft, and so torch, which the study never imports: a process of its own.
REBUILD = (
    "import json, sys\nfrom pipeline.adapters import peft_file_adapter_config\nfrom utils import ToolError\n"
    "try: print(json.dumps([peft_file_adapter_config(*arm) for arm in json.loads(sys.argv[1])]))\n"
    "except ToolError as e: sys.exit(str(e))"
)


def peft_file_adapter_configs(arms: list[tuple[str, str, str | None]]) -> list[dict]:
    """For each (PEFT config file, model, revision), the adapter config a run of the file would record now
    (pipeline.adapters.peft_file_adapter_config)."""
    done = subprocess.run(
        [sys.executable, "-c", REBUILD, json.dumps(arms)], cwd=MAIN.parent, capture_output=True, text=True
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise ToolError(f"could not read the peft: arms' config files as PEFT does: {lines[-1]}")
    return json.loads(done.stdout.splitlines()[-1])


def changed_adapter(recorded_config: dict | None, now: dict | None) -> list[str]:
    """The keys of the adapter config a peft: arm recorded whose value its config file now gives otherwise, read
    as PEFT reads it: a key deleted from the file counts when PEFT's default differs from what the arm trained with.
    Keys that PEFT of the arm's version did not have, or that say where the adapter was loaded, do not count."""
    if not recorded_config or not now:
        return []

    def canonical_value(value: object) -> str:  # PEFT keeps module names as a set: written as a sorted list
        return json.dumps(sorted(value, key=str) if isinstance(value, list) else value)

    return [
        f"{key} {value} -> {now[key]}"
        for key, value in recorded_config.items()
        if key not in NOT_ADAPTER_SETTINGS and key in now and canonical_value(value) != canonical_value(now[key])
    ]


def check_settings(study_dir: Path, name: str, planned: list[Planned]) -> None:
    """Before any run starts: a run (finished or not) recorded with other settings than this command gives it."""
    records = [recorded(study_dir / run.name) for run in planned]
    peft_arms = {
        run.name: (
            str(Path(run.settings.peft_config).resolve()),
            record["config"]["model"],
            record.get("model_revision"),
        )
        for run, record in zip(planned, records, strict=True)
        if run.settings.peft_config and record.get("adapter_config") and "model" in record.get("config", {})
    }
    arms = sorted(set(peft_arms.values()), key=str)
    now = dict(zip(arms, peft_file_adapter_configs(arms), strict=True)) if arms else {}
    for run, record in zip(planned, records, strict=True):
        changed = changed_settings(record.get("config", {}), run.settings)
        changed += changed_adapter(record.get("adapter_config"), now.get(peft_arms.get(run.name)))
        if changed:
            raise ToolError(
                f"study {name}: {run.name} was started with other settings ({', '.join(changed)}); "
                "give this study another --study_name"
            )


def generation_runs(shared: RunSettings, study_dir: Path, plan: Plan) -> list[Planned] | None:
    """Generation for each arm's chosen rate (every seed) where its runs trained without it: an `evaluate` of the
    saved model (with the adapter on the same base for LoRA). None until the plan is complete (every grid grown,
    every run done)."""
    if not plan.complete:
        return None
    planned = plan.runs
    records = trained_results(study_dir, planned)
    if shared.eval_examples == 0:
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
            fields = {"command": "evaluate", "seed": trained.settings.seed, **model}
            settings = run_settings(shared, study_dir, f"{trained.name}-generation", **fields)
            found.append(Planned(arm.name, settings, generation_of=trained.name))
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

    def __init__(self, study: StudySettings, gpus: list[str]) -> None:
        self.jobs, self.per_run, self.gpus = study.jobs, study.gpus_per_run, gpus
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


def execute(
    runs: list[Planned], study_dir: Path, name: str, launcher: Launcher, parser: argparse.ArgumentParser
) -> None:
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
                if code != 0 and not stopped and not is_done(study_dir, run):
                    failed.append(f"{run.name} (exit status {code})")
            if stopped or failed:
                pending.clear()  # start nothing more; wait for the running ones to stop
            for run in list(pending):
                if not slots or stopped:  # a signal while this loop starts runs: start no more
                    break
                run_dir = study_dir / run.name
                if is_done(study_dir, run):
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
                argv = run.argv(parser) + (["--resume"] if run_dir.exists() else [])
                print(f"study {name}: {run.name}: python main.py {shlex.join(argv)}", flush=True)
                slot = slots.pop(0)
                child = launcher.start(argv, slot)
                running[child] = (run, slot)
                if stopped:  # the signal came while this run was being started: it stops too
                    stopped.append(run.name)
                    child.send_signal(signal.SIGTERM)
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


def check_resources(study: StudySettings, parser: argparse.ArgumentParser, gpus: list[str]) -> None:
    """More runs at once than the host can hold is a flag error, before anything runs."""
    jobs, per_run = study.jobs, study.gpus_per_run
    if gpus and jobs * per_run > len(gpus):
        parser.error(f"--jobs {jobs} x --gpus_per_run {per_run} needs {jobs * per_run} GPUs; this host has {len(gpus)}")
    if not gpus and per_run > 1:
        parser.error(f"--gpus_per_run {per_run} needs GPUs; this host has none")
    if not gpus and jobs > len(usable_cpus()):
        parser.error(f"--jobs {jobs}: more runs at once than the {len(usable_cpus())} CPUs here")


def list_runs(plan: Plan, generation: list[Planned] | None, study_dir: Path, parser: argparse.ArgumentParser) -> None:
    """Every run as far as the plan sees (index, name, command), which of them are not done, and what comes once
    they are: more rates or the continuation of the best after the rung, or the generation runs."""
    every = plan.runs + (generation or [])
    for index, run in enumerate(every):
        print(f"{index}\t{run.name}\tpython {MAIN.name} {shlex.join(run.argv(parser))}")
    pending = [str(i) for i, run in enumerate(every) if not is_done(study_dir, run)]
    print(f"not done: {','.join(pending)}" if pending else "not done: none")
    if not plan.complete:
        print("then, once these are done: --list again (widening may add rates, halving continues the best)")
    elif generation is None:
        print(f"then generation for each arm's chosen rate: listed from index {len(plan.runs)} once those are done")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Run the study's runs that are not done (or with --only, one; with --list, none), round after round while
    widening and halving add runs, then generation for the chosen rates, then print the results and write the
    report in the study's directory."""
    study, shared = StudySettings.from_flags(args), RunSettings.from_flags(args)
    name = study.study_name or f"study-{timestamp()}"
    study_dir = Path(shared.output_dir) / name
    plan = planned_runs(study, shared, study_dir)
    generation = generation_runs(shared, study_dir, plan)
    if study.list:
        return list_runs(plan, generation, study_dir, parser)
    every = plan.runs + (generation or [])
    if study.only is not None and study.only >= len(every):
        later = "" if generation is not None else " (runs added later are listed once those they follow are done)"
        parser.error(f"--only {study.only}: the study has runs 0 to {len(every) - 1} now{later}")
    gpus = visible_gpus()
    check_resources(study, parser, gpus)
    check_settings(study_dir, name, every)
    launcher = Launcher(study, gpus)
    if study.only is not None:
        return execute([every[study.only]], study_dir, name, launcher, parser)
    print(f"study {name}: {len(plan.runs)} runs ({', '.join(r.name for r in plan.runs)}) in {study_dir}", flush=True)
    runs = plan.runs  # the first round names the runs it skips; later ones run only what is left
    while True:
        execute(runs, study_dir, name, launcher, parser)
        short = [run.name for run in runs if not is_done(study_dir, run)]
        if short:  # each ended without an error, yet short of its target: another round would start it again
            raise ToolError(
                f"study {name}: {', '.join(short)} ended short of what it was run for; see its results.json"
            )
        plan = planned_runs(study, shared, study_dir)
        if plan.complete:
            break
        runs = [run for run in plan.runs if not is_done(study_dir, run)]
        listed = [run.name + (" (to the rung)" if run.settings.stop_at_share else "") for run in runs]
        print(f"study {name}: next round: {', '.join(listed)}", flush=True)
        check_settings(study_dir, name, runs)
    generation = generation_runs(shared, study_dir, plan)
    check_settings(study_dir, name, generation)
    execute(generation, study_dir, name, launcher, parser)
    runs = report_runs(study_dir, plan.runs, generation)
    widenings = {arm: grid.widening for arm, grid in plan.grids.items()}
    print(study_report(study_dir, runs, 1 / study.halving if study.halving else None, widenings))
    print(f"\nreport: {study_dir / 'report.md'}")


def trained_results(study_dir: Path, planned: list[Planned]) -> list[dict]:
    """Each planned run's results.json, with where it is now. The base arm is the model the study's runs start from,
    whatever `evaluate` recorded: a --model that a run of this tool saved is recorded as mode `saved`."""
    found = []
    for run in planned:
        results = recorded(study_dir / run.name) | {"run_dir": str(study_dir / run.name)}
        if run.arm == "base" and results.get("mode") == "saved":
            results |= {"mode": "base", "method": "base", "trainable_params": 0}
        found.append(results)
    return found


def report_runs(study_dir: Path, planned: list[Planned], generation: list[Planned]) -> list[dict]:
    """The trained runs' results, each chosen one with the generation figures of its generation run."""
    runs = {run.name: results for run, results in zip(planned, trained_results(study_dir, planned), strict=True)}
    for run in generation:
        generated = recorded(study_dir / run.name)
        trained = runs[run.generation_of]
        figures = ("metrics", "generated_tokens", "generation_time_s", "generation_tokens_per_s")
        trained.update({k: generated.get(k) for k in figures})
        trained["generations_csv"] = str(study_dir / run.name / "generations.csv")
        trained["generation_run"] = run.name
        trained["config"] = trained["config"] | {"eval_examples": generated["config"]["eval_examples"]}
        if busy(generated):  # its generation figures were taken on a busy machine: the run's figures carry the mark
            trained["machine_load"] = (trained.get("machine_load") or {}) | {"busy": True}
    return list(runs.values())
