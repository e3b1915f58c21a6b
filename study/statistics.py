"""Runs pooled over seeds (a study's arms, `compare`'s columns), each arm's learning rate chosen on validation, paired
differences with their confidence interval, and the study's cost. Pure functions of results.json dicts (no torch, no
files).

The runs of a study share every setting but the arm (method, rank), the learning rate and the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from scipy import stats

from pipeline.settings import stop_step
from pipeline.summary import BUSY_MARK, TIMED, busy, figure_text, format_value, lookup, method_name
from utils import peft_arm_name

Run = dict[str, Any]
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Pooled:
    """A figure over seed replicates: mean, sample standard deviation (None with one value) and count."""

    mean: float
    std: float | None
    n: int

    def text(self) -> str:
        """`22.41 ± 0.35 (n=3)`; values all alike as `22.41 (n=3)`; one value alone as the tables show it."""
        number = format_value(self.mean)
        if self.std is None:
            return number
        if self.std == 0:
            return f"{number} (n={self.n})"
        decimals = len(number.split(".")[1]) if "." in number else 0
        return f"{number} ± {self.std:,.{decimals}f} (n={self.n})"


def pool(values: list[float | None]) -> Pooled | None:
    """Mean and sample spread of the values that exist and are finite; None when none is."""
    values = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not values:
        return None
    if len(set(values)) == 1:  # alike (a parameter count, a size): kept as it is, an int stays an int
        return Pooled(values[0], 0.0 if len(values) > 1 else None, len(values))
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return Pooled(mean, std, len(values))


def arm_name(run: Run) -> str:
    """The arm a run belongs to: base, full, a LoRA-family method with its rank (lora-r8, dora-r4, ...), or a peft
    arm's name (its config's file or folder, as the study names it)."""
    if run["mode"] == "peft":
        return peft_arm_name(run["config"]["peft_config"])
    method = run.get("method") or method_name(run["mode"], run.get("config", {}))
    return f"{method}-r{run['config']['lora_rank']}" if run["mode"] == "lora" else method


def learning_rate(run: Run) -> float | None:
    return None if run["mode"] == "base" else run.get("config", {}).get("learning_rate")


def seed(run: Run) -> int | None:
    return run.get("config", {}).get("seed")


def diverged(run: Run) -> bool:
    """Failed (a non-finite training loss stops a run as failed), or finished with a non-finite validation loss."""
    if run.get("status") == "failed":
        return True
    loss = run.get("val_loss")
    return run.get("status") == "finished" and (loss is None or not math.isfinite(loss))


@dataclass
class Rate:
    """One learning rate of an arm: its runs (a seed each) and their mean final validation loss, which exists when
    every seed finished with a finite one; with successive halving, their mean validation loss at the rung, and the
    step every seed stopped at when none went on (a stopped rate is never chosen)."""

    rate: float | None
    runs: list[Run]
    val_loss: Pooled | None = None
    diverged: bool = False
    rung_loss: Pooled | None = None
    stopped_at: int | None = None
    added: bool = False  # by widening, beyond the grid the study was given


@dataclass(frozen=True)
class Widening:
    """What widening did to an arm's grid: at most `limit` rates per side (--widen), those it added below and above."""

    limit: int
    below: tuple[float, ...] = ()
    above: tuple[float, ...] = ()


@dataclass
class Arm:
    """An arm's learning-rate grid and the rate chosen on mean final validation loss."""

    name: str
    rates: list[Rate]
    chosen: Rate | None = None
    at_edge: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Every rate diverged: the arm has no number to show."""
        return self.chosen is None and all(r.diverged for r in self.rates)

    @property
    def lora_family(self) -> bool:
        """A LoRA adapter (LoRA, DoRA, rsLoRA): trained by the `lora` command, or a `peft:` arm whose config is
        LoRA's (its recorded adapter config's peft_type), whatever the arm is named."""
        return all(
            run["mode"] == "lora" or (run.get("adapter_config") or {}).get("peft_type") == "LORA"
            for rate in self.rates
            for run in rate.runs
        )

    @property
    def one_rate(self) -> bool:
        """A trained arm that ran one learning rate: never tuned, so its choice is never bracketed."""
        return self.chosen is not None and self.chosen.rate is not None and len(self.rates) == 1

    @property
    def bracket(self) -> tuple[Rate, Rate] | None:
        """The rates either side of the chosen one, when it has a rate on both sides."""
        if self.chosen is None or self.at_edge or len(self.rates) < 2:
            return None
        i = self.rates.index(self.chosen)
        return self.rates[i - 1], self.rates[i + 1]


def whole_run_steps(run: Run) -> int | None:
    """The optimizer steps of the run's whole schedule, also for one stopped early."""
    stopped = run.get("stopped_early")
    return stopped["max_steps"] if stopped else run.get("total_steps") or run.get("optimizer_steps")


def rung_loss(run: Run, share: float) -> float | None:
    """The run's validation loss at the rung of `share` (--stop_at_share): recorded when it stopped there, else its
    validation logged at that step; None when it has none (stopped at another step, say), when that loss is not
    finite, or when the run diverged or failed (it ranks nowhere: `past_rung` says whether it is a result)."""
    if diverged(run):
        return None
    stopped = run.get("stopped_early")
    steps = whole_run_steps(run)
    step = stop_step(steps, share) if steps else None
    logged = [e["eval_loss"] for e in run.get("log_history") or [] if "eval_loss" in e and e.get("step") == step]
    loss = stopped["val_loss"] if stopped and stopped["step"] == step else logged[-1] if step and logged else None
    return loss if loss is not None and math.isfinite(loss) else None


def choose_rates(
    runs: list[Run], share: float | None = None, widenings: dict[str, Widening] | None = None
) -> list[Arm]:
    """Each arm's rates in ascending order, the rate with the lowest mean final validation loss over seeds chosen
    (never the test loss), a choice at either end of a grid of several rates flagged, an arm whose every rate
    diverged marked failed. A rate with a seed still unfinished (or stopped early) is neither chosen nor counted as
    diverged. With `share`, each rate's mean validation loss at that rung; with `widenings`, each arm's notes say
    whether its choice is bracketed or how often its grid was widened."""
    arms: dict[str, dict[float | None, list[Run]]] = {}
    for run in runs:
        arms.setdefault(arm_name(run), {}).setdefault(learning_rate(run), []).append(run)
    chosen_arms = []
    for name, by_rate in arms.items():
        widening = (widenings or {}).get(name)
        added = set(widening.below + widening.above) if widening else set()
        rates = []
        for rate in sorted(by_rate, key=lambda r: (r is None, r)):
            members = sorted(by_rate[rate], key=lambda r: seed(r) or 0)
            entry = Rate(rate, members, diverged=any(diverged(r) for r in members), added=rate in added)
            if not entry.diverged and all(r.get("status") == "finished" for r in members):
                entry.val_loss = pool([r.get("val_loss") for r in members])
            if all(r.get("status") == "stopped_early" for r in members):
                entry.stopped_at = max(r["stopped_early"]["step"] for r in members)
            if share and not entry.diverged:
                losses = [rung_loss(r, share) for r in members]
                entry.rung_loss = pool(losses) if None not in losses else None
            rates.append(entry)
        arm = Arm(name, rates)
        candidates = [r for r in rates if r.val_loss is not None]
        if candidates:
            arm.chosen = min(candidates, key=lambda r: r.val_loss.mean)
            arm.at_edge = len(rates) > 1 and arm.chosen in (rates[0], rates[-1])
        arm.notes += bracket_notes(arm, widening)
        if arm.failed:
            arm.notes.append("every learning rate diverged (non-finite loss or failed): no figure")
        elif any(r.diverged for r in rates):
            arm.notes.append("diverged at " + ", ".join(rate_text(r.rate) for r in rates if r.diverged))
        chosen_arms.append(arm)
    return chosen_arms


def bracket_notes(arm: Arm, widening: Widening | None) -> list[str]:
    """`bracketed by A and B`; one rate, not tuned; or per edge the chosen rate is at, how many widenings it stayed
    there after."""
    if arm.bracket:
        return ["bracketed by " + " and ".join(f"{rate_text(r.rate)}{rate_state(r)}" for r in arm.bracket)]
    if arm.one_rate:
        return ["one rate, not tuned: not bracketed"]  # no sweep, or --widen 0 for a method without a list
    if not arm.at_edge:
        return []
    limit = widening.limit if widening else 0
    sides = [("lowest", widening.below if widening else ())] * (arm.chosen is arm.rates[0])
    sides += [("highest", widening.above if widening else ())] * (arm.chosen is arm.rates[-1])
    return [
        f"best at the {side} rate: still at the edge after {len(added)} widening{'s' * (len(added) != 1)} "
        f"(--widen {limit})"
        for side, added in sides
    ]


def rate_state(rate: Rate) -> str:
    """What became of a rate beside the chosen one, when it did not finish."""
    if rate.diverged:
        return " (diverged)"
    return f" (stopped at step {rate.stopped_at})" if rate.stopped_at else ""


def rate_text(rate: float | None) -> str:
    """A learning rate as a person writes it: 3e-4, 1e-5."""
    if rate is None:
        return "-"
    mantissa, exponent = f"{rate:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def pooled_figure(runs: list[Run], key: str) -> Pooled | None:
    return pool([lookup(r, key) for r in runs])


def pooled_text(runs: list[Run], key: str) -> str:
    """A figure of replicate runs as the tables show it: one run's as it is, several runs' mean ± sample SD (n, the
    runs that recorded a finite value: one alone still says n=1); a time figure marked when any run's machine was
    busy."""
    if len(runs) == 1:
        return figure_text(runs[0], key)
    pooled = pooled_figure(runs, key)
    if pooled is None:
        return "-"
    text = pooled.text() if pooled.n > 1 else f"{pooled.text()} (n=1)"
    return text + (BUSY_MARK if key in TIMED and any(busy(r) for r in runs) else "")


@dataclass(frozen=True)
class Difference:
    """An arm's figure minus a reference arm's, paired by seed, with its confidence interval (None with one pair)."""

    arm: str
    reference: str
    key: str
    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def beyond_noise(self) -> bool | None:
        """Whether the interval excludes zero; None without an interval."""
        return None if self.low is None else bool(self.low > 0 or self.high < 0)

    def verdict(self) -> str:
        if self.beyond_noise is None:
            return "no interval (one seed, or no spread between seeds): the noise is unknown"
        side = "higher" if self.mean > 0 else "lower"
        if self.beyond_noise:
            return f"{side} than {self.reference}: the difference is larger than the noise"
        return f"not distinguishable from {self.reference}: the difference is within the noise"


def paired_difference(
    runs: list[Run], reference: list[Run], key: str, arm: str = "", reference_name: str = ""
) -> Difference | None:
    """mean(run - reference) of `key` over the seeds both have, with a Student-t interval at CONFIDENCE
    (scipy.stats.t); None when no seed pairs up."""
    by_seed = {seed(r): lookup(r, key) for r in reference}
    pairs = [
        lookup(r, key) - by_seed[seed(r)]
        for r in runs
        if by_seed.get(seed(r)) is not None and lookup(r, key) is not None
    ]
    pairs = [d for d in pairs if math.isfinite(d)]
    if not pairs:
        return None
    pooled = pool(pairs)
    low = high = None
    if pooled.n > 1 and pooled.std > 0:  # identical differences (runs that are not really replicates): no interval
        low, high = map(
            float, stats.t.interval(CONFIDENCE, pooled.n - 1, loc=pooled.mean, scale=pooled.std / math.sqrt(pooled.n))
        )
    return Difference(arm, reference_name, key, pooled.mean, low, high, pooled.n)


def paired_differences(columns: dict[str, list[Run]], references: list[str]) -> list[Difference]:
    """Test loss and test perplexity of every column (its replicate runs) against each of `references` (names of
    columns), paired by seed; the base model, which trains nothing, is never the one compared."""
    found = []
    for reference in references:
        for name, runs in columns.items():
            if name == reference or all(r["mode"] == "base" for r in runs):
                continue
            for key in ("test_loss", "test_perplexity"):
                difference = paired_difference(runs, columns[reference], key, name, reference)
                if difference:
                    found.append(difference)
    return found


def arm_differences(arms: list[Arm]) -> list[Difference]:
    """Every arm at its chosen rate against full fine-tuning and against the base model (each at its own chosen
    rate), paired by seed."""
    chosen = {a.name: a.chosen.runs for a in arms if a.chosen}
    return paired_differences(chosen, [name for name in ("full", "base") if name in chosen])


def rate_multiples(arms: list[Arm]) -> dict[str, float]:
    """Each LoRA-family arm's chosen rate as a multiple of full fine-tuning's chosen rate."""
    full = next((a for a in arms if a.name == "full" and a.chosen), None)
    if full is None:
        return {}
    return {a.name: a.chosen.rate / full.chosen.rate for a in arms if a.lora_family and a.chosen}


def device_hours(run: Run) -> tuple[float, str]:
    """(hours x devices, unit) of a run's training and generation: GPU-hours on CUDA (its processes x the GPUs each
    drives), else CPU-core-hours (its processes x the torch threads each ran)."""
    seconds = (run.get("train_time_s") or 0) + (run.get("generation_time_s") or 0)
    environment = run.get("environment") or {}
    processes = run.get("world_size") or 1
    if environment.get("device") == "cuda":
        return seconds / 3600 * processes * max(1, run.get("gpus_per_process") or 1), "GPU-hours"
    return seconds / 3600 * processes * (environment.get("cpu_threads") or 1), "CPU-core-hours"


def device_hours_to_the_end(run: Run) -> float:
    """A stopped run's device-hours had it trained to the end: the first step (start-up, compiling) paid once, the
    steps after it scaled from the ones it ran to the ones its whole run has. Without a first step's time, or with
    only the first step run, every step counts alike."""
    hours = device_hours(run)[0]
    seconds = (run.get("train_time_s") or 0) + (run.get("generation_time_s") or 0)
    once = hours * (run.get("first_step_s") or 0) / seconds if seconds else 0
    stopped = run["stopped_early"]
    if not once or stopped["step"] == 1:
        return hours * stopped["max_steps"] / stopped["step"]
    return once + (hours - once) * (stopped["max_steps"] - 1) / (stopped["step"] - 1)


def study_cost(runs: list[Run], arms: list[Arm]) -> dict[str, Any]:
    """Runs, total training and generation seconds, device-hours, and what the sweep and the seeds multiplied the
    device-hours by: all runs over the chosen rates' runs (every seed), and those over the chosen rates' runs of
    the first seed; with runs stopped early (halving), the device-hours the same runs would have taken trained to
    the end."""
    hours = [device_hours(r) for r in runs]
    units = sorted({unit for _, unit in hours})
    per_unit = {unit: sum(h for h, u in hours if u == unit) for unit in units}
    # GPU-hours and CPU-core-hours do not add up: with both, the totals are per unit and the factors unknown
    total = sum(per_unit.values()) if len(units) == 1 else None
    chosen = [r for a in arms if a.chosen for r in a.chosen.runs]
    chosen_hours = sum(device_hours(r)[0] for r in chosen)
    first = [a.chosen.runs[0] for a in arms if a.chosen]
    first_hours = sum(device_hours(r)[0] for r in first)
    stopped = [r for r in runs if r.get("status") == "stopped_early"]
    to_the_end = sum(device_hours_to_the_end(r) for r in stopped)
    without_halving = total - sum(device_hours(r)[0] for r in stopped) + to_the_end if total is not None else None
    return {
        "stopped_early_runs": len(stopped),
        "device_hours_without_halving": without_halving if stopped else None,
        "runs": len(runs),
        "generation_runs": sum(1 for r in runs if r.get("generation_run")),  # a study's generation at chosen rates
        "train_time_s": sum(r.get("train_time_s") or 0 for r in runs),
        "generation_time_s": sum(r.get("generation_time_s") or 0 for r in runs),
        "device_hours": total,
        "device_hours_unit": units[0] if total is not None else None,
        "device_hours_by_unit": per_unit,
        "sweep_factor": total / chosen_hours if total is not None and chosen_hours else None,
        "seeds_factor": chosen_hours / first_hours if total is not None and first_hours else None,
        "seeds": sorted({seed(r) for r in runs if seed(r) is not None}),
    }
