"""Training with less memory and time and the same numbers: the loss over chunks of positions, a fused GELU.

The chunked loss: GPT-2's logits at batch 4 x 512 are 411 MB in fp32, and the model's own loss adds their
log-softmax and, in the backward pass, their gradient. Here each chunk's logits live only inside the forward pass,
which also computes that chunk's gradients (softmax minus one-hot, the usual ones); the backward pass only scales
them. The matmul FLOPs are the same as the model's own path: nothing is recomputed.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, Trainer
from transformers.activations import NewGELUActivation
from transformers.modeling_outputs import CausalLMOutput

IGNORE_INDEX = -100
LOGITS_PER_CHUNK = 2**24  # 64 MB of fp32 logits per chunk: 333 positions of GPT-2's 50,257-way vocabulary
# Models whose forward is body -> bias-free Linear head -> shifted cross-entropy, nothing else (no logit scaling).
PLAIN_HEAD_MODEL_TYPES = {"gpt2"}
# PEFT methods whose model is the base model with some layers replaced: its forward is the base model's (tested,
# tests/test_peft_methods.py). Not prefix or prompt tuning, whose virtual tokens PEFT's own forward adds.
LAYER_PEFT_TYPES = {"LORA", "IA3", "VERA", "FOURIERFT", "LN_TUNING", "VBLORA"}


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX skipped), chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad: bool) -> torch.Tensor:
        # `grad`: whether autograd records this call (needs_input_grad says True under no_grad too)
        want_hidden, want_weight = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(1, LOGITS_PER_CHUNK // weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            counted = t != IGNORE_INDEX
            safe = t.where(counted, 0)
            logits = (h @ weight.T).float()
            target_logit = logits.gather(1, safe[:, None]).squeeze(1)
            log_normalizer = logits.logsumexp(1)
            total += ((log_normalizer - target_logit) * counted).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad = logits.sub_(log_normalizer[:, None]).exp_()  # softmax, in the logits' memory
            grad[torch.arange(len(t), device=t.device), safe] -= 1
            grad *= counted[:, None]
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = grad.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.T.to(h.dtype), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # Each saved gradient is used once: scale it in place rather than copy 154 MB (GPT-2's head).
        return *(None if g is None else g.mul_(grad_output) for g in ctx.saved_tensors), None, None


def chunked_causal_lm_loss(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor:
    """The model's own causal-LM loss (labels shifted by one, -100 ignored; summed over `num_items_in_batch` when
    given, else the mean over counted tokens), computed without the whole logits. `model` must be supported."""
    lm = causal_lm(model)
    labels = inputs["labels"]
    body_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = lm.base_model(**body_inputs, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    total = LinearCrossEntropy.apply(hidden, lm.get_output_embeddings().weight, targets, torch.is_grad_enabled())
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    return total / count


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The causal LM inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def supports_chunked_loss(model: torch.nn.Module) -> bool:
    """Whether the chunked loss computes exactly this model's own loss: a plain-head causal LM, not wrapped for
    distribution or compilation (their forward must run through the wrapper), under a PEFT method that only
    replaces layers, if any."""
    if isinstance(model, PeftModel) and (
        model.active_peft_config.peft_type not in LAYER_PEFT_TYPES
        or getattr(model.active_peft_config, "alora_invocation_tokens", None)  # aLoRA: offsets in PEFT's forward
    ):
        return False
    lm = causal_lm(model)
    head = lm.get_output_embeddings() if isinstance(lm, PreTrainedModel) else None
    return (
        type(head) is torch.nn.Linear  # not a PEFT wrapper of the head (trainable tokens, modules_to_save)
        and head.bias is None
        and lm.config.model_type in PLAIN_HEAD_MODEL_TYPES
        and lm.base_model is not lm
    )


def fuse_gelu(model: torch.nn.Module) -> None:
    """Swap GPT-2's GELU, written as eight tensor operations that keep four 3,072-wide tensors per layer for the
    backward pass, for torch's fused kernel of the same function (tanh approximation), which keeps one."""
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, torch.nn.GELU(approximate="tanh"))


class LeanTrainingMixin(Trainer):
    """A Trainer that fuses the model's GELU and computes a causal LM's loss in chunks, where either is exactly the
    model's own computation (tested there: one process, fp32); the Trainer's own otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.lean_applies():
            fuse_gelu(self.model)

    def lean_applies(self) -> bool:
        """One process in fp32, no sharding engine, the Trainer's plain loss: the case shown to give the model's own
        numbers (mixed precision autocasts only the model's forward, and several processes rescale the loss)."""
        args = self.args
        return (
            args.world_size == 1
            and not (args.bf16 or args.fp16)
            and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
            and self.label_smoother is None
            and self.compute_loss_func is None
        )

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        # The Trainer hands `model` wrapped (DDP, FSDP, DeepSpeed, torch.compile) when it wrapped it.
        lean = "labels" in inputs and model is self.model and supports_chunked_loss(model) and self.lean_applies()
        if not lean:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = chunked_causal_lm_loss(model, inputs, num_items_in_batch)
        return (loss, CausalLMOutput(loss=loss)) if return_outputs else loss
