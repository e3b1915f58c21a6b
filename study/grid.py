"""Each arm's learning-rate grid as the study grows it: widened outward while the chosen rate is at an edge, and
with successive halving (Jamieson & Talwalkar 2016; Li et al. 2018) every rate trained to a rung and only the best
continued. Pure functions of results.json dicts: a study run again derives the same grid from what it finds."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

from pipeline.settings import stop_step
from study.statistics import Arm, Run, Widening, choose_rates, diverged, rung_loss, whole_run_steps
from utils import ToolError

HALF_DECADE = 10**0.5

DIVERGED = "the training loss became"  # how a run that stopped on a non-finite loss records its error


def done(results: Run, to_rung: bool = False) -> bool:
    """Finished, or stopped on a non-finite loss: a result either way, never run again; for a run that goes only to
    the rung, also stopped early there."""
    return (
        results.get("status") == "finished"
        or (results.get("status") == "failed" and DIVERGED in str(results.get("error")))
        or (to_rung and results.get("status") == "stopped_early")
    )


def sweep(centre: float, n: int) -> list[float]:
    """--lr_sweep's n rates, half a decade apart centred on `centre`, to 3 significant digits as run names hold
    them."""
    return [float(f"{centre * HALF_DECADE ** (i - (n - 1) / 2):.3g}") for i in range(n)]


def next_rate(initial: list[float], side: str, k: int) -> float:
    """The k-th rate added outward on `side` ("below" or "above") of the ascending grid the study was given, at
    that grid's own spacing (the mean ratio of neighbours; half a decade for one rate), to 3 significant digits as
    run names hold it."""
    step = (initial[-1] / initial[0]) ** (1 / (len(initial) - 1)) if len(initial) > 1 else HALF_DECADE
    return float(f"{initial[0] / step**k if side == 'below' else initial[-1] * step**k:.3g}")


def next_sweep_rate(centre: float, n: int, side: str, k: int) -> float:
    """The k-th rate added outward on `side` of sweep(centre, n): the end on that side of the sweep k rates wider
    each way, so on the sweep's own lattice and rounded as it rounds (not from its rounded rates)."""
    wider = sweep(centre, n + 2 * k)
    return wider[0] if side == "below" else wider[-1]


@dataclass
class ArmGrid:
    """An arm's rates so far (ascending), the widening round each entered in (0: the grid asked for), the rates
    that train to the end (the others stop at the rung), and whether nothing is left to run or add."""

    rates: list[float]
    rounds: dict[float, int]
    to_end: set[float] = field(default_factory=set)
    widening: Widening = field(default_factory=lambda: Widening(0))
    complete: bool = False


def grow(
    initial: list[float],
    records: Callable[[float], list[Run]],
    widen: int,
    halving: int | None = None,
    outward: Callable[[str, int], float] | None = None,
) -> ArmGrid:
    """The grid the runs found so far call for. `records(rate)` gives each seed's results at a rate ({} when not
    run). Rounds, each once every run it needs is done: with `halving` ETA, every rate to the rung (1/ETA of the
    steps), then the best ceil(n/ETA) by mean validation loss there to the end; the rate chosen on final
    validation loss; at an edge of the grid, the next rate outward on that side (at most `widen` per side), which
    enters at the rung like any other (`outward(side, k)` gives the k-th; by default next_rate of `initial`). A
    diverged rate is an edge's neighbour like any: it brackets. An arm whose every rate diverged widens downward."""
    grid = ArmGrid(sorted(initial), dict.fromkeys(initial, 0), widening=Widening(widen))
    outward = outward or partial(next_rate, sorted(initial))
    share = 1 / halving if halving else None
    while True:
        found = {rate: records(rate) for rate in grid.rates}
        if share:
            if not all(past_rung(r, share) for runs in found.values() for r in runs):
                return grid
            rung = {r.rate: r.rung_loss.mean for r in arm_of(found, share).rates if r.rung_loss}
            grid.to_end |= set(sorted(rung, key=rung.get)[: math.ceil(len(grid.rates) / halving)])
        else:
            grid.to_end = set(grid.rates)
        if not all(done(r) for rate in grid.to_end for r in found[rate]):
            return grid
        round_number = max(grid.rounds.values()) + 1
        sides = [side for side in edges(arm_of(found, share)) if len(getattr(grid.widening, side)) < widen]
        for side in sides:
            taken = getattr(grid.widening, side)
            rate = outward(side, len(taken) + 1)
            grid.rates = sorted([*grid.rates, rate])
            grid.rounds[rate] = round_number
            grid.widening = replace(grid.widening, **{side: (*taken, rate)})
        if not sides:
            grid.complete = True
            return grid


def past_rung(run: Run, share: float) -> bool:
    """Done to the rung, or past it on its way to the end (a run interrupted after it, say). A run stopped at another
    rung, or finished with no validation at this one (a study run with another --halving), has no loss to rank here:
    refused, never ranked on another step's loss."""
    if rung_loss(run, share) is not None or (done(run) and (run.get("status") != "finished" or diverged(run))):
        return True  # a rate that diverged, before the rung or after it, is a result, not a refusal
    if run.get("status") not in ("stopped_early", "finished"):
        return False  # running, or crashed (out of memory, say): run again
    stopped, steps = run.get("stopped_early"), whole_run_steps(run)
    if stopped and stopped["step"] == stop_step(steps, share):
        return True  # stopped at this rung with a validation loss that is not finite: diverged there
    found = f"stopped at step {stopped['step']}" if stopped else "has no validation loss at the rung step"
    raise ToolError(
        f"{run.get('run_dir')} {found}, not at this study's rung (--halving {1 / share:g}: step "
        f"{stop_step(steps, share)} of {steps}): run the study with the --halving it was made with, or as a new study"
    )


def arm_of(found: dict[float, list[Run]], share: float | None) -> Arm:
    """The arm of these runs (every one has run), its rate chosen as the report chooses it."""
    (arm,) = choose_rates([r for runs in found.values() for r in runs], share)
    return arm


def edges(arm: Arm) -> list[str]:
    """The sides ("below", "above") on which the chosen rate is the last of the grid; below when every rate
    diverged."""
    if arm.chosen is None:
        return ["below"] if arm.failed else []
    return [side for side, end in (("below", arm.rates[0]), ("above", arm.rates[-1])) if arm.chosen is end]
