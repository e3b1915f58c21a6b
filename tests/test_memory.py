"""Memory and speed levers change nothing a user can see: activation checkpointing, the chunked loss and the fused
GELU give the model's own loss and gradients, for full fine-tuning and for LoRA, through the tool's own Trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.activations import NewGELUActivation

import main as cli
from pipeline.adapters import add_lora_adapters
from pipeline.data import PackedBlocks, pack_into_blocks, tokenize_rows
from pipeline.lean_training import causal_lm, supports_chunked_loss
from pipeline.modeling import load_tokenizer
from pipeline.training import build_trainer

BATCH = 4


class GradientsBeforeStep(TrainerCallback):
    """The trainable parameters' gradients as the optimizer is about to use them."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.gradients = model, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.gradients = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.requires_grad}


def deterministic_model(model_dir: Path, args) -> torch.nn.Module:
    """The tiny GPT-2 without dropout (so that runs are comparable), with LoRA adapters whose B is not zero (so
    that both adapter matrices get gradients) when args are LoRA's."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if args.command == "lora":
        model = add_lora_adapters(model, args)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model


def one_batch(model_dir: Path, data_dir: Path) -> PackedBlocks:
    rows = (data_dir / "train.txt").read_text().splitlines(keepends=True)
    return PackedBlocks(pack_into_blocks(tokenize_rows(rows, load_tokenizer(str(model_dir))), 32)[:BATCH])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_checkpointing_chunked_loss_and_fused_gelu_keep_the_models_own_loss_and_gradients(
    mode, common_flags, tiny_model_dir, data_dir, tmp_path
):
    batch = one_batch(tiny_model_dir, data_dir)
    flags = [mode, *common_flags, "--max_steps", "1", "--logging_steps", "1", "--lora_dropout", "0"]
    if mode == "full":
        flags = flags[:-2]

    reference = deterministic_model(tiny_model_dir, cli.build_parser().parse_args(flags)).train()
    inputs = {k: torch.stack([batch[i][k] for i in range(BATCH)]) for k in ("input_ids", "labels")}
    reference_loss = reference(**inputs).loss  # the model's own loss over the whole logits
    reference_loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

    for checkpointing in (False, True):
        args = cli.build_parser().parse_args(flags + ["--activation_checkpointing"] * checkpointing)
        model = deterministic_model(tiny_model_dir, args)
        assert supports_chunked_loss(model)
        trainer = build_trainer(args, model, {"train": batch, "validation": batch}, tmp_path / str(checkpointing))
        trainer.args.save_strategy = trainer.args.eval_strategy = "no"
        trainer.args.max_grad_norm = 0  # no clipping: compare the gradients themselves
        gradients = GradientsBeforeStep(model)
        trainer.add_callback(gradients)
        trainer.train()

        assert causal_lm(model).is_activation_checkpointing == checkpointing
        assert not any(isinstance(m, NewGELUActivation) for m in model.modules())  # the fused GELU ran instead
        logged = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
        assert logged == pytest.approx(reference_loss.item(), abs=1e-4)  # the Trainer logs it to 4 decimals
        assert gradients.gradients.keys() == expected.keys()
        for name, grad in expected.items():
            assert grad.abs().max() > 0, name  # gradients really reach every trainable weight
            torch.testing.assert_close(gradients.gradients[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_accepts_its_common_alias():
    args = cli.build_parser().parse_args(["lora", "--gradient_checkpointing"])
    assert args.activation_checkpointing is True
    assert cli.build_parser().parse_args(["full"]).activation_checkpointing is False


def test_a_bf16_run_keeps_the_models_own_loss_and_gelu(common_flags, tiny_model_dir, data_dir, tmp_path):
    """Autocast wraps only the model's own forward, so in mixed precision the lean path would run in fp32."""
    args = cli.build_parser().parse_args(["full", *common_flags, "--precision", "bf16", "--max_steps", "1"])
    model = deterministic_model(tiny_model_dir, args)
    batch = one_batch(tiny_model_dir, data_dir)
    trainer = build_trainer(args, model, {"train": batch, "validation": batch}, tmp_path)
    assert not trainer.lean_applies()
    assert any(isinstance(m, NewGELUActivation) for m in model.modules())
