"""Adapter recipe: GPT-2 stays frozen; LoRA adapters on the chosen projections (`lora`), or any PEFT adapter as a
PEFT config file describes it (`peft --peft_config FILE`), are trained."""

from __future__ import annotations

from typing import Any

from analysis.weight_update import after_training
from pipeline.adapters import add_lora_adapters, add_peft_adapter, load_peft_config
from pipeline.modeling import load_causal_lm, load_tokenizer
from pipeline.run_directory import starting_revision
from pipeline.settings import RunSettings
from pipeline.training import finetune


def run(settings: RunSettings) -> dict[str, Any]:
    config = load_peft_config(settings.peft_config) if settings.command == "peft" else None  # a bad file fails first
    tokenizer = load_tokenizer(settings.model)
    revision = starting_revision(
        settings.output_dir, settings.run_name, settings.resume, settings.command, settings.model
    )
    model, checkpoint_dtype = load_causal_lm(settings.model, from_scratch=settings.from_scratch, revision=revision)
    model = add_peft_adapter(model, config, settings.block_size) if config else add_lora_adapters(model, settings)
    return after_training(finetune(settings, settings.command, model, tokenizer, checkpoint_dtype))
