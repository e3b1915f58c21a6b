"""One precision a run can state: how --precision auto chooses, the weights' dtype whatever the checkpoint's, and
generation at one precision for every arm."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import main as cli
from pipeline import training
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


def test_a_bf16_checkpoint_trains_fp32_weights_and_the_run_records_the_checkpoints_dtype(
    tiny_model_dir, common_flags, tmp_path
):
    half = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(half)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(half)
    assert {t.dtype for t in load_file(half / "model.safetensors").values()} == {torch.bfloat16}

    out = tmp_path / "results"
    flags = [*common_flags, "--model", str(half), "--output_dir", str(out), "--max_steps", "2", "--eval_examples", "0"]
    assert cli.main(["full", *flags, "--run_name", "full"]) == 0
    results = json.loads((out / "full" / "results.json").read_text())
    assert results["checkpoint_dtype"] == "bfloat16" and results["precision"] == "fp32"
    saved = load_file(out / "full" / "model" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # AdamW's small steps are not rounded away
    assert AutoConfig.from_pretrained(out / "full" / "model").dtype == torch.float32  # it reloads as it trained


def test_every_arm_generates_at_the_one_precision_it_records(common_flags, tmp_path, monkeypatch):
    """With --precision bf16, accelerate's autocast stays on full's and base's forward but PEFT's generate goes
    around it: the output layer's dtype during generation shows which precision each arm decoded in."""
    seen: list[torch.dtype] = []
    generate = training.evaluate_generation

    def watched(model, *args, **kwargs):
        hook = model.get_output_embeddings().register_forward_hook(lambda module, i, output: seen.append(output.dtype))
        try:
            return generate(model, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(training, "evaluate_generation", watched)
    out = tmp_path / "results"
    flags = [*common_flags, "--output_dir", str(out), "--precision", "bf16", "--eval_examples", "2"]
    trained = ["--max_steps", "1", "--logging_steps", "1"]
    runs = {
        "full": ["full", *flags, *trained],
        "lora": ["lora", *flags, *trained],
        "base": ["evaluate", *flags],
        "adapter": ["evaluate", *flags, "--adapter", str(out / "lora" / "adapter")],
    }
    dtypes, recorded = {}, {}
    for name, command in runs.items():
        seen.clear()
        assert cli.main([*command, "--run_name", name]) == 0
        dtypes[name] = set(seen)
        results = json.loads((out / name / "results.json").read_text())
        assert results["precision"] == "bf16"
        recorded[name] = results.get("generation_precision")
    assert dtypes == dict.fromkeys(runs, {torch.float32})  # one precision for every arm, and it is fp32
    assert recorded == dict.fromkeys(runs, "fp32")
