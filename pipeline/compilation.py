"""torch.compile for training steps: when `--compile auto` turns it on, where its caches live, what it costs.

The model's body (GPT-2's transformer, under the LM head and any PEFT wrapper) is compiled in place, so its
parameters, state dict and saved files are the model's own, and the chunked loss and every PEFT layer stay as
they are. Evaluation and generation run it eagerly (`eager`): their shapes differ from training's and would
compile again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch._dynamo.utils import calculate_time_spent
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from pipeline.lean_training import causal_lm

# `auto` compiles where it was measured to pay (docs/BENCHMARKS.md): GPT-2 small's compiled body trains on a CPU
# at the eager speed per step (0.99-1.03x) in 0.69-0.84x the peak memory, for a cold compile of about a minute
# that a study pays once; a tiny model compiles for longer than it trains.
AUTO_MIN_PARAMETERS = 50_000_000
AUTO_MIN_STEPS = 200


def compile_chosen(choice: str, model: torch.nn.Module, planned_steps: int) -> bool:
    """--compile as this run resolves it: `on`, `off`, or `auto`: on for a model of at least AUTO_MIN_PARAMETERS
    parameters trained for at least AUTO_MIN_STEPS optimizer steps."""
    if choice == "auto":
        parameters = sum(p.numel() for p in model.parameters())
        return parameters >= AUTO_MIN_PARAMETERS and planned_steps >= AUTO_MIN_STEPS
    return choice == "on"


def use_cache_under(cache_dir: str) -> None:
    """Keep inductor's compiled artefacts under the tool's cache directory, so that every run of a study (and any
    later run of the same model and shapes) reuses them; a directory the user set is left alone (inductor's own
    default is no choice: importing torch._dynamo writes it into the variable)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).expanduser() / "inductor")


def compile_body(model: torch.nn.Module) -> None:
    """Compile the model's body in place (nn.Module.compile)."""
    causal_lm(model).base_model.compile()


def compile_seconds() -> float:
    """Seconds this process has spent compiling with torch.compile so far (forward and backward graphs)."""
    return calculate_time_spent()["total_wall_time"]


def eager():
    """A context in which compiled code runs eagerly."""
    return torch.compiler.set_stance("force_eager")
