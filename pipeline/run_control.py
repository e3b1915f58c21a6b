"""Controlling a run as it trains: stopping on Ctrl-C or SIGTERM and at the first non-finite loss, timing what
the Trainer does, and completing each checkpoint with the figures measured up to it."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import IntervalStrategy, rotate_checkpoints

from pipeline.compilation import compile_body, eager
from pipeline.lean_training import LeanTrainingMixin
from pipeline.measurement import RunClock
from pipeline.run_directory import CHECKPOINT_FIGURES
from pipeline.settings import stop_step
from utils import ToolError, make_durable


def any_process(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any process (the flag itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class StopOnSignal(TrainerCallback):
    """Inside `with`: SIGINT/SIGTERM end training after the current optimizer step, with a checkpoint.

    A second signal stops at once. Every process stops at the same step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self.stopping = False  # agreed by every process at the end of a step

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

    def on_step_end(self, args, state, control, **kwargs):
        self.stopping = any_process(self.received is not None, args.device)
        if self.stopping:
            self.received = self.received or "a signal to another process"
            control.should_save = True
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopping:  # the checkpoint is saved already; don't validate or save again on the way out
            control.should_evaluate = False
            control.should_save = False


class NothingLeftToTrain(Exception):
    """Training was resumed from a checkpoint of its last step."""


class StopWhenNothingIsLeft(TrainerCallback):
    """Resumed at its last step, the Trainer would take one step past the end: stop it once the checkpoint is
    loaded (this run's step count is known by then, and the weights are in place however the model is sharded)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            raise NothingLeftToTrain


class StopAtShare(TrainerCallback):
    """--stop_at_share: on the schedule of the whole run, stop after step `stop_step(max_steps, share)` with a
    validation and then a checkpoint (the Trainer's order: the checkpoint's log holds that validation), so the
    stopped run's losses are the whole run's at that step and --resume continues it. Resumed at that step, there
    is nothing to train; resumed past it, the run goes on."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.step: int | None = None
        self._random_state: torch.Tensor | None = None
        self._cuda_random_state: list[torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = stop_step(state.max_steps, self.share)
        if self.step is not None and state.global_step > self.step:
            self.step = None
        elif self.step is not None and state.global_step == self.step:
            raise NothingLeftToTrain

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            # the validation's data loader draws a seed: where the whole run would not validate at this step, the
            # checkpoint gets the random state from before it, so a resumed run goes on as the whole run would have
            if not (control.should_evaluate or self.validates_at_epoch_end(args, state)):
                self._random_state = torch.random.get_rng_state()
                self._cuda_random_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            control.should_evaluate = control.should_save = control.should_training_stop = True

    @staticmethod
    def validates_at_epoch_end(args, state) -> bool:
        """True when this step ends an epoch (the Trainer sets `epoch` to a whole number only at an epoch's last
        step) and the run validates at each epoch's end."""
        epoch_end = float(state.epoch).is_integer()
        return args.eval_strategy == IntervalStrategy.EPOCH and epoch_end and args.eval_delay <= state.epoch

    def on_evaluate(self, args, state, control, **kwargs):
        if self._random_state is not None:
            torch.random.set_rng_state(self._random_state)
            if self._cuda_random_state is not None:
                torch.cuda.set_rng_state_all(self._cuda_random_state)
            self._random_state = None

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:  # validated and saved at the step already
            control.should_evaluate = control.should_save = False

    def stopped(self, state) -> bool:
        return self.step is not None and state.global_step == self.step


class CheckedTrainer(LeanTrainingMixin, Trainer):
    """A Trainer that stops every process at the first non-finite training loss, times its evaluations and
    checkpoint saves on `clock`, and completes each checkpoint: its files durable on disk, then
    `checkpoint_saved(path)` (which writes the figures that mark it complete), then the rotation that keeps
    `checkpoints_kept` of them (after the mark, so a complete checkpoint is never rotated away for one that is not).
    It also saves memory and time where the numbers stay the same (lean_training.py), and with `compiled` trains
    through the model's body compiled in place (compilation.py), evaluating it eagerly.
    """

    def __init__(self, *args, checkpoints_kept: int | None = None, compiled: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compiled = compiled
        if compiled:
            compile_body(self.model)
        self.clock = RunClock()
        self.add_callback(self.clock)
        self.add_callback(StopWhenNothingIsLeft())
        self.checkpoints_kept = checkpoints_kept
        self.checkpoint_saved: Callable[[Path], None] = lambda path: None
        # Blocks whose loss is measured at every validation, as `forgetting_loss` in the same log entry as eval_loss.
        self.forgetting: torch.utils.data.Dataset | None = None
        self._forgetting_logs: dict[str, float] = {}

    def train_from(self, checkpoint: Path | None) -> None:
        """Train, continuing from `checkpoint` when given."""
        try:
            self.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except NothingLeftToTrain:
            self.is_in_train = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = bool(torch.isfinite(loss).all())
        if any_process(not finite, self.args.device):
            value = "non-finite on another process" if finite else loss.item()
            raise ToolError(
                f"the training loss became {value} at step {self.state.global_step + 1}; "
                "lower --learning_rate (with fp16, also try --precision bf16 or fp32)"
            )
        return loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        with self.clock.timing("eval_time_s"), eager():
            if self.forgetting is not None and metric_key_prefix == "eval":  # a validation, not the test split
                output = self.forgetting_loss()
                self._forgetting_logs = {"forgetting_loss": output.metrics["forgetting_loss"]}
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def forgetting_loss(self):
        """The evaluation of the forgetting blocks, on a copy of the random state: its data loader draws a seed, which
        would otherwise move every later dropout mask (measuring forgetting would change the training)."""
        devices = [self.args.device] if self.args.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self.evaluation_loop(
                self.get_eval_dataloader(self.forgetting),
                description="Forgetting",
                prediction_loss_only=True,
                metric_key_prefix="forgetting",
            )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "eval_loss" in logs:  # the validation's entry (and its metrics) carry the forgetting measured with it
            logs.update(self._forgetting_logs)
            self._forgetting_logs = {}
        super().log(logs, *args, **kwargs)

    # The Trainer's evaluation loss is the mean over windows of each batch's per-token mean: exact only when every
    # window scores as many tokens. Overlapping windows (--eval_stride) do not (the first scores a whole block, the
    # last what is left), so each batch's mean is weighted by its share of the scored tokens: the per-token mean over
    # the split, exactly. Blocks all score the same count, and the weight is then exactly 1.
    _tokens_per_window: float | None = None

    def evaluation_loop(self, dataloader, *args, **kwargs):
        self._tokens_per_window = getattr(dataloader.dataset, "mean_scored_tokens", None)
        try:
            return super().evaluation_loop(dataloader, *args, **kwargs)
        finally:
            self._tokens_per_window = None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if loss is not None and self._tokens_per_window:
            scored = (inputs["labels"][:, 1:] != -100).sum().item()
            loss = loss * (scored / (len(inputs["labels"]) * self._tokens_per_window))
        return loss, logits, labels

    def _save_checkpoint(self, model, trial):
        checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        main = self.is_world_process_zero()
        if main:  # an earlier save of this step is no longer whole once this one starts writing over it
            (checkpoint / CHECKPOINT_FIGURES).unlink(missing_ok=True)
        with self.clock.timing("checkpoint_time_s"):
            super()._save_checkpoint(model, trial)  # the Trainer's own rotation is off (save_total_limit None)
            if main:
                make_durable(checkpoint)
        self.checkpoint_saved(checkpoint)
        if main and self.checkpoints_kept:
            rotate_checkpoints(
                output_dir=self.args.output_dir,
                save_total_limit=self.checkpoints_kept,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
