"""The adapter a run trains: LoRA from the LoRA flags, or any PEFT method from its PEFT config file, read as PEFT
reads it and checked to train here; and the adapter config a run records."""

from __future__ import annotations

import json
from typing import Any

import peft
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from pipeline.modeling import load_model_config, virtual_tokens
from pipeline.settings import RunSettings
from utils import ToolError, one_line, peft_config_file

# PEFT types that build on GPT-2 but that this tool's training loop cannot train as PEFT means them.
NOT_TRAINABLE_HERE = {
    "ADALORA": "its rank allocation needs update_and_allocate() called after every optimizer step, which the "
    "Trainer does not do (and its loss adds an orthogonality penalty, so it is not the language-model loss)",
    # get_peft_model only zeroes B for eva: without that data step the arm would train as plain LoRA, named eva
    "LORA init eva": "EVA's initialisation needs initialize_lora_eva_weights() run on training batches before "
    "training, which the Trainer does not do",
}


def add_lora_adapters(model: PreTrainedModel, settings: RunSettings) -> PeftModel:
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_target_modules,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2 stores its projections as Conv1D (in, out)
    )
    return get_peft_model(model, config)


def load_peft_config(path: str) -> PeftConfig:
    """The PEFT config in `path` (a JSON file, or a directory holding adapter_config.json), read as
    PeftConfig.from_pretrained reads it, to train: inference_mode off, and a causal LM's task type when it has none."""
    file = peft_config_file(path)
    if not file.is_file():
        raise ToolError(f"--peft_config {path}: no such file (give a PEFT config JSON, or a folder holding one)")
    try:
        attributes = PeftConfig.from_json_file(str(file))  # PeftConfig.from_pretrained's own steps, any file name
        if not isinstance(attributes, dict) or not attributes.get("peft_type"):
            raise ValueError("it has no peft_type")
        config = PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**attributes))
    except KeyError as e:
        raise ToolError(
            f"--peft_config {path}: unknown peft_type {e} (PEFT {peft.__version__} has no such method)"
        ) from None
    except Exception as e:  # invalid JSON, or values PEFT's config class refuses
        raise ToolError(f"--peft_config {path}: not a PEFT config ({one_line(e)})") from None
    method = config.peft_type.value
    if getattr(config, "init_lora_weights", None) == "eva":
        method = "LORA init eva"
    if method in NOT_TRAINABLE_HERE:
        raise ToolError(f"{method} cannot be trained by this tool: {NOT_TRAINABLE_HERE[method]}")
    if config.task_type not in (None, "CAUSAL_LM"):
        raise ToolError(f"--peft_config {path}: task_type {config.task_type}; this tool trains CAUSAL_LM adapters")
    config.task_type, config.inference_mode = "CAUSAL_LM", False  # a saved adapter's config says inference_mode
    return config


def add_peft_adapter(model: PreTrainedModel, config: PeftConfig, block_size: int) -> PeftModel:
    """`model` with the adapter `config` describes, checked to train here: one line naming the method and why
    when PEFT cannot apply it to this model (PEFT's own message where it has one)."""
    method, model_type = config.peft_type.value, model.config.model_type
    try:
        peft_model = get_peft_model(model, config)
        # One forward pass on two tokens: methods that build but cannot run on this model fail here, not in training.
        tokens = torch.zeros((1, 2), dtype=torch.long)
        with torch.no_grad():
            peft_model(input_ids=tokens, labels=tokens)
    except Exception as e:
        raise ToolError(f"{method} cannot apply to {model_type}: {one_line(e)}") from None
    if peft_model.get_nb_trainable_parameters()[0] == 0:
        raise ToolError(f"{method} cannot apply to {model_type}: the config leaves no parameter to train")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and block_size + virtual_tokens(peft_model) > positions:
        raise ToolError(
            f"{method}'s {virtual_tokens(peft_model)} virtual tokens and --block_size {block_size} exceed the "
            f"model's {positions} positions; use a smaller --block_size"
        )
    return peft_model


def adapter_config(model: PreTrainedModel) -> dict[str, Any] | None:
    """A PEFT model's whole adapter config, as JSON (sets as sorted lists, like save_pretrained); None otherwise."""
    if not isinstance(model, PeftModel):
        return None
    as_json = json.dumps(model.active_peft_config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else v)
    return json.loads(as_json)


# LoRA's initialisations that get_peft_model can make on an empty model, the random ones; the others (pissa, olora,
# corda, loftq...) read the weights' values.
EMPTY_MODEL_LORA_INITS = ("gaussian", "orthogonal")


def peft_file_adapter_config(path: str, model: str, revision: str | None = None) -> dict[str, Any]:
    """The adapter config a `peft` run of the file `path` on `model` records now: the file as PEFT reads it, PEFT's
    defaults for the keys it leaves out, and what PEFT derives from the model (target modules, layers, ...), built
    as the run builds it but on an empty (meta) model, so no weights are read; on random weights where the method
    initialises from the weights' values (PiSSA's SVD, say), which an empty model does not have."""
    config, model_config = load_peft_config(path), load_model_config(model, revision)
    init = getattr(config, "init_lora_weights", True)
    from_weights = isinstance(init, str) and init not in EMPTY_MODEL_LORA_INITS
    with torch.device("cpu" if from_weights else "meta"):
        return adapter_config(get_peft_model(AutoModelForCausalLM.from_config(model_config), config))
