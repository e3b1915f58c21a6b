"""LoRA recipe: GPT-2 stays frozen; low-rank adapters on the chosen projections are trained."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from analysis.weight_update import after_training
from pipeline.modeling import load_causal_lm, load_tokenizer
from pipeline.settings import RunSettings
from pipeline.training import finetune


def add_lora_adapters(model: PreTrainedModel, args: RunSettings) -> PeftModel:
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2 stores its projections as Conv1D (in, out)
    )
    return get_peft_model(model, config)


def run(args: RunSettings) -> dict[str, Any]:
    tokenizer = load_tokenizer(args.model)
    model, checkpoint_dtype = load_causal_lm(args.model, from_scratch=args.from_scratch)
    return after_training(finetune(args, "lora", add_lora_adapters(model, args), tokenizer, checkpoint_dtype))
