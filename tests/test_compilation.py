"""--compile auto: on only where compiling pays, off for the suite's tiny model."""

from __future__ import annotations

import torch

from pipeline.compilation import AUTO_MIN_PARAMETERS, AUTO_MIN_STEPS, compile_chosen


def test_auto_compiles_large_models_on_long_runs_only():
    large = torch.nn.Linear(AUTO_MIN_PARAMETERS // 1000, 1000, device="meta")  # counted, never allocated
    tiny = torch.nn.Linear(32, 32)
    assert compile_chosen("auto", large, AUTO_MIN_STEPS)
    assert not compile_chosen("auto", large, AUTO_MIN_STEPS - 1)
    assert not compile_chosen("auto", tiny, 10 * AUTO_MIN_STEPS)
    assert compile_chosen("on", tiny, 1) and not compile_chosen("off", large, 10 * AUTO_MIN_STEPS)
