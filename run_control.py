"""Stopping a run safely: on Ctrl-C or SIGTERM, and at the first non-finite loss."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from lean_training import LeanTrainingMixin
from utils import ToolError


class RunInterrupted(ToolError):
    """Training stopped on a signal after saving a checkpoint; the message says how to resume."""


class StopOnSignal(TrainerCallback):
    """Inside `with`: SIGINT/SIGTERM end training after the current optimizer step, with a checkpoint.

    A second signal stops at once. Every process stops at the same step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None

    def __enter__(self) -> StopOnSignal:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def _stop_requested(self, device: torch.device) -> bool:
        stop = self.received is not None
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([int(stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
            self.received = self.received or ("a signal to another process" if stop else None)
        return stop

    def on_step_end(self, args, state, control, **kwargs):
        if self._stop_requested(args.device):
            control.should_save = True
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.received:  # the checkpoint is saved already; don't validate or save again on the way out
            control.should_evaluate = False
            control.should_save = False


class CheckedTrainer(LeanTrainingMixin, Trainer):
    """A Trainer that stops at the first non-finite training loss, naming the step (and saves memory and time
    where the numbers stay the same: lean_training.py)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise ToolError(
                f"the training loss became {loss.item()} at step {self.state.global_step + 1}; "
                "lower --learning_rate (with fp16, also try --precision bf16 or fp32)"
            )
        return loss
