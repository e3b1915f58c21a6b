"""--compile auto: on only where compiling pays, off for the suite's tiny model."""

from __future__ import annotations

import os

import torch

from pipeline.compilation import AUTO_MIN_PARAMETERS, AUTO_MIN_STEPS, compile_chosen


def test_auto_compiles_large_models_on_long_runs_only():
    large = torch.nn.Linear(AUTO_MIN_PARAMETERS // 1000, 1000, device="meta")  # counted, never allocated
    tiny = torch.nn.Linear(32, 32)
    assert compile_chosen("auto", large, AUTO_MIN_STEPS)
    assert not compile_chosen("auto", large, AUTO_MIN_STEPS - 1)
    assert not compile_chosen("auto", tiny, 10 * AUTO_MIN_STEPS)
    assert compile_chosen("on", tiny, 1) and not compile_chosen("off", large, 10 * AUTO_MIN_STEPS)


def test_inductors_cache_goes_under_the_tools_cache_dir_unless_the_user_chose_one(monkeypatch, tmp_path):
    from pipeline import compilation

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_default")  # as inductor leaves it once it ran
    monkeypatch.setattr(compilation, "USER_INDUCTOR_CACHE", None)
    compilation.use_cache_under(str(tmp_path))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setattr(compilation, "USER_INDUCTOR_CACHE", "/data/mine")
    compilation.use_cache_under(str(tmp_path))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/data/mine"
