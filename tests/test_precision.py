"""One precision a run can state: how --precision auto chooses, the weights' dtype whatever the checkpoint's, and
generation at one precision for every arm."""

from __future__ import annotations

import pytest

from pipeline.training import choose_precision
from utils import ToolError


@pytest.mark.parametrize(
    ("cuda", "bf16_native", "expected"),
    [(True, True, "bf16"), (True, False, "fp16"), (False, False, "fp32")],  # (True, False): T4, V100
)
def test_auto_precision_takes_bf16_only_on_gpus_that_run_it_natively(cuda, bf16_native, expected):
    assert choose_precision("auto", cuda, bf16_native) == expected


def test_an_explicit_precision_is_kept_and_fp16_needs_cuda():
    assert choose_precision("bf16", cuda_available=True, bf16_native=False) == "bf16"  # asked for: emulated
    assert choose_precision("fp32", cuda_available=True, bf16_native=True) == "fp32"
    with pytest.raises(ToolError, match="fp16 needs a CUDA GPU"):
        choose_precision("fp16", cuda_available=False, bf16_native=False)
