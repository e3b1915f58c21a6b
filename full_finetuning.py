"""Full fine-tuning recipe: every weight of GPT-2 is trained."""

from __future__ import annotations

from typing import Any

from analysis.weight_update import after_training
from pipeline.modeling import load_causal_lm, load_tokenizer
from pipeline.run_directory import starting_revision
from pipeline.settings import RunSettings
from pipeline.training import finetune


def run(settings: RunSettings) -> dict[str, Any]:
    tokenizer = load_tokenizer(settings.model)
    revision = starting_revision(settings.output_dir, settings.run_name, settings.resume, "full", settings.model)
    model, checkpoint_dtype = load_causal_lm(settings.model, from_scratch=settings.from_scratch, revision=revision)
    return after_training(finetune(settings, "full", model, tokenizer, checkpoint_dtype))
