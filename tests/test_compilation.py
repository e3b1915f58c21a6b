"""--compile auto: on only where compiling pays, off for the suite's tiny model."""

from __future__ import annotations

import torch

from pipeline.compilation import AUTO_MIN_PARAMETERS, AUTO_MIN_STEPS, compile_chosen, use_cache_under


def test_auto_compiles_large_models_on_long_runs_only():
    large = torch.nn.Linear(AUTO_MIN_PARAMETERS // 1000, 1000, device="meta")  # counted, never allocated
    tiny = torch.nn.Linear(32, 32)
    assert compile_chosen("auto", large, AUTO_MIN_STEPS)
    assert not compile_chosen("auto", large, AUTO_MIN_STEPS - 1)
    assert not compile_chosen("auto", tiny, 10 * AUTO_MIN_STEPS)
    assert compile_chosen("on", tiny, 1) and not compile_chosen("off", large, 10 * AUTO_MIN_STEPS)


def test_inductors_cache_goes_under_the_tools_cache_dir_unless_the_user_chose_one(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    cache_dir()  # inductor's own default, written into TORCHINDUCTOR_CACHE_DIR as importing torch._dynamo does
    use_cache_under(str(tmp_path))
    assert cache_dir() == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    use_cache_under(str(tmp_path))
    assert cache_dir() == str(tmp_path / "mine")
