"""A study's statistics from planted results.json dicts: the rate chosen on validation, seeds pooled, paired
intervals, failed arms, the cost, and the report they make (fast: no training)."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image
from scipy import stats

from pipeline.summary import format_value
from study import statistics
from study.report import study_report

SEEDS = (2024, 2025, 2026)


def planted(arm: str, rate: float | None, seed: int, val: float | None, test: float, **extra) -> dict:
    """A finished run as results.json records it, with the figures the statistics read."""
    mode = "lora" if arm.startswith("lora") else arm
    name = "-".join(p for p in (arm, rate and statistics.rate_text(rate), f"s{seed}") if p)
    return {
        "status": "finished",
        "mode": mode,
        "method": "lora" if mode == "lora" else mode,
        "run_dir": f"/nowhere/{name}",
        "config": {"learning_rate": rate, "seed": seed} | ({"lora_rank": 8} if mode == "lora" else {}),
        "environment": {"device": "cpu", "cpu_threads": 2},
        "world_size": 1,
        "train_time_s": 0.0 if mode == "base" else 36.0,
        "generation_time_s": 18.0,
        "trainable_params": {"base": 0, "full": 1000, "lora": 40}[mode],
        "val_loss": val,
        "test_loss": test,
        "test_perplexity": math.exp(test),
    } | extra


def grid(arm: str, rates: dict[float | None, tuple[list[float], list[float]]]) -> list[dict]:
    """Runs of an arm: per rate, (validation losses, test losses), a seed each."""
    return [
        planted(arm, rate, seed, val, test)
        for rate, (vals, tests) in rates.items()
        for seed, val, test in zip(SEEDS, vals, tests, strict=False)
    ]


@pytest.fixture
def runs() -> list[dict]:
    return [
        *grid("base", {None: ([6.0, 6.1, 6.2], [6.0, 6.1, 6.2])}),
        # test loss alone would pick 1e-4 (lowest test), validation picks 3e-5
        *grid(
            "full",
            {
                1e-5: ([3.0, 3.1, 3.2], [3.0, 3.1, 3.2]),
                3e-5: ([2.5, 2.6, 2.55], [2.9, 2.8, 3.1]),
                1e-4: ([2.8, 2.7, 2.9], [1.0, 1.1, 1.2]),
            },
        ),
        # the lowest validation loss at the top of the grid
        *grid("lora-r8", {1e-4: ([3.3, 3.4, 3.5], [3.3, 3.4, 3.5]), 1e-3: ([2.6, 2.62, 2.7], [2.95, 2.83, 3.2])}),
    ]


def arm(arms: list[statistics.Arm], name: str) -> statistics.Arm:
    return next(a for a in arms if a.name == name)


def test_each_arms_rate_is_the_validation_choice_even_where_test_loss_would_pick_another(runs):
    arms = statistics.choose_rates(runs)
    full, lora = arm(arms, "full"), arm(arms, "lora-r8")
    assert full.chosen.rate == 3e-5 and not full.at_edge and full.notes == ["bracketed by 1e-5 and 1e-4"]
    assert min(runs, key=lambda r: r["test_loss"])["config"]["learning_rate"] == 1e-4  # the test's choice
    assert full.chosen.val_loss.mean == pytest.approx((2.5 + 2.6 + 2.55) / 3) and full.chosen.val_loss.n == 3
    assert lora.chosen.rate == 1e-3 and lora.at_edge
    assert lora.notes == ["best at the highest rate: still at the edge after 0 widenings (--widen 0)"]
    assert statistics.rate_multiples(arms) == {"lora-r8": pytest.approx(1e-3 / 3e-5)}


def test_the_paired_interval_is_the_one_scipy_computes_from_the_recorded_losses(runs):
    arms = statistics.choose_rates(runs)
    found = {(d.arm, d.reference, d.key): d for d in statistics.arm_differences(arms)}
    lora, full = [2.95, 2.83, 3.2], [2.9, 2.8, 3.1]  # test losses at the chosen rates, seeds in order
    expected = stats.ttest_rel(lora, full).confidence_interval(0.95)
    d = found[("lora-r8", "full", "test_loss")]
    assert (d.low, d.high) == (pytest.approx(expected.low), pytest.approx(expected.high))
    assert d.mean == pytest.approx(sum(lora) / 3 - sum(full) / 3) and d.n == 3
    assert d.low < 0 < d.high and "within the noise" in d.verdict()

    against_base = found[("lora-r8", "base", "test_perplexity")]
    expected = stats.ttest_rel([math.exp(x) for x in lora], [math.exp(x) for x in [6.0, 6.1, 6.2]])
    assert against_base.low == pytest.approx(expected.confidence_interval(0.95).low)
    assert (
        against_base.high < 0 and "lower than base: the difference is larger than the noise" in against_base.verdict()
    )


def test_a_peft_arm_named_like_a_lora_family_is_not_counted_as_lora(runs):
    """The family comes from the arm's method, never from its name: a peft: arm named lora-rank2 or dora-style is
    no LoRA arm, so no rate multiple is printed for it; one whose config is LoRA's has one."""
    for name in ("lora-rank2", "dora-style"):
        config = {"peft_config": f"/configs/{name}.json", "learning_rate": 1e-3, "seed": 2024}
        runs.append(planted("full", 1e-3, 2024, 2.0, 2.0) | {"mode": "peft", "method": "ia3", "config": config})
    # and a peft: arm whose config is LoRA's is LoRA, whatever it is named
    config = {"peft_config": "/configs/my-adapter.json", "learning_rate": 1e-3, "seed": 2024}
    adapter = {"adapter_config": {"peft_type": "LORA", "r": 4}}
    runs.append(planted("full", 1e-3, 2024, 2.0, 2.0) | {"mode": "peft", "config": config} | adapter)
    arms = statistics.choose_rates(runs)
    assert {"lora-rank2", "dora-style", "my-adapter"} <= {a.name for a in arms}
    assert not arm(arms, "lora-rank2").lora_family and arm(arms, "lora-r8").lora_family
    assert arm(arms, "my-adapter").lora_family
    assert statistics.rate_multiples(arms) == {"lora-r8": pytest.approx(1e-3 / 3e-5), "my-adapter": 1e-3 / 3e-5}


def test_an_arm_whose_every_rate_diverged_is_failed_and_a_rate_with_a_diverged_seed_is_never_chosen(runs):
    runs += [
        planted("lora-r8", 1e-2, 2024, 1.0, 1.0),  # the lowest validation loss of all, but its other seed
        planted("lora-r8", 1e-2, 2025, None, 1.0, status="failed", error="non-finite loss"),
    ]
    runs = [r for r in runs if r["mode"] != "full"]
    runs += [planted("full", rate, seed, None, 9.0, status="failed") for rate in (1e-5, 1e-4) for seed in SEEDS[:2]]
    arms = statistics.choose_rates(runs)
    full, lora = arm(arms, "full"), arm(arms, "lora-r8")
    assert full.failed and full.chosen is None and "every learning rate diverged" in full.notes[0]
    assert lora.chosen.rate == 1e-3 and not lora.at_edge
    assert lora.notes == ["bracketed by 1e-4 and 1e-2 (diverged)", "diverged at 1e-2"]
    assert statistics.rate_multiples(arms) == {}


def test_one_seed_shows_the_figures_as_they_are_without_spread_or_interval():
    runs = [planted("full", 1e-5, 2024, 2.5, 2.61), planted("lora-r8", 1e-4, 2024, 2.7, 2.83)]
    arms = statistics.choose_rates(runs)
    assert statistics.pooled_text(arm(arms, "full").chosen.runs, "test_perplexity") == format_value(math.exp(2.61))
    (loss, _) = statistics.arm_differences(arms)
    assert loss.low is None and loss.beyond_noise is None and "one seed" in loss.verdict()
    assert statistics.pool([22.1, 22.4, 22.9]).text() == "22.5 ± 0.4 (n=3)"


def test_a_pooled_figure_only_one_seed_recorded_says_n_1_not_a_bare_number():
    """Two seeds, one without METEOR (no NLTK data) or with an infinite perplexity: the cell says n=1."""
    first = planted("full", 1e-5, 2024, 2.5, 2.61, metrics={"meteor": None}, test_perplexity=math.inf)
    second = planted("full", 1e-5, 2025, 2.5, 2.61, metrics={"meteor": 0.5})
    assert statistics.pooled_text([first, second], "metrics.meteor") == "0.5000 (n=1)"
    assert statistics.pooled_text([first, second], "test_perplexity") == f"{format_value(math.exp(2.61))} (n=1)"
    assert statistics.pooled_text([first, first], "metrics.meteor") == "-"


def test_the_cost_counts_every_run_and_what_the_sweep_and_the_seeds_multiplied(runs):
    cost = statistics.study_cost(runs, statistics.choose_rates(runs))
    assert cost["runs"] == len(runs) == 18 and cost["train_time_s"] == 15 * 36.0
    hours = (15 * 36.0 + 18 * 18.0) * 2 / 3600  # two threads each
    assert cost["device_hours"] == pytest.approx(hours) and cost["device_hours_unit"] == "CPU-core-hours"
    chosen = (6 * 36.0 + 9 * 18.0) * 2 / 3600  # full, lora and base at their chosen rates, three seeds each
    assert cost["sweep_factor"] == pytest.approx(hours / chosen) and cost["seeds_factor"] == pytest.approx(3)


def test_the_study_report_shows_each_arm_at_its_chosen_rate_with_spread_and_the_rate_figure(runs, tmp_path):
    text = study_report(tmp_path, runs)
    report = (tmp_path / "report.md").read_text()
    assert text.split("# Every run at its chosen learning rate")[0].strip() in report  # what the study prints
    table = report.split("## Each arm at its chosen learning rate")[1].split("\n\n")[1]
    rows = {
        cells[0]: cells[1:] for line in table.splitlines() for cells in [[c.strip() for c in line.split("|")[1:-1]]]
    }
    assert rows["Metric"] == ["base", "full", "lora-r8"]
    assert rows["Learning rate (chosen on validation)"] == ["-", "3e-5 of 1e-5, 3e-5, 1e-4", "1e-3 of 1e-4, 1e-3"]
    perplexity = statistics.pool([math.exp(x) for x in [2.95, 2.83, 3.2]])
    assert rows["Test perplexity"][2] == perplexity.text() and perplexity.text().endswith("(n=3)")
    assert "**lora-r8**: best at the highest rate: still at the edge after 0 widenings (--widen 0)" in report
    verdict = report.split("## Verdict")[1].split("\n## ")[0]  # first, and built from the tables below it
    assert report.index("## Verdict") < report.index("## Each arm at its chosen learning rate")
    (row,) = [line for line in report.splitlines() if line.startswith("| lora-r8 | full        | test_perplexity")]
    difference, interval = [c.strip() for c in row.split("|")[4:6]]
    assert f"test perplexity {difference} (95% CI {interval}, n=3): within noise" in verdict
    assert "**Unsettled** (lora-r8's best rate is at the edge of its grid)" in verdict
    assert "0.0400x the trainable parameters" in verdict  # 40 over 1,000, as the table has them
    assert "![Learning rates](learning_rates.png)" in report
    with Image.open(tmp_path / "learning_rates.png") as image:
        image.verify()
    record = json.loads((tmp_path / "study.json").read_text())
    assert [a["chosen_learning_rate"] for a in record["arms"]] == [None, 3e-5, 1e-3]


def test_a_study_whose_runs_were_measured_on_different_devices_says_so():
    from study.report import mixed_measurement_note

    cpu = {"mode": "full", "config": {"seed": 1}, "precision": "fp32", "environment": {"device": "cpu"}}
    gpu = {"mode": "full", "config": {"seed": 2}, "precision": "bf16", "environment": {"device": "cuda", "gpu": "H100"}}
    assert mixed_measurement_note([cpu, cpu | {"config": {"seed": 2}}]) == []
    (note,) = [line for line in mixed_measurement_note([cpu, gpu]) if line]
    assert "differ in precision, device, gpu" in note


def test_the_study_base_arm_is_the_base_even_when_its_model_is_a_saved_run(tmp_path):
    """A study of a model this tool saved: `evaluate` records that model as mode `saved`; the study's base arm is
    still the base its runs start from (base column, forgetting change, differences against it)."""
    import main as cli
    from pipeline.settings import RunSettings
    from study.runner import StudySettings, planned_runs, trained_results

    args = cli.build_parser().parse_args(["study", "--arms", "base,full", "--study_name", "s"])
    planned = planned_runs(StudySettings.from_flags(args), RunSettings.from_flags(args), tmp_path).runs
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "results.json").write_text(json.dumps({"mode": "saved", "trainable_params": 7, "config": {}}))
    base, full = trained_results(tmp_path, planned)
    assert (base["mode"], base["method"], base["trainable_params"]) == ("base", "base", 0)
    assert full == {"run_dir": str(tmp_path / "full")}


def test_a_trained_arm_of_one_rate_is_not_bracketed_and_its_verdict_unsettled_while_diverged_neighbours_bracket():
    """Without a sweep (--widen 0) a trained arm's one rate was never tuned: no bracketed optimum, so the verdict
    against it says Unsettled; an optimum between two diverged rates is bracketed."""
    from study.report import study_record, verdict

    runs = [*grid("base", {None: ([6.0, 6.1], [6.0, 6.1])}), *grid("full", {1e-5: ([2.5, 2.6], [2.6, 2.75])})]
    runs += grid("lora-r8", {1e-4: ([2.7, 2.8], [2.8, 2.9])})
    runs += [planted("lora-r8", rate, s, None, 9.0, status="failed") for rate in (3.16e-5, 3.16e-4) for s in SEEDS[:2]]
    arms = statistics.choose_rates(runs)
    base, full, lora = (arm(arms, name) for name in ("base", "full", "lora-r8"))
    assert full.one_rate and full.bracket is None and full.notes == ["one rate, not tuned: not bracketed"]
    assert not lora.one_rate and lora.notes[0] == "bracketed by 3.16e-5 (diverged) and 3.16e-4 (diverged)"
    assert not base.one_rate and base.notes == []
    (line,) = [line for line in verdict(arms) if "**lora-r8**" in line]
    assert line.startswith("- **Unsettled** (full ran one rate, not tuned): **lora-r8** against full fine-tuning")
    record = {a["arm"]: a for a in study_record(arms, runs)["arms"]}
    assert record["full"]["unsettled"] == ["full ran one rate, not tuned"] and record["lora-r8"]["unsettled"] == []


def test_the_note_on_evaluation_rows_claims_the_same_rows_only_where_every_run_recorded_one_eval_seed():
    from study.report import evaluation_rows_note

    def run(seed: int, **config) -> dict:
        return planted("full", 1e-5, seed, 2.5, 2.6) | {"config": {"seed": seed, **config}}

    whole = evaluation_rows_note([run(1), run(2, data_fraction=1.0)])  # every row: the seeds cannot differ
    assert "scored on the whole validation and test splits" in whole
    drawn = evaluation_rows_note([run(s, data_fraction=0.5, eval_seed=0) for s in (1, 2)])
    assert "scored on the same validation and test rows (--eval_seed 0), so the intervals measure training" in drawn
    # one run recorded before --eval_seed drew its rows with its own --seed: no sameness claimed, no None
    old = evaluation_rows_note([run(1, data_fraction=0.5, eval_seed=0), run(2, data_fraction=0.5)])
    assert "same validation and test rows" not in old and "None" not in old
    assert "here also the validation and test rows" in old and "also hold the sampling of those rows" in old
