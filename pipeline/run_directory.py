"""A run's directory over its life: a name no other run has, a lock held while the run is live, the durable
record (results.json from the start, the figures measured so far in every checkpoint), and the checkpoint a
resume starts from."""

from __future__ import annotations

import fcntl
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.hub import canonical_id
from utils import ToolError, atomic_write_json, one_line, timestamp

RESULTS = "results.json"
# Written last into every checkpoint, so its presence is what makes a checkpoint complete.
CHECKPOINT_FIGURES = "run_figures.json"
LOCK = ".lock"
UNFINISHED = ("running", "interrupted", "stopped_early")


@dataclass
class RunDirectory:
    """An open run: its directory, the lock this process holds on it (main process only), the checkpoint it
    resumes from and the figures measured up to that checkpoint (both empty for a run from step 0)."""

    path: Path
    checkpoint: Path | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    lock: IO | None = None
    started_at: str | None = None  # when the run's first session began (main process only)
    earlier: dict[str, Any] = field(default_factory=dict)  # what its earlier sessions recorded (main process only)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lock:  # a process that dies loses the lock anyway; one that goes on (tests, a study) lets go here
            self.lock.close()
            self.lock = None


def read_results(run_dir: Path) -> dict[str, Any]:
    """The run's results.json ({} when it has none); a damaged one is an error that says what to do."""
    path = Path(run_dir) / RESULTS
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as e:
        raise ToolError(f"{path} is damaged ({e}); move the run away or resume it with --resume CHECKPOINT") from e


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / RESULTS, results)


def open_lock_file(run_dir: Path) -> IO:
    # Read-only is enough for flock, and works in a run directory another user owns.
    return os.fdopen(os.open(run_dir / LOCK, os.O_RDONLY | os.O_CREAT, 0o644))


def take_lock(run_dir: Path) -> IO:
    """Hold the run's lock for as long as this process lives (the kernel drops it when the process dies)."""
    handle = open_lock_file(run_dir)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ToolError(f"{run_dir} is in use by a run that is still going; wait for it or stop it first") from None
    return handle


def is_locked(run_dir: Path) -> bool:
    if not (run_dir / LOCK).is_file():
        return False
    with open_lock_file(run_dir) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def create_run_dir(output_dir: Path, run_name: str | None, mode: str) -> Path:
    """A run directory no other run uses: `run_name`, or `<mode>-<timestamp>` made unique with a suffix.

    Creating the directory is the atomic claim, so two runs started in the same second get two directories.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    if run_name:
        path = output_dir / run_name
        path.mkdir(exist_ok=True)
        return path
    stem = f"{mode}-{timestamp()}"
    for suffix in range(1, 1000):
        path = output_dir / (stem if suffix == 1 else f"{stem}-{suffix}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ToolError(f"could not find a free run name like {stem} under {output_dir}; pass --run_name")


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def checkpoints_by_step(checkpoints: Path) -> list[Path]:
    """The Trainer's checkpoint folders, newest step first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.glob("checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit()]
    return sorted(found, key=checkpoint_step, reverse=True)


def set_aside(path: Path, why: str) -> None:
    """Rename a checkpoint out of the Trainer's sight (`<why>-checkpoint-N`), keeping its files."""
    target = path.with_name(f"{why}-{path.name}")
    for n in range(2, 1000):
        if not target.exists():
            break
        target = path.with_name(f"{why}-{path.name}-{n}")
    path.rename(target)
    print(f"set {path.name} aside as {target.name}: {why}", file=sys.stderr)


def newest_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint whose save finished; newer ones (a kill during a save) are named and set aside."""
    for path in checkpoints_by_step(checkpoints):
        if (path / CHECKPOINT_FIGURES).is_file():
            return path
        print(f"skipping {path}: its save did not finish (no {CHECKPOINT_FIGURES})", file=sys.stderr)
        set_aside(path, "incomplete")
    return None


def checkpoint_figures(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / CHECKPOINT_FIGURES).read_text())


def write_checkpoint_figures(checkpoint: Path, figures: dict[str, Any]) -> None:
    atomic_write_json(checkpoint / CHECKPOINT_FIGURES, figures)


def latest_unfinished_run(output_dir: Path, mode: str) -> Path:
    """The most recently written `mode` run that was stopped or killed and is not running now."""
    runs = []
    for path in output_dir.glob(f"*/{RESULTS}"):
        results = read_results(path.parent)
        if results.get("mode") == mode and results.get("status") in UNFINISHED and not is_locked(path.parent):
            runs.append(path.parent)
    if not runs:
        raise ToolError(f"no unfinished {mode} run under {output_dir} to resume; name one with --run_name")
    return max(runs, key=lambda d: (d / RESULTS).stat().st_mtime)


def run_to_resume(output_dir: Path, run_name: str | None, resume: str, mode: str) -> Path:
    """The directory `--resume [CHECKPOINT]` points at: CHECKPOINT's run, --run_name, or the latest unfinished."""
    if resume != "latest":
        checkpoint = Path(resume).resolve()
        run_dir = checkpoint.parent.parent
        if checkpoint.parent.name != "checkpoints" or not (run_dir / RESULTS).is_file():
            raise ToolError(
                f"{resume} is not a checkpoint inside a run's checkpoints/ folder; "
                "resume a run with --resume --run_name NAME"
            )
        return run_dir
    if run_name:
        run_dir = output_dir / run_name
        if not run_dir.is_dir():
            raise ToolError(f"there is no run {run_name} under {output_dir} to resume")
        return run_dir
    return latest_unfinished_run(output_dir, mode)


def same_model(recorded: str | None, model: str) -> bool:
    """Whether a run's recorded --model names `model` (a legacy Hub id and its namespaced one alike)."""
    return recorded is not None and canonical_id(recorded) == canonical_id(model)


def recorded_revision(run_dir: Path, model: str) -> str | None:
    """The commit of the Hub `model` the run in `run_dir` recorded starting from; None when it recorded none,
    trained another model or cannot be read (opening it says why)."""
    try:
        recorded = read_results(run_dir)
    except (ToolError, OSError):
        return None
    return recorded.get("model_revision") if same_model(recorded.get("model"), model) else None


def starting_revision(output_dir: str, run_name: str | None, resume: str | None, mode: str, model: str) -> str | None:
    """The commit of the Hub `model` to load: for --resume, the one the run's first session recorded (a LoRA
    checkpoint holds only the adapter, and the Hub's default branch may have moved since); None (the default branch)
    for a new run."""
    if resume is None:
        return None
    try:
        return recorded_revision(run_to_resume(Path(output_dir), run_name, resume, mode), model)
    except ToolError:
        return None


def chosen_checkpoint(run: RunDirectory, resume: str) -> Path | None:
    """The checkpoint `--resume` continues from: the newest complete one, or the CHECKPOINT given (newer ones,
    which the run would otherwise mix with its own, are set aside)."""
    if resume == "latest":
        return newest_complete_checkpoint(run.checkpoints)
    checkpoint = Path(resume).resolve()
    if not (checkpoint / "trainer_state.json").is_file():
        raise ToolError(f"{resume} is not a Trainer checkpoint (no trainer_state.json)")
    if not (checkpoint / CHECKPOINT_FIGURES).is_file():
        print(
            f"{resume} has no {CHECKPOINT_FIGURES} (an older version wrote it, or its save did not finish): "
            "continuing from it as asked; time and peaks before it are not counted",
            file=sys.stderr,
        )
    for newer in checkpoints_by_step(run.checkpoints):
        if checkpoint_step(newer) > checkpoint_step(checkpoint):
            set_aside(newer, "abandoned")
    return checkpoint


def open_run(output_dir: Path, run_name: str | None, resume: str | None, mode: str) -> RunDirectory:
    """Claim a run directory for this process: a new one, or an unfinished one of `mode` to continue.

    A resumed run continues from its newest complete checkpoint (or the CHECKPOINT given), with the figures
    measured up to it; with none it starts over from step 0 in the same directory. A finished run, another
    mode's run, or one that another live process holds, is refused.
    """
    path = (
        create_run_dir(output_dir, run_name, mode)
        if resume is None
        else run_to_resume(output_dir, run_name, resume, mode)
    )
    run = RunDirectory(path, lock=take_lock(path))
    try:
        if resume is None:
            if any(p.name != LOCK for p in path.iterdir()):
                raise ToolError(
                    f"{path} holds another run (finished or not); continue it with --resume --run_name {path.name}, "
                    "or choose another --run_name"
                )
            run.started_at = timestamp()
            write_results(path, {"status": "running", "mode": mode, "started_at": run.started_at})
            return run
        previous = read_results(path)
        run.started_at, run.earlier = previous.get("started_at"), previous
        if previous.get("status") == "finished":
            raise ToolError(f"{path} finished already; there is nothing to resume")
        if previous.get("mode", mode) != mode:
            raise ToolError(f"{path} is a {previous['mode']} run; resume it with python main.py {previous['mode']}")
        run.checkpoint = chosen_checkpoint(run, resume)
    except ToolError:
        run.__exit__()
        raise
    if run.checkpoint is None:
        print(f"{path} has no complete checkpoint: starting it over from step 0", file=sys.stderr)
    elif (run.checkpoint / CHECKPOINT_FIGURES).is_file():
        run.figures = checkpoint_figures(run.checkpoint)
    return run


def mark_failed(run_dir: Path, error: BaseException) -> None:
    """Say in the run's record that it stopped on an error, and which (it can still be resumed by name)."""
    results = read_results(run_dir)
    if results.get("status") != "finished":
        write_results(run_dir, results | {"status": "failed", "error": one_line(error)})
