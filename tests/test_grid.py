"""How a study grows each arm's learning-rate grid (widening, successive halving), from planted results.json dicts,
round after round as the study runs them (fast: no training)."""

from __future__ import annotations

import json
import math

import pytest

from study import statistics
from study.grid import DIVERGED, done, grow, next_rate, past_rung
from utils import ToolError

SEEDS = (1, 2)
RUNG, STEPS = 2, 6  # --halving 3 of 6 steps


def result(rate: float, seed: int, loss: float | None, to_rung: bool) -> dict:
    """A run of the arm `full` as results.json records it: finished, stopped at the rung, or diverged (no loss)."""
    run = {"mode": "full", "method": "full", "config": {"learning_rate": rate, "seed": seed}, "run_dir": f"/x/{rate}"}
    if loss is None:
        return run | {"status": "failed", "error": f"{DIVERGED} nan at step 1"}
    at_rung = loss + 0.5 + seed / 1000
    if to_rung:
        return run | {
            "status": "stopped_early",
            "stopped_early": {"step": RUNG, "max_steps": STEPS, "val_loss": at_rung},
        }
    history = [{"eval_loss": at_rung, "step": RUNG}, {"eval_loss": loss + seed / 1000, "step": STEPS}]
    return run | {
        "status": "finished",
        "val_loss": loss + seed / 1000,
        "optimizer_steps": STEPS,
        "log_history": history,
    }


def bowl(best: float, diverges_above: float = math.inf):
    """Validation loss as a bowl in log rate with its bottom at `best`; diverged above `diverges_above`."""
    return lambda rate: None if rate > diverges_above else (math.log10(rate) - math.log10(best)) ** 2


def run_study(initial: list[float], loss, widen: int, halving: int | None = None):
    """Grow the grid, run every run it plans that is not done (to the rung or to the end), again, until complete;
    returns the grid, every result and the rates of each round."""
    ran: dict[tuple[float, int], dict] = {}
    rounds = []
    while True:
        grid = grow(initial, lambda rate: [ran.get((rate, s), {}) for s in SEEDS], widen, halving)
        if grid.complete:
            return grid, ran, rounds
        to_rung = {rate: bool(halving) and rate not in grid.to_end for rate in grid.rates}
        todo = [(r, s) for r in grid.rates for s in SEEDS if not done(ran.get((r, s), {}), to_rung[r])]
        assert todo, "an incomplete grid always has a run to do"
        rounds.append(sorted({r for r, _ in todo}))
        for rate, s in todo:
            ran[(rate, s)] = result(rate, s, loss(rate), to_rung[rate])


def arm(ran: dict, grid) -> statistics.Arm:
    (found,) = statistics.choose_rates(list(ran.values()), 1 / 3, {"full": grid.widening})
    return found


def test_a_grid_whose_best_rate_is_at_its_top_widens_upward_by_its_own_spacing_until_bracketed():
    grid, ran, rounds = run_study([1e-4, 3e-4], bowl(2.5e-3), widen=3)
    assert rounds == [[1e-4, 3e-4], [9e-4], [2.7e-3], [8.1e-3]]  # x3, the grid's spacing, one rate a round
    assert grid.rates == [1e-4, 3e-4, 9e-4, 2.7e-3, 8.1e-3] and grid.widening.above == (9e-4, 2.7e-3, 8.1e-3)
    found = arm(ran, grid)
    assert found.chosen.rate == 2.7e-3 and found.notes == ["bracketed by 9e-4 and 8.1e-3"]
    assert [r.added for r in found.rates] == [False, False, True, True, True]


def test_widening_stops_after_n_rates_a_side_and_the_arm_says_it_is_still_at_the_edge():
    grid, ran, _ = run_study([1e-4, 3e-4], bowl(1.0), widen=2)
    assert grid.complete and grid.rates == [1e-4, 3e-4, 9e-4, 2.7e-3]
    assert arm(ran, grid).notes == ["best at the highest rate: still at the edge after 2 widenings (--widen 2)"]


def test_a_diverged_rate_bounds_the_grid_and_a_one_rate_grid_widens_both_ways_by_half_a_decade():
    grid, ran, rounds = run_study([1e-4, 3e-4], bowl(1.0, diverges_above=5e-4), widen=3)
    assert rounds == [[1e-4, 3e-4], [9e-4]] and grid.complete  # 9e-4 diverged: 3e-4 is bracketed
    assert arm(ran, grid).notes == ["bracketed by 1e-4 and 9e-4 (diverged)", "diverged at 9e-4"]
    assert next_rate([1e-4], "below", 1) == 3.16e-5 and next_rate([1e-4], "above", 2) == 1e-3
    grid, _, rounds = run_study([1e-4], bowl(1e-4), widen=1)
    assert rounds == [[1e-4], [3.16e-5, 3.16e-4]] and grid.rates == [3.16e-5, 1e-4, 3.16e-4]


def test_halving_trains_every_rate_to_the_rung_and_only_the_best_third_to_the_end():
    rates = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
    grid, ran, rounds = run_study(rates, bowl(1.2e-4), widen=2, halving=3)
    assert rounds == [rates, [1e-4, 3e-4]]  # ceil(5/3) = 2 go on: the lowest mean loss at the rung
    assert grid.to_end == {1e-4, 3e-4} and grid.rates == rates
    assert {r: ran[(r, 1)]["status"] for r in rates} == {
        1e-5: "stopped_early", 3e-5: "stopped_early", 1e-4: "finished", 3e-4: "finished", 1e-3: "stopped_early"
    }  # fmt: skip
    found = arm(ran, grid)
    assert found.chosen.rate == 1e-4 and found.notes == ["bracketed by 3e-5 (stopped at step 2) and 3e-4"]
    assert found.rates[0].stopped_at == RUNG and found.rates[0].rung_loss.mean == bowl(1.2e-4)(1e-5) + 0.5015
    # trained to the end, each stopped run would have cost 3 times what it did
    for run in ran.values():
        run |= {
            "environment": {"device": "cpu", "cpu_threads": 1},
            "train_time_s": 360.0 if run["status"] == "finished" else 120.0,
        }
    cost = statistics.study_cost(list(ran.values()), [found])
    assert cost["device_hours"] == (4 * 360 + 6 * 120) / 3600
    assert cost["device_hours_without_halving"] == 10 * 360 / 3600 and cost["stopped_early_runs"] == 6
    for run in ran.values():  # a first step of 30 s (start-up) is paid once: the stopped runs' 2nd took 90 s
        run["first_step_s"] = 30.0
    cost = statistics.study_cost(list(ran.values()), [found])
    assert cost["device_hours_without_halving"] == pytest.approx((4 * 360 + 6 * (30 + 90 * 5)) / 3600)


def test_an_added_rate_enters_at_the_rung_and_goes_on_only_if_it_is_among_the_best_there():
    grid, ran, rounds = run_study([1e-4, 3e-4, 1e-3], bowl(5e-3), widen=1, halving=3)
    assert rounds == [
        [1e-4, 3e-4, 1e-3],
        [1e-3],
        [3.16e-3],
        [3.16e-3],
    ]  # rung, the best on, the added rate at the rung, on
    assert grid.to_end == {1e-3, 3.16e-3} and grid.complete
    assert arm(ran, grid).notes == ["best at the highest rate: still at the edge after 1 widening (--widen 1)"]


def test_a_study_rerun_with_another_halving_is_refused_never_ranked_on_the_old_rung():
    rates = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
    _, ran, _ = run_study(rates, bowl(1.2e-4), widen=0, halving=3)  # rung at step 2 of 6
    stopped = ran[(1e-5, 1)]
    assert statistics.rung_loss(stopped, 1 / 3) is not None and statistics.rung_loss(stopped, 1 / 2) is None
    with pytest.raises(ToolError, match=r"^/x/1e-05 stopped at step 2, not at this study's rung \(--halving 2: step 3"):
        grow(rates, lambda rate: [ran[(rate, s)] for s in SEEDS], 0, halving=2)
    finished = {key: run for key, run in ran.items() if run["status"] == "finished"}  # validated at steps 2 and 6
    with pytest.raises(ToolError, match="has no validation loss at the rung step, not at this study's rung"):
        grow([1e-4, 3e-4], lambda rate: [finished[(rate, s)] for s in SEEDS], 0, halving=2)
    diverged = finished[(3e-4, 1)] | {"val_loss": math.nan, "log_history": []}  # went on from the rung, then diverged
    assert past_rung(diverged, 1 / 3) and past_rung(diverged, 1 / 2)  # a result at any rung, never a refusal
    later = finished[(3e-4, 1)] | {"val_loss": math.nan}  # validated at the rung, diverged at the end
    assert past_rung(later, 1 / 3) and statistics.rung_loss(later, 1 / 3) is None  # a result, ranked nowhere
    crashed = finished[(3e-4, 1)] | {"status": "failed", "error": "out of memory"}  # after validating at the rung
    assert not past_rung(crashed, 1 / 3)  # a crash is no result: the run is run again
    overflowed = ran[(1e-5, 1)] | {"stopped_early": ran[(1e-5, 1)]["stopped_early"] | {"val_loss": math.inf}}
    assert past_rung(overflowed, 1 / 3)  # diverged at the rung itself: a result, not a refusal


@pytest.mark.parametrize("best", [1.0, 1e-9])  # the best rate at the top of the grid, or at its bottom
def test_widening_a_lr_sweep_gives_the_rates_and_run_names_a_wider_sweep_gives(best, tmp_path):
    """--lr_sweep 3 of full is 3.16e-6, 1e-5, 3.16e-5: widened, 1e-4 above (not 9.99e-5 from the rounded rates) and
    1e-6 below, the rates and run names --lr_sweep 5 gives, so a later study that asks for them reuses the runs."""
    import main as cli
    from pipeline.settings import RunSettings
    from study.runner import StudySettings, planned_runs

    def plan(study_dir, *flags):
        args = cli.build_parser().parse_args(["study", "--arms", "full", "--study_name", "s", "--seeds", "1,2", *flags])
        return planned_runs(StudySettings.from_flags(args), RunSettings.from_flags(args), study_dir)

    first = plan(tmp_path / "three", "--lr_sweep", "3")
    assert first.grids["full"].rates == [3.16e-6, 1e-5, 3.16e-5]
    for run in first.runs:  # the grid's runs done: the best rate at an edge
        (tmp_path / "three" / run.name).mkdir(parents=True)
        done = result(run.settings.learning_rate, run.settings.seed, bowl(best)(run.settings.learning_rate), False)
        (tmp_path / "three" / run.name / "results.json").write_text(json.dumps(done))
    widened = plan(tmp_path / "three", "--lr_sweep", "3")
    (added,) = widened.grids["full"].widening.above or widened.grids["full"].widening.below
    wider = plan(tmp_path / "five", "--lr_sweep", "5")
    assert added == (1e-4 if best == 1.0 else 1e-6) and added in wider.grids["full"].rates
    names = {run.name for run in widened.runs if run.settings.learning_rate == added}
    assert names == {run.name for run in wider.runs if run.settings.learning_rate == added}
    assert names == {f"full-lr{'1e-4' if best == 1.0 else '1e-6'}-s{s}" for s in (1, 2)}
