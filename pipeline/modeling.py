"""Loading GPT-2 (or any causal LM) and its tokenizer, with errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import cached_file

from pipeline.hub import load_error
from utils import ToolError

OFFLINE_MODEL_HINT = (
    "to run without the Hub, pass --model DIR with a saved model (or a config and tokenizer with --from_scratch),"
    " or warm the Hugging Face cache once (it is read when the Hub cannot be reached)"
)


def _load(what: str, name: str, loader, *args, **kwargs):
    # An explicit path that is missing should fail at once, not after the Hub's retries.
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise ToolError(f"{what} path {name} does not exist; {OFFLINE_MODEL_HINT}")
    try:
        return loader(name, *args, **kwargs)
    except Exception as e:  # the Hub raises many types (OSError, ValueError, HTTP errors, ...)
        raise load_error(what, name, e, OFFLINE_MODEL_HINT) from e


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer, with EOS as the pad token (GPT-2 has none) for batched generation."""
    tokenizer = _load("tokenizer", name, AutoTokenizer.from_pretrained)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(name: str, revision: str | None = None) -> PretrainedConfig:
    """The model's config (its architecture), without its weights."""
    return _load("model config", name, AutoConfig.from_pretrained, revision=revision)


def load_causal_lm(name: str, from_scratch: bool = False, revision: str | None = None) -> tuple[PreTrainedModel, str]:
    """Pretrained weights, or with `from_scratch` a random init of the same architecture (no weights needed), in
    float32 whatever the checkpoint's dtype; and the checkpoint's own dtype (e.g. "bfloat16"). `revision`: a Hub
    model's commit (default: its default branch).

    float32 master weights: AdamW's small updates round away in a half-precision weight, and transformers would load
    a half-precision checkpoint as it is stored. Mixed precision comes only from --precision (autocast).
    """
    if from_scratch:
        config = load_model_config(name, revision)
        stored = config.dtype or torch.float32  # from_config would follow it
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        # Loaded as float32 directly: "auto" would first cast to the dtype the config names (rounding float32 weights
        # whose config says bfloat16).
        model = _load("model", name, AutoModelForCausalLM.from_pretrained, dtype=torch.float32, revision=revision)
        stored = stored_dtype(name, revision) or model.config.dtype or torch.float32
        model.config.dtype = torch.float32  # so that the saved model reloads as it trained
    return model, str(stored).removeprefix("torch.")


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def stored_dtype(name: str, revision: str | None = None) -> str | None:
    """The dtype the checkpoint's weights are stored in (the first tensor of model.safetensors, local or in the Hub
    cache); None for a sharded or other checkpoint (the config's dtype then stands for it)."""
    try:
        path = cached_file(name, "model.safetensors", revision=revision, _raise_exceptions_for_missing_entries=False)
        if path is None:
            return None
        with safe_open(path, "pt") as weights:
            return SAFETENSORS_DTYPES.get(weights.get_slice(next(iter(weights.keys()))).get_dtype())
    except Exception:  # an unreadable file: the loader above would have said so
        return None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as PEFT counts them for an adapter; tied weights count once."""
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def virtual_tokens(model: torch.nn.Module) -> int:
    """Positions a prompt-learning adapter (prefix, prompt, p-tuning) puts before the input: they take up context."""
    if not isinstance(model, PeftModel) or not model.active_peft_config.is_prompt_learning:
        return 0
    return model.active_peft_config.num_virtual_tokens
