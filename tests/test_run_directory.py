"""A run's directory, through its pure functions: which checkpoint a resume takes, what is set aside, what is
refused (fast: files only, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.run_directory import (
    CHECKPOINT_FIGURES,
    mark_failed,
    newest_complete_checkpoint,
    open_run,
    read_results,
    starting_revision,
)
from utils import ToolError


def checkpoint(run: Path, step: int, complete: bool = True) -> Path:
    path = run / "checkpoints" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        (path / CHECKPOINT_FIGURES).write_text(json.dumps({"train_time_s": float(step)}))
    return path


def unfinished_run(tmp_path: Path, mode: str = "full") -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"status": "interrupted", "mode": mode, "started_at": "t0"}))
    return run


def test_a_resume_takes_the_newest_complete_checkpoint_and_sets_newer_incomplete_ones_aside(tmp_path):
    run = unfinished_run(tmp_path)
    checkpoint(run, 2)
    checkpoint(run, 4)
    checkpoint(run, 6, complete=False)
    assert newest_complete_checkpoint(run / "checkpoints") == run / "checkpoints" / "checkpoint-4"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
        "incomplete-checkpoint-6",
    ]


def test_resuming_continues_from_the_figures_of_its_checkpoint_and_keeps_the_start_time(tmp_path):
    run = unfinished_run(tmp_path)
    checkpoint(run, 3)
    with open_run(tmp_path, "run", "latest", "full") as opened:
        assert opened.checkpoint == run / "checkpoints" / "checkpoint-3"
        assert opened.figures == {"train_time_s": 3.0} and opened.started_at == "t0"


def test_a_resumed_run_records_the_hub_commit_its_first_session_started_from(tmp_path):
    from pipeline.training import model_revision

    run = unfinished_run(tmp_path)
    with open_run(tmp_path, "run", "latest", "full") as opened:  # a first session that stopped before recording it
        assert model_revision(opened, "/a/local/model") is None
    first = "a" * 40  # the Hub's main branch when the run started; offline now and the cache empty: it resolves none
    record = {"model": "openai-community/gpt2", "model_revision": first}
    (run / "results.json").write_text(json.dumps(read_results(run) | record))
    with open_run(tmp_path, "run", "latest", "full") as opened:
        assert model_revision(opened, "openai-community/gpt2") == first == model_revision(opened, "gpt2")  # legacy id
        assert model_revision(opened, "/a/local/model") is None  # resumed with another model: not the first's commit
    assert starting_revision(str(tmp_path), "run", "latest", "full", "gpt2") == first  # and it loads that commit
    assert starting_revision(str(tmp_path), "run", "latest", "full", "/a/local/model") is None


def test_an_explicit_checkpoint_sets_newer_ones_aside_as_abandoned(tmp_path):
    run = unfinished_run(tmp_path)
    older = checkpoint(run, 2)
    checkpoint(run, 4)
    with open_run(tmp_path, None, str(older), "full") as opened:
        assert opened.checkpoint == older
    assert (run / "checkpoints" / "abandoned-checkpoint-4").is_dir()


@pytest.mark.parametrize(
    ("status", "mode", "message"),
    [("finished", "full", "finished already"), ("interrupted", "lora", "is a lora run; resume it with")],
)
def test_a_finished_run_or_another_commands_run_is_not_resumed(tmp_path, status, mode, message):
    run = unfinished_run(tmp_path, mode)
    (run / "results.json").write_text(json.dumps({"status": status, "mode": mode}))
    with pytest.raises(ToolError, match=message):
        open_run(tmp_path, "run", "latest", "full")


def test_a_fresh_run_refuses_a_directory_that_holds_anything(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ToolError, match="--resume --run_name taken"):
        open_run(tmp_path, "taken", None, "full")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_a_failure_is_recorded_but_never_over_a_finished_run(tmp_path):
    run = unfinished_run(tmp_path)
    mark_failed(run, ValueError("the loss\nwent wrong"))
    assert read_results(run) | {} == {
        "status": "failed",
        "mode": "full",
        "started_at": "t0",
        "error": "the loss went wrong",
    }
    (run / "results.json").write_text(json.dumps({"status": "finished"}))
    mark_failed(run, ValueError("late"))
    assert read_results(run) == {"status": "finished"}
