"""A run's settings, typed, each declaring what it is: the one place that says what makes runs comparable.

The command line (command_line.py) holds every flag's default and help; `RunSettings.from_flags` turns its parse into
this type once. A setting is one of:
- experiment: defines the experiment; runs share it to share a table,
- replicate: a replicate key (the seed); runs that differ only in it are repeats of one setting,
- swept: may differ between the columns of one table, and is listed when it does (learning rate, rank, ...),
- bookkeeping: where and how a run is written or logged; never compared.
No torch here: the study side reads these declarations too.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Kind = Literal["experiment", "replicate", "swept", "bookkeeping"]
KINDS: tuple[Kind, ...] = ("experiment", "replicate", "swept", "bookkeeping")
# The commands a setting belongs to: each group is one set of flags on the command line.
DATA = ("full", "lora", "peft", "evaluate")
TRAINING = ("full", "lora", "peft")
LORA = ("lora",)
PEFT = ("peft",)
EVALUATE = ("evaluate",)
# Each method's own learning rate and weight decay, used unless a flag sets them.
METHOD_DEFAULTS = {"full": (1e-5, 0.01), "lora": (1e-4, 0.0), "peft": (1e-4, 0.0)}


def stop_step(max_steps: int, share: float) -> int | None:
    """The optimizer step a run of `max_steps` stops at under --stop_at_share `share` (rounded up); None when that
    is its last step (it simply finishes)."""
    step = math.ceil(max_steps * share - 1e-9)  # 1/3 of 6 steps is step 2, whatever float rounding says
    return step if step < max_steps else None


def setting(kind: Kind, commands: tuple[str, ...]) -> Any:
    """A field of RunSettings: its kind and the commands that take it (no default: command_line.py holds those)."""
    return field(metadata={"kind": kind, "commands": commands})


@dataclass
class RunSettings:
    """Everything one run (`full`, `lora`, `peft`, `evaluate`) is told; a setting its command does not take is None."""

    command: str = setting("bookkeeping", DATA)
    # model and data
    model: str = setting("experiment", DATA)
    from_scratch: bool = setting("experiment", DATA)
    dataset: str = setting("experiment", DATA)
    dataset_config: str | None = setting("experiment", DATA)
    data_dir: str | None = setting("experiment", DATA)
    data_fraction: float = setting("experiment", DATA)
    block_size: int = setting("experiment", DATA)
    eval_stride: int | None = setting("experiment", DATA)  # None: the blocks (study/report.py compares it so)
    batch_size: int = setting("swept", DATA)  # the global batch, which defines the training, is compared below
    seed: int = setting("replicate", DATA)
    eval_seed: int = setting("experiment", DATA)  # the rows of a fraction of validation and test: alike per seed
    precision: str = setting("experiment", DATA)  # compared as resolved (auto -> what ran), see `comparable`
    cache_dir: str = setting("bookkeeping", DATA)
    output_dir: str = setting("bookkeeping", DATA)
    run_name: str | None = setting("bookkeeping", DATA)
    # generation evaluation
    eval_examples: int = setting("experiment", DATA)
    num_beams: int = setting("experiment", DATA)
    eval_batch_size: int = setting("bookkeeping", DATA)  # batched and one at a time give the same text
    tokens_per_word: float = setting("experiment", DATA)
    # forgetting: loss on general English that is not WikiText
    forgetting_dataset: str | None = setting("experiment", DATA)
    forgetting_data_dir: str | None = setting("experiment", DATA)
    forgetting_tokens: int = setting("experiment", DATA)
    # training
    epochs: float | None = setting("experiment", TRAINING)
    max_steps: int | None = setting("experiment", TRAINING)
    learning_rate: float | None = setting("swept", TRAINING)
    lr_scheduler_type: str | None = setting("experiment", TRAINING)
    warmup_steps: int | None = setting("experiment", TRAINING)
    weight_decay: float | None = setting("swept", TRAINING)
    gradient_accumulation_steps: int | None = setting("swept", TRAINING)
    eval_steps: int | None = setting("swept", TRAINING)  # when validation runs: the best validation loss's points
    logging_steps: int | None = setting("swept", TRAINING)  # the windows the best training loss is the mean of
    compile: str | None = setting("swept", TRAINING)
    report_to: str | None = setting("bookkeeping", TRAINING)
    activation_checkpointing: bool | None = setting("swept", TRAINING)
    save_steps: int | None = setting("bookkeeping", TRAINING)
    save_total_limit: int | None = setting("bookkeeping", TRAINING)
    stop_at_share: float | None = setting("bookkeeping", TRAINING)  # how far this session goes, as --resume says
    resume: str | None = setting("bookkeeping", DATA)
    fsdp: str | None = setting("swept", TRAINING)
    fsdp_config: str | None = setting("swept", TRAINING)
    deepspeed: str | None = setting("swept", TRAINING)
    # LoRA
    lora_rank: int | None = setting("swept", LORA)
    use_dora: bool | None = setting("swept", LORA)
    use_rslora: bool | None = setting("swept", LORA)
    lora_alpha: float | None = setting("swept", LORA)
    lora_dropout: float | None = setting("swept", LORA)
    lora_target_modules: list[str] | str | None = setting("swept", LORA)
    # any PEFT adapter: compared by the adapter config it recorded (study.report.settings), not by the path
    peft_config: str | None = setting("swept", PEFT)
    # evaluate
    adapter: str | None = setting("swept", EVALUATE)

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> RunSettings:
        """The settings a parsed command line gives (settings its command lacks are None)."""
        return cls(**{f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)})

    def applies(self, name: str) -> bool:
        return self.command in SETTING_COMMANDS[name]

    def to_config(self) -> dict[str, Any]:
        """results.json's `config`: every setting the run's command takes."""
        return {name: value for name, value in dataclasses.asdict(self).items() if self.applies(name)}

    def recorded_config(self) -> tuple[dict[str, Any], dict[str, str]]:
        """results.json's `config`, with every local path absolute as this process resolves it (a run read later
        from another directory keeps meaning the same files), and those paths as they were typed."""
        config, typed = self.to_config(), {}
        for name in PATHS:
            value = config.get(name)
            if isinstance(value, str) and is_local(value):
                config[name] = str(Path(value).expanduser().resolve())
                if config[name] != value:
                    typed[name] = value
        return config, typed

    def to_argv(self, defaults: RunSettings) -> list[str]:
        """The command line that runs these settings: the command, then each setting that differs from `defaults`
        (the command's own defaults) as a flag."""
        argv = [self.command]
        for name, value in self.to_config().items():
            if name == "command" or value is None or value is False or value == getattr(defaults, name):
                continue
            argv.append(f"--{name}")
            if value is not True:
                argv.append(",".join(map(str, value)) if isinstance(value, list) else str(value))
        return argv


# Settings that may name local files or directories (a model or adapter may also be a Hub id).
PATHS = (
    "model",
    "data_dir",
    "forgetting_data_dir",
    "adapter",
    "peft_config",
    "cache_dir",
    "output_dir",
    "fsdp_config",
    "deepspeed",
)


def is_local(name: str) -> bool:
    """Whether a --model/--dataset/--adapter value names a local path rather than a Hub id."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


SETTING_KINDS: dict[str, Kind] = {f.name: f.metadata["kind"] for f in dataclasses.fields(RunSettings)}
SETTING_COMMANDS: dict[str, tuple[str, ...]] = {f.name: f.metadata["commands"] for f in dataclasses.fields(RunSettings)}


def names_of_kind(kind: Kind, commands: tuple[str, ...] = DATA) -> tuple[str, ...]:
    """The settings of `kind` that any of `commands` takes."""
    return tuple(n for n, k in SETTING_KINDS.items() if k == kind and set(SETTING_COMMANDS[n]) & set(commands))
